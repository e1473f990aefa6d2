"""Distillation (`--teacher`): the loss in the pure step against a direct computation, a
run taught by a finished run, the teacher checked before any data loads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import data
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.run import folder
from fmnist_jax.run.config import get_config
from fmnist_jax.run.history import load_history
from fmnist_jax.run.teacher import teacher_logprobs
from fmnist_jax.steps import StepOptions, create_train_state, predict_logits_step, train_step
from tests.helpers import SHARED_ADAM, one_error_line, step_batch, tiny_config, train_quietly


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# The fast set: a mix of both terms at T != 1; the KL alone and the cross-entropy alone are
# slow (each options value compiles its own step).
@pytest.mark.parametrize("weight, temperature", [
    (0.7, 4.0), *(pytest.param(*case, marks=pytest.mark.slow) for case in [(1.0, 1.0),
                                                                           (0.0, 2.0)])])
def test_the_step_minimizes_the_mix_of_kl_and_cross_entropy(weight, temperature):
    images, labels = step_batch()
    state = create_train_state(get_model("lenet5"), SHARED_ADAM, jax.random.key(0))
    rng = np.random.default_rng(0)
    teacher_BxC = _log_softmax(rng.normal(size=(len(labels), 10)) * 3).astype(np.float32)
    options = StepOptions(distill_weight=weight, distill_temperature=temperature)
    _, sums = jax.jit(train_step, static_argnames="options")(
        state, images, labels, jax.random.key(1), data.HALF, options, jnp.asarray(teacher_BxC))
    logits = np.asarray(predict_logits_step(state, images, data.HALF), np.float64)
    student = _log_softmax(logits / temperature)
    kl = (np.exp(teacher_BxC) * (teacher_BxC - student)).sum(-1) * temperature ** 2
    ce = -_log_softmax(logits)[np.arange(len(labels)), np.asarray(labels)]
    want = (weight * kl + (1 - weight) * ce).sum()
    assert float(sums.loss) == pytest.approx(want, rel=1e-5)


def test_distillation_flags_without_a_teacher_are_refused():
    with pytest.raises(FmnistError, match="change nothing without a teacher"):
        get_config(distill_temperature=2.0)


def test_a_missing_or_unfinished_teacher_is_one_line_before_the_data(tmp_path, run_main):
    result = run_main("train.py", "--teacher", tmp_path / "nowhere", "--workdir",
                      tmp_path / "run", "--data-dir", tmp_path / "no-data")
    assert "no such folder" in one_error_line(result)
    (tmp_path / "empty").mkdir()
    result = run_main("train.py", "--teacher", tmp_path / "empty", "--workdir",
                      tmp_path / "run", "--data-dir", tmp_path / "no-data")
    assert "is not a run folder" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def _taught_config(teacher_dir):
    return dataclasses.replace(tiny_config(), teacher=str(teacher_dir), distill_weight=0.5,
                               distill_temperature=2.0)


@pytest.mark.slow
def test_a_finished_run_teaches_its_log_probabilities_at_t(tiny_run, tiny_splits):
    """The tiny run as a teacher of a student of its own config on the same images: the
    teacher's log-probabilities are its model's at T; a teacher trained on other images is
    refused."""
    teacher_dir, teacher_state, _ = tiny_run
    train, test = tiny_splits
    cfg = _taught_config(teacher_dir)
    got_NxC = teacher_logprobs(cfg, train, test)
    logits = predict_logits_step(teacher_state, jnp.asarray(train.images_NxHxWx1),
                                 folder.load_normalization(teacher_dir))
    np.testing.assert_allclose(got_NxC, jax.nn.log_softmax(logits / 2.0), atol=1e-5)
    other = (data.Split(train.images_NxHxWx1[::-1].copy(), train.labels_N[::-1].copy()), test)
    with pytest.raises(FmnistError, match="not the ones .* was trained on"):
        teacher_logprobs(cfg, *other)


@pytest.mark.slow  # a whole tiny run with its own compiled epochs; the step's loss is fast
def test_a_run_taught_by_a_finished_run(tmp_path, tiny_run, tiny_splits):
    """The student's history differs from the tiny run's own (untaught), epoch for epoch."""
    teacher_dir, _, untaught_rows = tiny_run
    _, taught_rows = train_quietly(_taught_config(teacher_dir), tmp_path / "taught",
                                   tiny_splits)
    assert [row["epoch"] for row in taught_rows] == [row["epoch"] for row in untaught_rows]
    assert taught_rows[0]["train_loss"] != untaught_rows[0]["train_loss"]


@pytest.mark.slow
def test_taught_seeds_equal_taught_single_runs_and_resume(tmp_path, tiny_run, tiny_splits):
    """Under --seeds the members share the teacher and each equals its single run; a run
    cut back to its first checkpoint resumes to the same history."""
    import shutil

    cfg = get_config(epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.2, seed=4,
                     seeds=2, teacher=str(tiny_run[0]), distill_weight=0.8)
    _, histories = train_quietly(cfg, tmp_path / "seeds", tiny_splits)
    for m, member in enumerate(cfg.members()):
        _, single = train_quietly(member, tmp_path / f"single-{m}", tiny_splits)
        for row, single_row in zip(histories[m], single):
            np.testing.assert_allclose(list(row.values()), list(single_row.values()),
                                       rtol=1e-5, atol=1e-6)
    target = tmp_path / "cut"
    shutil.copytree(tmp_path / "single-0", target)
    (target / folder.BEST_FILE).unlink()
    shutil.rmtree(target / folder.CHECKPOINTS_DIR / "2")
    train_quietly(cfg.members()[0], folder.reopen(target), tiny_splits)
    assert load_history(target) == load_history(tmp_path / "single-0")
