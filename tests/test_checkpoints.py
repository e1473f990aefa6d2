"""Checkpoints (latest and best kept), early stopping, and --resume giving the same bytes."""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from fmnist_jax.run import checkpoints, folder
from fmnist_jax.run.presets import get_config
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer, make_plateau
from fmnist_jax.steps import create_train_state
from tests.helpers import (REPO, make_split, one_error_line, read_tensorboard_scalars,
                           run_script, start_script, tiny_config, train_quietly)


def _val_config(**overrides):
    """The tiny run with a validation split (so a best epoch exists) and a plateau schedule
    (so the checkpoint must carry its state too)."""
    return get_config(**{"epochs": 4, "batch_size": 32, "eval_batch_size": 100,
                         "val_fraction": 0.2, "seed": 4, "decay": "plateau",
                         "plateau_patience": 1, **overrides})


def _splits():
    return make_split(512, seed=0), make_split(300, seed=1)


def _fake_state(value: float):
    return {"params": {"w": np.full((3, 2), value, np.float32)}, "step": np.int32(value)}


def test_the_latest_and_the_best_checkpoint_both_survive(tmp_path):
    manager = checkpoints.Checkpoints(tmp_path)
    # Epochs 1 and 2 raise the best validation accuracy; 3 does not.
    for epoch, best_epoch in [(1, 1), (2, 2), (3, 2)]:
        manager.save(epoch, _fake_state(epoch), best_epoch=best_epoch)
    assert manager.epochs() == [2, 3]
    manager.close()
    # Taken back (a resume): the best epoch's checkpoint survives the next saves too.
    manager = checkpoints.Checkpoints(tmp_path)
    manager.save(4, _fake_state(4), best_epoch=2)
    assert manager.epochs() == [2, 4]
    assert manager.latest_epoch() == 4
    restored = manager.restore(2, _fake_state(0))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2, np.float32))
    assert int(restored["step"]) == 2
    # Restored onto this machine's first device, wherever it was written (explicit targets).
    assert restored["params"]["w"].sharding.device_set == {jax.local_devices()[0]}
    manager.save(5, _fake_state(5), best_epoch=5)
    assert manager.epochs() == [5]
    manager.close()


# Run with two CPU devices: saves a state placed on device 1, then restores it onto device 0
# and onto device 1, each time as the state given to `restore` is placed.
_TWO_DEVICES = """
import json, sys
from pathlib import Path
import jax, numpy as np
from fmnist_jax.run import checkpoints

device_0, device_1 = jax.devices()
def placed(value, device):
    return {"params": {"w": jax.device_put(np.full((3, 2), value, np.float32), device)},
            "step": jax.device_put(np.int32(value), device)}
manager = checkpoints.Checkpoints(Path(sys.argv[1]))
manager.save(1, placed(5, device_1))
restored = {name: manager.restore(1, placed(0, device))
            for name, device in (("on_0", device_0), ("on_1", device_1))}
manager.close()
print(json.dumps({name: {"devices": sorted(d.id for leaf in jax.tree_util.tree_leaves(state)
                                           for d in leaf.devices()),
                         "w": state["params"]["w"].tolist(), "step": int(state["step"])}
                  for name, state in restored.items()}))
"""


