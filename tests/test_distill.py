"""Distillation (`--teacher`): the loss in the pure step against a direct computation, a
run taught by a finished run, the teacher checked before any data loads; the teachers run
inside the step on the augmented batch (`--teacher-view augmented`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import data
from fmnist_jax.augment import Augment
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.run import folder
from fmnist_jax.run.presets import get_config
from fmnist_jax.run.history import load_history
from fmnist_jax.run.teacher import load_teachers, teacher_logprobs, teachers_accuracy
from fmnist_jax.steps import (StepOptions, Teacher, create_train_state, inference_state,
                              init_variables, predict_logits, predict_logits_step, train_step)
from tests.helpers import (SHARED_ADAM, assert_trees_close_to_scale, jitted_train_step,
                           one_error_line, step_batch, tiny_config, train_quietly)


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


def test_the_distilled_preset_without_its_teacher_is_one_line(tmp_path, run_main):
    result = run_main("train.py", "--preset", "lenet5-distilled", "--workdir", tmp_path / "run",
                      "--data-dir", tmp_path / "no-data")
    assert "preset lenet5-distilled learns from a teacher" in one_error_line(result)
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
    test_logits = predict_logits_step(teacher_state, jnp.asarray(test.images_NxHxWx1),
                                      folder.load_normalization(teacher_dir))
    hits = np.argmax(np.asarray(test_logits), axis=-1) == test.labels_N
    teachers = load_teachers(cfg, train, test)
    assert teachers_accuracy(teachers, test) == pytest.approx(np.mean(hits))
    # Two copies of one teacher are that teacher: its accuracy as an ensemble too.
    assert teachers_accuracy(teachers * 2, test) == pytest.approx(np.mean(hits))
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
@pytest.mark.parametrize("view", [{}, dict(teacher_view="augmented", flip_prob=0.5,
                                           crop_padding=2)], ids=["clean", "augmented"])
def test_taught_seeds_equal_taught_single_runs_and_resume(tmp_path, tiny_run, tiny_splits,
                                                          view):
    """Under --seeds the members share the teacher and each equals its single run; a run
    cut back to its first checkpoint resumes to the same history. With the teacher run in
    every step on augmented batches too (it is an input, not state)."""
    import shutil

    cfg = get_config(epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.2, seed=4,
                     seeds=2, teacher=str(tiny_run[0]), distill_weight=0.8, **view)
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


def _live_teachers():
    """Two LeNet-5 teachers with their own weights (doubled, so that their probabilities
    are far from uniform) and normalizations: the step averages their probabilities."""
    model = get_model("lenet5")
    return tuple(
        Teacher(inference_state(model, jax.tree_util.tree_map(
            lambda x: 2 * x, init_variables(model, jax.random.key(seed)))), norm)
        for seed, norm in ((7, data.HALF), (8, data.Normalization(0.3, 0.4))))


def _direct_targets(teachers, images_BxHxWx1, temperature):
    """log of the teachers' mean softmax(logits / T) on the images, in float64 numpy."""
    probs_KxBxC = []
    for teacher in teachers:
        logits = np.asarray(predict_logits(teacher.state, images_BxHxWx1,
                                           batch_size=len(images_BxHxWx1), norm=teacher.norm),
                            np.float64)
        probs_KxBxC.append(np.exp(_log_softmax(logits / temperature)))
    return np.log(np.mean(probs_KxBxC, axis=0)).astype(np.float32)


@pytest.mark.parametrize("flip", [False, True])
def test_live_teachers_target_the_batch_the_student_sees(flip):
    """Without augmentation the teachers run in the step give the step of their fixed
    log-probabilities of the same images; with every image flipped, the step of the
    teachers' log-probabilities of the flipped images, not of the clean ones."""
    images, labels = step_batch()
    state = create_train_state(get_model("lenet5"), SHARED_ADAM, jax.random.key(0))
    teachers, key = _live_teachers(), jax.random.key(1)
    options = StepOptions(distill_weight=0.7, distill_temperature=4.0,
                          augment=Augment(flip_prob=1.0 if flip else 0.0))
    seen = images[:, :, ::-1] if flip else images

    def step(**teacher):
        return jitted_train_step(state, images, labels, key, data.HALF, options, **teacher)

    live_state, live = step(teachers=teachers)
    fixed_state, fixed = step(teacher_BxC=jnp.asarray(_direct_targets(teachers, seen, 4.0)))
    assert float(live.loss) == pytest.approx(float(fixed.loss), rel=1e-5)
    # The gradients (Adam's first moments after one step), not the params: Adam's first step
    # is near the learning rate's size for any gradient, so it magnifies its rounding.
    assert_trees_close_to_scale(live_state.opt_state[0].mu, fixed_state.opt_state[0].mu)
    if flip:
        _, clean = step(teacher_BxC=jnp.asarray(_direct_targets(teachers, images, 4.0)))
        assert abs(float(clean.loss) - float(live.loss)) > 1e-3 * float(live.loss)


