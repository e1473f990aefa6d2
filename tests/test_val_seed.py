"""--val-seed: the seed of the held-out validation split (`TrainConfig.split_seed`), shared by
a run's members and its teachers, and the note logged when a teacher trained on some of
its student's validation images (`teacher.validation_note`)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import data
from fmnist_jax.cli import train_parser
from fmnist_jax.cli_flags import config_from_args
from fmnist_jax.errors import FmnistError
from fmnist_jax.run import folder
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.presets import get_config
from fmnist_jax.run.teacher import validation_note, validation_seen
from tests.helpers import make_split, tiny_config


def test_the_split_seed_is_the_val_seed_when_given_else_the_seed():
    assert get_config(seed=3).val_seed is None and get_config(seed=3).split_seed == 3
    assert get_config(seed=3, val_seed=7).split_seed == 7
    assert [m.split_seed for m in get_config(seed=3, seeds=3).members()] == [3, 4, 5]
    members = get_config(seed=3, seeds=3, val_seed=7).members()
    assert [(m.seed, m.val_seed, m.split_seed) for m in members] == [(3, 7, 7), (4, 7, 7),
                                                                     (5, 7, 7)]


def test_the_val_seed_flag_and_its_checks():
    assert config_from_args(train_parser().parse_args(["--val-seed", "5"])).val_seed == 5
    assert config_from_args(train_parser().parse_args(["--val-seed", "none"])).val_seed is None
    for bad in (-1, 2**32):
        with pytest.raises(FmnistError, match=r"val seed must be in \[0, 4294967296\), or none"):
            get_config(val_seed=bad)
    with pytest.raises(FmnistError, match="val seed 5 changes nothing without a validation "
                                          "split: pass --val-fraction > 0, or drop --val-seed"):
        get_config(val_seed=5, val_fraction=0.0)


def test_a_config_json_without_val_seed_loads_with_the_seed_as_its_split_seed(tmp_path):
    """Runs written before the field existed keep their split: their own seed's."""
    fields = json.loads(get_config(seed=6).to_json())
    del fields["val_seed"]
    (tmp_path / folder.CONFIG_FILE).write_text(json.dumps(fields))
    cfg = folder.load_config(tmp_path)
    assert cfg == get_config(seed=6) and cfg.split_seed == 6
    given = get_config(seed=6, val_seed=2)
    assert TrainConfig.from_dict(json.loads(given.to_json())) == given


def test_members_of_seeds_with_a_val_seed_hold_out_its_split():
    """`member_splits`, as `seed_members` (train.py --seeds, --sweep) draws them."""
    from fmnist_jax.run.prepare import member_splits

    labels_N = make_split(200, seed=1).labels_N
    cfg = get_config(batch_size=30, val_fraction=0.2, seed=3, seeds=2)
    own = member_splits(cfg, labels_N, [3, 4])
    np.testing.assert_array_equal(own[1][1], data.train_val_indices(labels_N, 0.2, 4)[1])
    assert not np.array_equal(own[0][1], own[1][1])  # each seed its own split
    shared = member_splits(dataclasses.replace(cfg, val_seed=9), labels_N, [3, 4])
    want_train, want_val = data.train_val_indices(labels_N, 0.2, 9)
    for train_idx, val_idx in shared:
        np.testing.assert_array_equal(train_idx, want_train)
        np.testing.assert_array_equal(val_idx, want_val)


def test_validation_seen_counts_the_students_validation_images_a_teacher_trained_on():
    labels_N = make_split(500, seed=2).labels_N
    _, val_idx = data.train_val_indices(labels_N, 0.2, 5)
    teacher = get_config(val_fraction=0.2, seed=1)
    assert validation_seen(dataclasses.replace(teacher, val_seed=5), labels_N, val_idx) == 0
    teacher_train_idx, _ = data.train_val_indices(labels_N, 0.2, 1)
    overlap = len(np.intersect1d(teacher_train_idx, val_idx))
    assert 0 < overlap < len(val_idx)
    assert validation_seen(teacher, labels_N, val_idx) == overlap
    # A teacher with no validation split trained on every image.
    assert validation_seen(get_config(val_fraction=0.0), labels_N, val_idx) == len(val_idx)


def _teacher_dirs(tmp_path, *configs):
    dirs = []
    for k, cfg in enumerate(configs):
        (tmp_path / f"t{k}").mkdir()
        (tmp_path / f"t{k}" / folder.CONFIG_FILE).write_text(cfg.to_json())
        dirs.append(tmp_path / f"t{k}")
    return dirs