@pytest.mark.slow
def test_a_checkpoint_written_on_another_device_restores_here(tmp_path):
    """As a checkpoint written on a GPU restores on a CPU-only machine: the saved sharding
    names a device, and `restore` places each array as the target state says instead."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = [[5.0, 5.0]] * 3
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "on_0": {"devices": [0, 0], "w": stored, "step": 5},
        "on_1": {"devices": [1, 1], "w": stored, "step": 5}}
    # What orbax recorded: device 1, which this process (one CPU device) may not have.
    sharding = json.loads((tmp_path / folder.CHECKPOINTS_DIR / "1" / "default" /
                           "_sharding").read_text())
    assert {json.loads(v)["device_str"] for v in sharding.values()} == {"cpu:1"}
    manager = checkpoints.Checkpoints(tmp_path)
    restored = manager.restore(1, _fake_state(0))
    manager.close()
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 5, np.float32))
    assert restored["params"]["w"].sharding.device_set == {jax.local_devices()[0]}


def test_without_a_validation_split_only_the_latest_is_kept(tmp_path):
    manager = checkpoints.Checkpoints(tmp_path)
    for epoch in (1, 2, 3):
        manager.save(epoch, _fake_state(epoch))
    assert manager.epochs() == [3]
    manager.close()


# ---------------------------------------------------------------------------------------
# Each checkpoint's manifest (sha256.json), checked before a resume trusts the checkpoint


def _checkpoint_files(path):
    return {str(p.relative_to(path)) for p in path.rglob("*")
            if p.is_file() and p.name != checkpoints.MANIFEST}


def _largest_file(path):
    return max((p for p in path.rglob("*") if p.is_file() and p.name != checkpoints.MANIFEST),
               key=lambda p: p.stat().st_size)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _save_best_1_and_latest_3(run_dir):
    manager = checkpoints.Checkpoints(run_dir)
    for epoch, best_epoch in [(1, 1), (2, 1)]:
        manager.save(epoch, _fake_state(epoch), best_epoch=best_epoch)
    manager.close()
    manager = checkpoints.Checkpoints(run_dir)  # taken back, as a resume does
    manager.save(3, _fake_state(3), best_epoch=1)
    assert manager.epochs() == [1, 3]
    manager.close()


def test_every_checkpoint_has_a_manifest_that_later_saves_leave_true(tmp_path):
    _save_best_1_and_latest_3(tmp_path)
    for epoch in (1, 3):
        path = tmp_path / folder.CHECKPOINTS_DIR / str(epoch)
        sums = json.loads((path / checkpoints.MANIFEST).read_text())
        assert set(sums) == _checkpoint_files(path)
        assert "_CHECKPOINT_METADATA" in sums
    checkpoints.check_checkpoints(tmp_path)  # orbax changed no file of epoch 1 since its save


@pytest.mark.parametrize("damage", ["flip", "delete"])
@pytest.mark.parametrize("epoch, to_delete", [(3, (3,)), (1, (1, 3))])
def test_a_damaged_checkpoint_is_refused_before_it_is_restored(tmp_path, damage, epoch,
                                                               to_delete):
    """The latest (which a resume restores) or the best (which it keeps as the model): one
    line naming the file, and the folders to delete so that the resume goes on from before
    the damaged one."""
    _save_best_1_and_latest_3(tmp_path)
    checkpoints_dir = tmp_path / folder.CHECKPOINTS_DIR
    path = _largest_file(checkpoints_dir / str(epoch))
    name = str(path.relative_to(checkpoints_dir / str(epoch)))
    if damage == "flip":
        _flip_a_byte(path)
    else:
        path.unlink()
    folders = " and ".join(str(checkpoints_dir / str(e)) for e in to_delete)
    expected = (f"the checkpoint of epoch {epoch} in {checkpoints_dir} is damaged ({name} "
                f"{'does not match its checksum' if damage == 'flip' else 'is missing'}): "
                f"delete {folders} and resume from an earlier epoch")
    with pytest.raises(FmnistError) as error:
        checkpoints.check_checkpoints(tmp_path)
    assert str(error.value) == expected
    manager = checkpoints.Checkpoints(tmp_path)
    with pytest.raises(FmnistError) as error:
        manager.restore(epoch, _fake_state(0))
    manager.close()
    assert str(error.value) == expected


def test_a_checkpoint_without_a_manifest_still_restores(tmp_path):
    """As versions before the manifests wrote them."""
    _save_best_1_and_latest_3(tmp_path)
    for manifest in (tmp_path / folder.CHECKPOINTS_DIR).glob(f"*/{checkpoints.MANIFEST}"):
        manifest.unlink()
    checkpoints.check_checkpoints(tmp_path)
    manager = checkpoints.Checkpoints(tmp_path)
    restored = manager.restore(3, _fake_state(0))
    manager.close()
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 3, np.float32))


def _killed_copy_of_the_tiny_run(tiny_run, target):
    """The finished tiny run (no validation split: its one checkpoint, epoch 2, is the
    latest and the model) as a kill just before best.json leaves it."""
    shutil.copytree(tiny_run[0], target)
    (target / folder.BEST_FILE).unlink()
    return target / folder.CHECKPOINTS_DIR / "2"


def test_resume_refuses_a_damaged_latest_checkpoint_before_training(tmp_path, tiny_run,
                                                                    tiny_splits):
    latest = _killed_copy_of_the_tiny_run(tiny_run, tmp_path / "run")
    _flip_a_byte(_largest_file(latest))
    run = folder.reopen(tmp_path / "run")
    with pytest.raises(FmnistError, match=f"the checkpoint of epoch 2 in {latest.parent} is "
                                          f"damaged .*: delete {latest} and resume"):
        train_quietly(run.config, run, tiny_splits)
    folder.reopen(tmp_path / "run").release()  # refused, the run was given back


@pytest.mark.slow  # the resume compiles the epoch
def test_non_finite_weights_are_never_handed_on_by_a_resume(tmp_path, tiny_run, tiny_splits):
    """A resume whose latest checkpoint is the model (no epoch left to train), with NaN
    weights that match their manifest: refused where best.json would be written."""
    latest = _killed_copy_of_the_tiny_run(tiny_run, tmp_path / "run")
    state = tiny_run[1].replace(params=jax.tree_util.tree_map(
        lambda w: w.at[(0,) * w.ndim].set(np.nan), tiny_run[1].params))
    shutil.rmtree(latest)
    manager = checkpoints.Checkpoints(tmp_path / "run")
    manager.save(2, state)
    manager.close()
    run = folder.reopen(tmp_path / "run")
    with pytest.raises(FmnistError, match=f"{latest} holds NaN or infinite weights"):
        train_quietly(run.config, run, tiny_splits)
    assert not (tmp_path / "run" / folder.BEST_FILE).exists()


@pytest.mark.slow  # the resume compiles the epoch
def test_a_run_begun_with_a_setting_that_changes_nothing_still_resumes_and_evaluates(
        tmp_path, tiny_run, tiny_splits):
    """Its config.json and claim.json as an earlier version wrote them, with momentum 0.5 for
    adam (which a new run refuses): the run is resumed and then loads for its evaluation."""
    from fmnist_jax.evaluation.report import load_run

    _killed_copy_of_the_tiny_run(tiny_run, tmp_path / "run")
    for name, inner in ((folder.CONFIG_FILE, False), (folder.CLAIM_FILE, True)):
        path = tmp_path / "run" / name
        fields = json.loads(path.read_text())
        (fields["config"] if inner else fields)["momentum"] = 0.5
        path.write_text(json.dumps(fields))
    run = folder.reopen(tmp_path / "run")
    assert run.config.momentum == 0.5 and run.config.optimizer == "adam"
    train_quietly(run.config, run, tiny_splits)
    assert load_run(tmp_path / "run").config == run.config


# Under a file size limit (a full disk's stand-in that needs no root): saves of many arrays,
# each ended by its first failed write while the others are still under way (whose reports
# came in most tries before the fix; three saves, so that one of them shows them). The first
# save's error is printed, as the command line would.
_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from fmnist_jax.errors import FmnistError
from fmnist_jax.run import checkpoints

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
manager = checkpoints.Checkpoints(Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
rng = np.random.default_rng(0)  # incompressible: the data files outgrow the limit
state = {f"w{i}": rng.random(2000, np.float32) for i in range(300)}
errors = []
for epoch in (1, 2, 3):
    try:
        manager.save(epoch, state)
    except FmnistError as e:
        errors.append(e)
manager.close()
print(f"error: {errors[0]}", file=sys.stderr)
sys.exit(len(errors) == 3)
"""


