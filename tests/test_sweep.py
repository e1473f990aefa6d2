"""Sweeps (`--sweep`): the grid in the config, the swept values as arrays (in the optimizer's
state and the TrainState), each member equal to the single run of its point and seed, resume."""

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax.errors import FmnistError
from fmnist_jax.optim import make_optimizer, with_hyperparams
from fmnist_jax.run import checkpoints, folder
from fmnist_jax.run.config import canonical_sweep, parse_sweep
from fmnist_jax.run.presets import get_config
from fmnist_jax.run.history import load_history
from fmnist_jax.run.sweep import plot_sweep, table_lines
from tests.helpers import make_split, one_error_line, train_quietly


def test_the_grid_gives_each_point_and_seed_a_member_with_its_folder():
    cfg = get_config(optimizer="adamw", seeds=2, seed=3,
                     sweep="learning_rate=0.001,0.003;weight_decay=0.0,0.0005")
    assert cfg.many and len(cfg.points()) == 4
    members = cfg.members()
    assert [(m.learning_rate, m.weight_decay, m.seed) for m in members[:3]] == [
        (0.001, 0.0, 3), (0.001, 0.0, 4), (0.001, 0.0005, 3)]
    assert all(m.sweep == "" and m.seeds == 1 and not m.many for m in members)
    assert cfg.member_names()[:3] == ["lr=0.001,wd=0/seed-3", "lr=0.001,wd=0/seed-4",
                                      "lr=0.001,wd=0.0005/seed-3"]
    assert canonical_sweep(["learning-rate=1e-3,3e-3", "crop_padding=0,2"]) == (
        "learning_rate=0.001,0.003;crop_padding=0,2")
    assert parse_sweep("crop_padding=0,2") == {"crop_padding": (0, 2)}


@pytest.mark.parametrize("sweep, words", [
    ("model=1,2", "model cannot be swept"),
    ("batch_size=32,64", "batch size cannot be swept"),
    ("learning_rate=0.001,fast", "learning_rate takes float values"),
    ("crop_padding=1.5", "crop_padding takes int values"),
    ("learning_rate=0.001,1e-3", "repeats a value"),
    ("learning_rate=0.001;learning_rate=0.01", "gives learning_rate twice"),
    ("learning_rate=0.001,-1", "learning rate must be positive"),
    ("weight_decay=0,0.1", "is ignored by optimizer 'adam'"),
])
def test_a_bad_grid_is_refused_naming_the_field(sweep, words):
    with pytest.raises(FmnistError, match=words):
        get_config(sweep=sweep)


def test_a_sweep_needs_a_validation_split():
    with pytest.raises(FmnistError, match="chooses its point by validation"):
        get_config(sweep="learning_rate=0.001,0.003", val_fraction=0.0)


def test_train_refuses_a_program_changing_field_in_one_line(tmp_path, run_main):
    result = run_main("train.py", "--sweep", "epochs=5,10", "--workdir", tmp_path / "run")
    assert result.returncode == 1
    assert one_error_line(result).startswith("error: --sweep 'epochs=5,10': epochs cannot be "
                                             "swept")
    assert "learning_rate, weight_decay, label_smoothing" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_flag_the_sweep_would_override(tmp_path, run_main):
    result = run_main("train.py", "--learning-rate", "0.01", "--sweep",
                      "learning_rate=0.001,0.003", "--workdir", tmp_path / "run")
    assert one_error_line(result) == ("error: --learning-rate 0.01 and --sweep "
                                      "learning_rate=... both set learning rate: drop "
                                      "--learning-rate, or its part of --sweep")
    assert not (tmp_path / "run").exists()
    # A swept field the preset sets (lenet5-best's weight decay) needs no flag dropped.
    assert get_config("lenet5-best", sweep="weight_decay=0.01,0.05").weight_decay == 0.05


def _updates_after(tx, opt_state, steps=20):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    update = jax.jit(tx.update)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda x, i=i: jnp.sin(3.0 * x * (i + 1)), params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("preset, overrides", [  # plain Adam slow: the others hold more
    pytest.param("lenet5", {}, marks=pytest.mark.slow),
    ("lenet5-best", {"epochs": 2, "warmup_epochs": 1.0}), ("mlp", {})])
def test_the_swept_optimizer_equals_the_plain_one_bit_for_bit(preset, overrides):
    """Only the swept values are injected, so a member computes what its single run does;
    optax's inject_hyperparams(adam) does not (its b1, b2 and eps become float32 arrays:
    optax#1532), which is why they are left out."""
    cfg = get_config(preset, **overrides)
    swept = ("learning_rate", "weight_decay") if cfg.optimizer == "adamw" else (
        "learning_rate",)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    plain, injected = make_optimizer(cfg, 8), make_optimizer(cfg, 8, swept=swept)
    expected = _updates_after(plain, plain.init(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, expected,
                           _updates_after(injected, injected.init(params)))
    # Another point's values, set in the state, give that point's plain optimizer.
    other = get_config(preset, **{**overrides, "learning_rate": 0.01})
    moved = with_hyperparams(injected.init(params), {"learning_rate": 0.01})
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           _updates_after(make_optimizer(other, 8),
                                          make_optimizer(other, 8).init(params)),
                           _updates_after(injected, moved))
    whole_adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    differs = _updates_after(whole_adam, whole_adam.init(params))
    plain_adam = optax.adam(1e-3)
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), differs,
        _updates_after(plain_adam, plain_adam.init(params)))))