def test_the_flip_tta_teacher_averages_each_image_with_its_mirror():
    """`--teacher-tta flip`: the log of the mean over the teachers and both views of their
    probabilities at T, the same for an image and its mirror image; its accuracy is that of
    the mean at T = 1."""
    from tests.helpers import make_split

    split = make_split(64, 3)
    mirror = data.Split(split.images_NxHxWx1[:, :, ::-1, :].copy(), split.labels_N)
    teachers = _live_teachers()
    cfg = get_config(teacher="runs", distill_temperature=2.0, teacher_tta="flip")
    got_NxC = teacher_logprobs(cfg, split, None, teachers=teachers)
    want_NxC = np.log((np.exp(_direct_targets(teachers, split.images_NxHxWx1, 2.0))
                       + np.exp(_direct_targets(teachers, mirror.images_NxHxWx1, 2.0))) / 2)
    np.testing.assert_allclose(got_NxC, want_NxC, atol=1e-5)
    np.testing.assert_allclose(teacher_logprobs(cfg, mirror, None, teachers=teachers),
                               got_NxC, atol=1e-5)
    plain_NxC = teacher_logprobs(dataclasses.replace(cfg, teacher_tta="none"), split, None,
                                 teachers=teachers)
    assert np.abs(plain_NxC - got_NxC).max() > 1e-3
    at_1_NxC = np.log((np.exp(_direct_targets(teachers, split.images_NxHxWx1, 1.0))
                       + np.exp(_direct_targets(teachers, mirror.images_NxHxWx1, 1.0))) / 2)
    assert teachers_accuracy(teachers, split, "flip") == pytest.approx(
        np.mean(np.argmax(at_1_NxC, -1) == split.labels_N))


def test_the_teacher_tta_without_a_teacher_or_on_the_augmented_view_is_one_line(tmp_path,
                                                                               run_main):
    with pytest.raises(FmnistError, match="teacher tta flip changes nothing without a teacher"):
        get_config(teacher_tta="flip")
    result = run_main("train.py", "--teacher", tmp_path / "nowhere", "--teacher-tta", "flip",
                      "--teacher-view", "augmented", "--workdir", tmp_path / "run",
                      "--data-dir", tmp_path / "no-data")
    assert "teacher tta flip is for the clean view" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_the_augmented_teacher_view_without_a_teacher_is_one_line(tmp_path, run_main):
    with pytest.raises(FmnistError, match="changes nothing without a teacher"):
        get_config(teacher_view="augmented")
    result = run_main("train.py", "--teacher-view", "augmented", "--workdir",
                      tmp_path / "run", "--data-dir", tmp_path / "no-data")
    assert "teacher view augmented changes nothing without a teacher" in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_taught_on_clean_batches_by_live_teachers_equals_the_fixed_teacher(
        tmp_path, tiny_run, tiny_splits):
    """Without augmentation, the teacher run in every step teaches what its log-probabilities
    computed once do: the same history, epoch for epoch, within float rounding."""
    cfg = _taught_config(tiny_run[0])
    _, fixed = train_quietly(cfg, tmp_path / "fixed", tiny_splits)
    _, live = train_quietly(dataclasses.replace(cfg, teacher_view="augmented"),
                            tmp_path / "live", tiny_splits)
    assert [list(row) for row in live] == [list(row) for row in fixed]
    for row, fixed_row in zip(live, fixed):
        np.testing.assert_allclose(list(row.values()), list(fixed_row.values()),
                                   rtol=1e-5, atol=1e-6)