@pytest.mark.slow
def test_a_save_on_a_full_disk_ends_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=120)
    assert one_error_line(result) == (
        f"error: saving the checkpoint of epoch 1 to {tmp_path / folder.CHECKPOINTS_DIR} "
        f"failed (File too large): free some space, then continue with --resume")


def test_a_long_first_line_is_cut_between_words():
    from fmnist_jax.files import first_line

    message = "Error writing local file " + '"/a/very/long/path/to/the/checkpoint" ' * 8
    line = first_line(ValueError(message), 100)
    assert line == 'Error writing local file "/a/very/long/path/to/the/checkpoint" ' + (
        '"/a/very/long/path/to/the/checkpoint" ...')
    assert first_line(ValueError("short")) == "short"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(run_dir, state, history) of the 4-epoch validation run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    state, history = train_quietly(_val_config(), run_dir, _splits())
    return run_dir, state, history


def _as_if_killed(source, target, *, keep_checkpoints, history_tail=b""):
    """A copy of the finished run `source` as a kill would have left it: no best.json,
    only the checkpoints of `keep_checkpoints`, and `history_tail` after the history."""
    shutil.copytree(source, target)
    (target / folder.BEST_FILE).unlink()
    for step_dir in (target / folder.CHECKPOINTS_DIR).iterdir():
        if int(step_dir.name) not in keep_checkpoints:
            shutil.rmtree(step_dir)
    with open(target / folder.HISTORY_FILE, "ab") as f:
        f.write(history_tail)