SUMMARY = {"fields": ["learning_rate"], "seeds": 2, "chosen": {
        "index": 1, "folder": "lr=0.003", "test_accuracy": {"mean": 0.5, "interval": [0.4, 0.6]}},
        "points": [{"point": {"learning_rate": 0.001},
                    "val_accuracy": {"mean": 0.8, "interval": [0.7, 0.9]},
                    "test_accuracy": {"mean": 0.9}},
                   {"point": {"learning_rate": 0.003},
                    "val_accuracy": {"mean": 0.85, "interval": [0.8, 0.9]},
                    "test_accuracy": {"mean": 0.5}}]}


def test_the_table_marks_the_point_chosen_by_validation():
    lines = table_lines(SUMMARY)
    assert lines[2].endswith("<- chosen") and "0.003" in lines[2]
    assert not lines[1].endswith("<- chosen")
    assert lines[-1].startswith("chosen by validation accuracy: lr=0.003 (mean of 2 seeds)")


def test_the_sweep_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / folder.SWEEP_PLOT_FILE
    plot_sweep(SUMMARY, path)
    assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == [path.name]
    path.write_bytes(b"the old figure")

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder, "write_atomically", full_disk)
    with pytest.raises(FmnistError, match=rf"^cannot write {path} \(No space left on device\)"):
        plot_sweep(SUMMARY, path)
    assert path.read_bytes() == b"the old figure"


def _splits():
    return make_split(512, seed=0), make_split(300, seed=1)


@pytest.mark.slow
def test_members_equal_single_runs_and_the_sweep_resumes(tmp_path):
    """A 2 x 2 grid (learning rate, label smoothing) with a plateau schedule, early stopping
    and a moving average: each member equals the single run of its point and seed (one after
    another on a CPU: to the last bits but float32's rounding of the swept constants); a
    member resumed alone, and the whole folder resumed, end as the uninterrupted sweep."""
    cfg = get_config(epochs=3, batch_size=32, eval_batch_size=100, val_fraction=0.2, seed=4,
                     decay="plateau", plateau_patience=0, patience=1, ema_decay=0.5,
                     sweep="learning_rate=0.001,0.01;label_smoothing=0.0,0.1")
    _, histories = train_quietly(cfg, tmp_path / "sweep", _splits())
    dirs = folder.seed_run_dirs(tmp_path / "sweep")
    assert [d.relative_to(tmp_path / "sweep").as_posix() for d in dirs] == cfg.member_names()
    sweep = json.loads((tmp_path / "sweep" / folder.SWEEP_FILE).read_text())
    vals = [row["val_accuracy"]["mean"] for row in sweep["points"]]
    assert sweep["chosen"]["index"] == int(np.argmax(vals))
    assert (tmp_path / "sweep" / folder.SWEEP_PLOT_FILE).stat().st_size > 1000
    assert folder.finished(tmp_path / "sweep")
    for m, (member, member_dir) in enumerate(zip(cfg.members(), dirs)):
        _, single = train_quietly(member, tmp_path / f"single-{m}", _splits())
        assert folder.load_config(member_dir) == member
        assert len(histories[m]) == len(single)
        for row, single_row in zip(histories[m], single):
            np.testing.assert_allclose(list(row.values()), list(single_row.values()),
                                       rtol=1e-4, atol=1e-5)
        # Adam's step does not shrink with its gradient: a weight whose gradient is near 0
        # moves by up to the learning rate in a direction that rounding picks, so the weights
        # are compared to a tenth of the larger rate, 0.01.
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
            checkpoints.load_variables(member_dir, member),
            checkpoints.load_variables(tmp_path / f"single-{m}", member))
    # A member killed before its best.json: resumed alone, it ends the same.
    member_dir, member = dirs[3], cfg.members()[3]
    kept = checkpoints.load_variables(member_dir, member)
    (member_dir / folder.BEST_FILE).unlink()
    shutil.rmtree(member_dir / folder.CHECKPOINTS_DIR / str(len(histories[3])))
    train_quietly(member, folder.reopen(member_dir), _splits())
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           checkpoints.load_variables(member_dir, member), kept)
    # The whole folder, every member cut back to its first checkpoint, resumed.
    target = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sweep", target)
    (target / folder.SWEEP_FILE).unlink()
    for d in folder.seed_run_dirs(target):
        (d / folder.BEST_FILE).unlink()
        for epoch_dir in (d / folder.CHECKPOINTS_DIR).iterdir():
            if epoch_dir.name != "1":
                shutil.rmtree(epoch_dir)
    assert not folder.finished(target)
    run = folder.reopen(target)
    train_quietly(run.config, run, _splits())
    for a, b in zip(folder.seed_run_dirs(tmp_path / "sweep"), folder.seed_run_dirs(target)):
        assert load_history(a) == load_history(b)
    resumed = json.loads((target / folder.SWEEP_FILE).read_text())
    assert resumed == json.loads((tmp_path / "sweep" / folder.SWEEP_FILE).read_text())