def test_the_note_names_the_teacher_and_the_val_seed_to_train_it_with(tmp_path):
    labels_N = make_split(500, seed=2).labels_N
    _, val_idx = data.train_val_indices(labels_N, 0.2, 5)
    n_seen = validation_seen(get_config(val_fraction=0.2, seed=1), labels_N, val_idx)
    shared, other = _teacher_dirs(tmp_path, get_config(val_fraction=0.2, seed=1, val_seed=5),
                                  get_config(val_fraction=0.2, seed=1))
    assert validation_note([shared], labels_N, {5: val_idx}) is None
    assert validation_note([shared, other], labels_N, {}) is None  # no validation split
    assert validation_note([shared, other], labels_N, {5: val_idx}) == (
        f"note: teacher {other} trained on {n_seen} of this run's {len(val_idx)} validation "
        f"images: the validation accuracy will read high; train the teachers with "
        f"--val-seed 5 (the seed of this run's split)")
    # Members with their own splits: no teacher's split can hold out all of them.
    _, val_6 = data.train_val_indices(labels_N, 0.2, 6)
    note = validation_note([shared], labels_N, {5: val_idx, 6: val_6})
    assert note.startswith(f"note: teacher {shared} trained on ") and "seed 6's" in note
    assert "pass this run --val-seed S" in note


def _val_loss_accuracy(state, norm, split):
    from fmnist_jax.steps import predict_logits_step

    logits = predict_logits_step(state, jnp.asarray(split.images_NxHxWx1), norm)
    labels = jnp.asarray(split.labels_N)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
    return float(loss), float(jnp.mean(jnp.argmax(logits, -1) == labels))


@pytest.mark.slow  # three tiny runs: the teacher and two students
def test_a_run_holds_out_its_val_seeds_split_and_its_students_are_told(tmp_path, tiny_splits,
                                                                      monkeypatch):
    """A run with --val-seed validates on that seed's split (and its evaluation finds it
    again); a student of it logs the note unless it holds out the same split (here the two
    seeds of a --seeds run, each member's folder carrying the val seed)."""
    from fmnist_jax.evaluation import report
    from fmnist_jax.run.loop import train_and_evaluate

    train, test = tiny_splits
    cfg = dataclasses.replace(tiny_config(), val_fraction=0.2, val_seed=9)
    state, history = train_and_evaluate(cfg, tmp_path / "teacher", train=train, test=test,
                                        log_fn=lambda s: None, progress=False)
    assert folder.load_config(tmp_path / "teacher").val_seed == 9
    norm = folder.load_normalization(tmp_path / "teacher")
    _, val = data.split_train_val(train, 0.2, 9)
    loss, accuracy = _val_loss_accuracy(state, norm, val)
    assert history[-1]["val_accuracy"] == pytest.approx(accuracy)
    assert history[-1]["val_loss"] == pytest.approx(loss, rel=1e-4)
    _, own_val = data.split_train_val(train, 0.2, cfg.seed)
    assert _val_loss_accuracy(state, norm, own_val)[0] != pytest.approx(loss, rel=1e-4)

    seeds_asked = []

    class Stop(Exception):
        pass

    def split_train_val(split, fraction, seed):
        seeds_asked.append(seed)
        raise Stop  # the seed is all this test reads of the evaluation

    monkeypatch.setattr(report.data, "split_train_val", split_train_val)
    with pytest.raises(Stop):
        report.evaluate_run(tmp_path / "teacher", train=train, test=test)
    assert seeds_asked == [9]
    monkeypatch.undo()

    for name, val_seed, seeds in (("shared", 9, 2), ("own", None, 1)):
        logs = []
        student = dataclasses.replace(cfg, seed=5, val_seed=val_seed, seeds=seeds, epochs=1,
                                      teacher=str(tmp_path / "teacher"))
        train_and_evaluate(student, tmp_path / name, train=train, test=test, log_fn=logs.append,
                           progress=False)
        notes = [line for line in logs if line.startswith("note: teacher")]
        if val_seed == 9:  # both seeds hold out the teacher's split, as their folders say
            assert notes == []
            assert [folder.load_config(path).split_seed
                    for path in folder.seed_run_dirs(tmp_path / name)] == [9, 9]
        else:
            assert len(notes) == 1 and "--val-seed 5 (the seed of this run's split)" in notes[0]