def _best_without_sums(run_dir):
    """best.json less the checksums, which differ between two saves of the same state (orbax
    names its data files at random and records the time)."""
    best = checkpoints.load_best(run_dir)
    assert set(best.pop(folder.CHECKPOINT_SUMS)) >= {"_CHECKPOINT_METADATA",
                                                      "default/_METADATA"}
    return best


def _assert_same_run(a, b, cfg):
    assert (a / folder.HISTORY_FILE).read_bytes() == (b / folder.HISTORY_FILE).read_bytes()
    assert _best_without_sums(a) == _best_without_sums(b)
    # The events too: the resumed run's hold each epoch once, with the same values.
    assert read_tensorboard_scalars(a / folder.TENSORBOARD_DIR) == read_tensorboard_scalars(
        b / folder.TENSORBOARD_DIR)
    jax.tree_util.tree_map(np.testing.assert_array_equal, checkpoints.load_variables(a, cfg),
                           checkpoints.load_variables(b, cfg))


@pytest.mark.slow
@pytest.mark.parametrize("keep, tail", [
    ((1, 2), b'{"epoch": 3, "learning_ra'),  # killed while writing epoch 3's row
    ((), b""),  # killed before the first checkpoint: starts over in the same folder
    ((1, 2, 3, 4), b""),  # killed after the last checkpoint, before best.json
])
def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path, uninterrupted, keep, tail):
    """In-process kills, simulated: the folder as a kill at that moment leaves it (the
    finished run keeps the best epoch's checkpoint and the last)."""
    source, state, history = uninterrupted
    kept = [e for e in keep if (source / folder.CHECKPOINTS_DIR / str(e)).is_dir()]
    target = tmp_path / "run"
    _as_if_killed(source, target, keep_checkpoints=kept, history_tail=tail)
    run = folder.reopen(target)
    resumed_state, resumed_history = train_quietly(run.config, run, _splits())
    assert resumed_history == history
    _assert_same_run(source, target, _val_config())
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_state.opt_state,
                           state.opt_state)
    np.testing.assert_array_equal(resumed_state.plateau.scale, state.plateau.scale)


@pytest.mark.slow  # `uninterrupted` trains 4 epochs of another shape: shared with the slow tests
def test_the_run_keeps_the_latest_and_the_best_epoch(uninterrupted):
    run_dir, _, history = uninterrupted
    best = checkpoints.load_best(run_dir)
    best_epoch = max(history, key=lambda row: (row["val_accuracy"], -row["epoch"]))["epoch"]
    assert best["epoch"] == best_epoch and best["chosen_by"] == "val_accuracy"
    assert best["epochs_trained"] == 4 and not best["stopped_early"]
    manager = checkpoints.Checkpoints(run_dir)
    assert manager.epochs() == sorted({best_epoch, 4})
    # The model is the best epoch's checkpoint's parameters.
    cfg = _val_config()
    like = create_train_state(get_model(cfg.model), make_optimizer(cfg, 12),
                              jax.random.key(0), plateau_tx=make_plateau(cfg))
    stored = manager.restore(best_epoch, like)
    manager.close()
    jax.tree_util.tree_map(np.testing.assert_array_equal, stored.params,
                           checkpoints.load_variables(run_dir, cfg)["params"])


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path):
    cfg = _val_config(epochs=12, patience=1, decay="constant", plateau_patience=3)
    _, history = train_quietly(cfg, tmp_path / "run", _splits())
    best = checkpoints.load_best(tmp_path / "run")
    assert best["stopped_early"] and best["epochs_trained"] == len(history) < 12
    assert len(history) == best["epoch"] + 1  # one epoch without a rise, with patience 1
    assert history[-1]["val_accuracy"] <= best["val_accuracy"]


def test_patience_needs_a_validation_split():
    with pytest.raises(FmnistError, match="patience needs a validation split"):
        get_config(patience=3, val_fraction=0.0)


def test_a_finished_run_is_not_reopened(tiny_run):
    run_dir, _, _ = tiny_run
    assert folder.finished(run_dir)
    with pytest.raises(FmnistError, match="has finished training"):
        folder.reopen(run_dir)


def test_a_run_in_training_cannot_be_reopened_twice(tmp_path):
    run = folder.claim(tmp_path / "run", tiny_config())
    with pytest.raises(FmnistError, match="being trained by another process"):
        folder.reopen(tmp_path / "run")
    run.release()
    resumed = folder.reopen(tmp_path / "run")
    folder.abandon(resumed)  # a resumed run keeps its folder, and gives its lock back
    assert folder.load_config(tmp_path / "run") == tiny_config()
    folder.reopen(tmp_path / "run").release()


@pytest.mark.slow
def test_a_damaged_history_is_refused_on_resume(tmp_path, uninterrupted):
    source, _, _ = uninterrupted
    _as_if_killed(source, tmp_path / "run", keep_checkpoints=[4])
    (tmp_path / "run" / folder.HISTORY_FILE).write_text('{"epoch": 1}\n')
    run = folder.reopen(tmp_path / "run")
    with pytest.raises(FmnistError, match="does not hold epochs 1 to 4"):
        train_quietly(run.config, run, _splits())


def test_resume_of_a_finished_run_says_so_and_exits_0(tiny_run):
    result = run_script("train.py", "--resume", tiny_run[0])  # a real process: its exit 0
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(
        f"{tiny_run[0]} has already finished training: nothing to resume (it has no evaluation "
        f"report: python scripts/evaluate.py {tiny_run[0]})")


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "8"], "--batch-size 8 contradicts the run's config (32)"),
    (["--preset", "mlp"], "--preset cannot change a resumed run"),
    (["--workdir", "elsewhere"], "--workdir and --resume both name a run folder"),
    (["--teacher", "runs/x"], "--teacher runs/x contradicts the run's config (none)"),
])
def test_resume_with_contradicting_flags_is_one_line(tiny_run, flags, message, run_main):
    assert message in one_error_line(run_main("train.py", "--resume", tiny_run[0], *flags))


@pytest.mark.parametrize("flags", [["--resume", ""], ["--resume="], ["--resume", " "]])
def test_an_empty_resume_is_refused_not_read_as_a_new_run(flags, tmp_path, run_main):
    result = run_main("train.py", *flags, "--data-dir", tmp_path / "none")
    assert one_error_line(result) == ("error: --resume needs the run folder to continue, got an "
                                      "empty value")


def test_resume_of_a_folder_that_is_no_run_is_one_line(tmp_path, run_main):
    assert "is not a run folder" in one_error_line(run_main("train.py", "--resume",
                                                            tmp_path))


def test_repeating_the_stored_config_with_resume_is_allowed(tiny_run, run_main):
    result = run_main("train.py", "--resume", tiny_run[0], "--batch-size", "32", "--seed", "4",
                      "--teacher", "none")  # the run's own: none, as --help says
    assert result.returncode == 0 and "already finished" in result.stdout, result.stderr


@pytest.mark.slow  # evaluate_run compiles a dozen metrics (test_report.py is slow for that too)
def test_report_and_predict_say_which_epoch(tmp_path, uninterrupted):
    from fmnist_jax.evaluation.predict import format_text, load_predictor
    from fmnist_jax.evaluation.report import evaluate_run

    run_dir, _, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    best = checkpoints.load_best(copy)
    report = evaluate_run(copy, train=_splits()[0], test=_splits()[1], n_resamples=10,
                          log_fn=lambda s: None)
    assert report["epoch"] == best["epoch"]
    assert f"parameters of epoch {best['epoch']}, the best validation accuracy" in (
        copy / folder.REPORT_TEXT_FILE).read_text()
    assert json.loads((copy / folder.REPORT_JSON_FILE).read_text())["epochs_trained"] == 4
    predictor = load_predictor(copy)
    assert predictor.epoch == best["epoch"]
    assert f"(epoch {best['epoch']})" in format_text(copy, predictor, [])


# ---------------------------------------------------------------------------------------
# Killed for real: scripts/train.py gets SIGKILL at several moments, then --resume. One
# moment per state a kill can leave on disk: nothing trained yet (compiled), a complete
# checkpoint and its history row with the next epoch under way (during epoch 2: the epoch
# line is printed after the synchronous save, so right after it is the same state), and a
# checkpoint half written (a save after the first; three epochs give two chances to see one).

KILL_FLAGS = ("--epochs", "3", "--batch-size", "1000", "--val-fraction", "0.1",
              "--no-report", "--no-progress")


def _wait_for_line(process, prefix):
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the training ended before printing {prefix!r}")


def _kill_when_compiled(process, run_dir):
    _wait_for_line(process, "compiled train epoch")


def _kill_during_epoch_2(process, run_dir):
    _wait_for_line(process, "epoch   1")
    time.sleep(0.5 * json.loads((run_dir / folder.TIMING_FILE).read_text().splitlines()[1])[
        "train_seconds"])


def _kill_during_a_checkpoint_save(process, run_dir):
    """The moment orbax's temporary folder of a checkpoint after the first appears."""
    checkpoints_dir = run_dir / folder.CHECKPOINTS_DIR
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        names = os.listdir(checkpoints_dir) if checkpoints_dir.is_dir() else []
        if any("tmp" in name and not name.startswith("1") for name in names):
            return
    raise AssertionError("no checkpoint save was seen")


@pytest.fixture(scope="module")
def uninterrupted_script_run(tmp_path_factory, prepared_data_dir):
    run_dir = tmp_path_factory.mktemp("script") / "run"
    result = run_script("train.py", *KILL_FLAGS, "--workdir", run_dir, "--data-dir",
                        prepared_data_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("kill", [_kill_when_compiled, _kill_during_epoch_2,
                                  _kill_during_a_checkpoint_save])
def test_a_killed_training_resumes_to_the_same_bytes(tmp_path, prepared_data_dir,
                                                     uninterrupted_script_run, kill):
    run_dir = tmp_path / "run"
    process = start_script("train.py", *KILL_FLAGS, "--workdir", run_dir, "--data-dir",
                           prepared_data_dir)
    with process:  # on the way out: its pipe closed, the process waited for
        try:
            kill(process, run_dir)
        finally:
            process.send_signal(signal.SIGKILL)
    assert not folder.finished(run_dir)
    result = run_script("train.py", "--resume", run_dir, "--no-report", "--no-progress",
                        "--data-dir", prepared_data_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(uninterrupted_script_run, run_dir, folder.load_config(run_dir))
    print(kill.__name__, result.stdout.splitlines()[:1],
          [line for line in result.stdout.splitlines() if line.startswith("resumed")])
