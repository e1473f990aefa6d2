"""Data parallel training: the same numbers on 1 device, 4 devices, and 2 processes x 2 devices.

The device count is fixed once jax starts, so runs with forced CPU devices happen in
subprocesses (`parallel.use_cpu_devices`, i.e. `jax_num_cpu_devices`); this process has one.
"""

import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.run import checkpoints, folder, parallel, results
from fmnist_jax.run.history import load_history
from tests.helpers import (REPO, make_split, one_error_line, run_script, tiny_config,
                           train_quietly)

# A split of the batch changes the order of float sums (each device sums its slice, then the
# all-reduce adds the partial sums): equal within this, not bit for bit.
ATOL = 2e-5

# Trains the shared tiny run (tests/helpers.py; as a run of $SEEDS seeds when set, for
# $EPOCHS epochs when set) into argv[1], with argv[2] CPU devices in this process and, given
# argv[3:5] = (process count, process id) and $COORDINATOR, several processes; then reports
# its devices. $LOCKSTEP set: the seeds train in lockstep as on a GPU (groups by the greatest
# common divisor, the batches split within each), not one after another as a CPU trains
# them. $RESUME set: argv[1] is taken back (`folder.reopen`) and its run continued.
_WORKER = """
import dataclasses, json, os, sys
from fmnist_jax.run import parallel
parallel.use_cpu_devices(int(sys.argv[2]))
if os.environ.get("LOCKSTEP"):
    parallel.members_at_once_for = lambda platform: None
n, i = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 3 else (1, 0)
parallel.initialize_distributed(parallel.distributed_settings(
    os.environ.get("COORDINATOR"), n, i))
import jax
from fmnist_jax.run import folder
from tests.helpers import make_split, tiny_config, train_quietly
cfg = dataclasses.replace(tiny_config(), seeds=int(os.environ.get("SEEDS", "1")),
                          epochs=int(os.environ.get("EPOCHS", tiny_config().epochs)))
run = folder.reopen(sys.argv[1]) if os.environ.get("RESUME") else sys.argv[1]
train_quietly(cfg, run, (make_split(512, seed=0), make_split(300, seed=1)))
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(),
                  "processes": jax.process_count()}))
"""


def _worker(run_dir, cpu_devices, *distributed, env=None):
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(run_dir), str(cpu_devices),
                             *map(str, distributed)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=300) -> dict:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _assert_same_run(run_dir, reference_dir):
    """Same history (within float rounding) and the same final parameters."""
    history, reference = load_history(run_dir), load_history(reference_dir)
    assert [row["epoch"] for row in history] == [row["epoch"] for row in reference]
    for row, ref in zip(history, reference):
        assert row.keys() == ref.keys()
        for name in row:
            assert row[name] == pytest.approx(ref[name], abs=ATOL), name
    cfg = tiny_config()
    chex.assert_trees_all_close(checkpoints.load_variables(run_dir, cfg),
                                checkpoints.load_variables(reference_dir, cfg), atol=ATOL)


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
    """The shared tiny run trained on 4 CPU devices of one process."""
    run_dir = tmp_path_factory.mktemp("four_devices")
    assert _finish(_worker(run_dir, 4)) == {"devices": 4, "local": 4, "processes": 1}
    return run_dir


@pytest.mark.slow
def test_four_devices_train_as_one(four_device_run, tiny_run):
    _assert_same_run(four_device_run, tiny_run[0])
    # Not trivially equal: the two runs did the sums in another order somewhere.
    four = checkpoints.load_variables(four_device_run, tiny_config())
    one = checkpoints.load_variables(tiny_run[0], tiny_config())
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(four),
                                                        jax.tree_util.tree_leaves(one)))


# One epoch of the MLP model (BatchNorm, dropout; argv[1] "mlp"), or of a tiny model of the
# same layers ("tiny"), with augmentation and clipping on tiny data, on the first device
# alone and on all 4, in one process; prints the largest differences. SGD, not the recipe's
# AdamW: Adam turns a gradient that is 0 in exact arithmetic (fc1's bias, which BatchNorm
# cancels) into +-learning-rate steps of whatever sign the rounding gives, so its parameters
# differ by about the learning rate on any change of summation order, split or not.
_MESHES = """
import dataclasses
import json
from fmnist_jax.run import parallel
parallel.use_cpu_devices(4)
import jax, numpy as np
from fmnist_jax import streams
from fmnist_jax.run.presets import get_config
from fmnist_jax.data import HALF
from fmnist_jax.run.compiled import CompiledEpochs, step_options
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.steps import create_train_state
from tests.helpers import make_split
import sys
import flax.linen as nn
class Tiny(nn.Module):  # the MLP's layers in small: Dense, BatchNorm, ReLU, Dropout
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x[:, ::4, ::4].reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)
model = Tiny() if sys.argv[1] == "tiny" else get_model("mlp")
cfg = get_config("mlp", batch_size=32, eval_batch_size=100, decay="constant", optimizer="sgd",
                 weight_decay=0.0, weight_decay_params="kernels", learning_rate=0.05)
train, test = make_split(128, seed=0), make_split(200, seed=1)
results = []
for devices in (jax.devices()[:1], jax.devices()):
    state = create_train_state(model, make_optimizer(cfg, 4),
                               streams.stream_key(0, streams.INIT))
    compiled = CompiledEpochs(state, (train.images_NxHxWx1, train.labels_N),
                              {"test": (test.images_NxHxWx1, test.labels_N)},
                              batch_size=32, eval_batch_size=100, norm=HALF,
                              key=jax.random.key(0), options=step_options(cfg),
                              parallel=parallel.data_parallel(devices))
    state, train_sums, _ = compiled.train(state, jax.random.key(1))
    sums = [train_sums, compiled.evaluate(state, "test")]
    results.append(jax.device_get(((state.params, state.batch_stats), sums)))
(one, one_sums), (four, four_sums) = results
leaves = list(zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(four)))
pairs = list(zip(one_sums, four_sums))
print(json.dumps({
    "variables": max(float(np.max(np.abs(a - b))) for a, b in leaves),
    "loss_relative": max(float(abs(a.loss - b.loss) / a.loss) for a, b in pairs),
    "counts_equal": all(int(a.correct) == int(b.correct) and int(a.count) == int(b.count)
                        for a, b in pairs),
    "bitwise_equal": all(np.array_equal(a, b) for a, b in leaves + pairs)}))
"""


@pytest.mark.slow  # a subprocess compiling two meshes' programs: 5 s for the tiny model
@pytest.mark.parametrize("model", ["tiny", "mlp"])
def test_batchnorm_dropout_and_augmentation_split_over_four_devices_as_on_one(model):
    result = subprocess.run([sys.executable, "-c", _MESHES, model], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # BatchNorm's statistics are the global batch's; dropout and augmentation draw the same
    # bits whatever the split (jax's partitionable threefry).
    assert report["variables"] <= 1e-5 and report["loss_relative"] <= 1e-5, report
    assert report["counts_equal"], report
    assert not report["bitwise_equal"]  # the 4 devices really split the sums


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes_of_two_devices(run_dir, env=None) -> list[dict]:
    """The worker's run in `run_dir` by 2 processes of 2 CPU devices each; their reports."""
    env = {"COORDINATOR": f"127.0.0.1:{_free_port()}", **(env or {})}
    workers = [_worker(run_dir, 2, 2, i, env=env) for i in range(2)]
    try:
        return [_finish(w) for w in workers]
    finally:
        for w in workers:
            w.kill()


@pytest.mark.slow
def test_two_processes_of_two_devices_train_as_one_of_four(tmp_path, four_device_run):
    assert _two_processes_of_two_devices(tmp_path) == [
        {"devices": 4, "local": 2, "processes": 2}] * 2
    _assert_same_run(tmp_path, four_device_run)
    # Process 0 alone wrote the files: one line per epoch, a checkpoint per epoch.
    assert len((tmp_path / folder.HISTORY_FILE).read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / folder.CHECKPOINTS_DIR).iterdir()) == ["2"]


def test_batch_sizes_must_split_over_the_devices():
    parallel.check_batch_sizes(64, 1000, 4)
    with pytest.raises(FmnistError, match="--batch-size 30 does not split over the 4 devices"):
        parallel.check_batch_sizes(30, 1000, 4)
    with pytest.raises(FmnistError, match="--eval-batch-size 999 .* multiple of 2"):
        parallel.check_batch_sizes(64, 999, 2)


@pytest.mark.slow
def test_an_uneven_batch_is_one_line_before_the_data_loads(tmp_path):
    # No data flags and an empty data dir: the batch check must come first.
    result = run_script("train.py", "--cpu-devices", 4, "--batch-size", 30, "--workdir",
                        tmp_path / "run", env={"FMNIST_DATA_DIR": str(tmp_path / "none"),
                                               "FMNIST_MANUAL_DIR": str(tmp_path / "none")})
    assert "--batch-size 30 does not split over the 4 devices" in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,env,message", [
    (["--num-processes", "2"], {}, "needs --coordinator-address"),
    (["--num-processes", "2", "--coordinator-address", "h:1"], {},
     "--num-processes 2 needs --process-id, this process's number in [0, 2)"),
    (["--num-processes", "2", "--coordinator-address", "h:1", "--process-id", "2"], {},
     "--process-id must be in [0, 2) for --num-processes 2, got 2"),
    (["--num-processes", "1", "--process-id", "3"], {},
     "--process-id 3 with --num-processes 1, whose one process is 0: pass the number of "
     "processes (more than 3), or drop --process-id"),
    ([], {"FMNIST_NUM_PROCESSES": "2", "FMNIST_COORDINATOR_ADDRESS": "localhost:1",
          "FMNIST_PROCESS_ID": "0"}, "several processes need --workdir"),
    (["--process-id", "1"], {}, "without --num-processes"),
])
def test_bad_distributed_settings_are_refused_before_joining(flags, env, message, monkeypatch,
                                                             capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from fmnist_jax.cli import train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(flags)
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err


def test_replicate_keeps_values_and_keys():
    dp = parallel.data_parallel()
    key = jax.random.key(7)
    tree = {"x": np.arange(6, dtype=np.int32), "key": key, "step": 0}
    placed = dp.replicate(tree)
    assert all(leaf.sharding == dp.replicated for leaf in jax.tree_util.tree_leaves(placed))
    np.testing.assert_array_equal(placed["x"], tree["x"])
    np.testing.assert_array_equal(jax.random.key_data(placed["key"]), jax.random.key_data(key))
    assert dp.replicate(placed)["x"] is placed["x"]  # already there: kept, not copied


# gloo prints "[Gloo] Rank R is connected to P peer ranks. Expected number of connected peer
# ranks is : P" from its own threads, whose writes can interleave mid-line: remove its phrases
# wherever they fall, then keep the lines left with text.
# Word by word: another thread's output can land in the middle of any of them.
_GLOO_PIECES = re.compile(r"\[Gloo\]|Rank\s*\d*|is connected to\s*\d*|peer ranks\.?|"
                          r"Expected number of connected|\bis\s*:\s*\d*")


def _ours(text: str) -> list[str]:
    """The lines of a process's output that are not gloo's. gloo's threads print their
    "[Gloo] Rank 3 is connected to ..." lines unsynchronized, so one can arrive cut into
    pieces or mixed with another: its pieces are removed wherever they are, and a line left
    with no letter (a stray rank number) is none of ours."""
    return [line for line in _GLOO_PIECES.sub("", text).splitlines()
            if re.search(r"[A-Za-z]", line)]


@pytest.mark.slow
def test_train_py_with_two_processes_logs_and_writes_once(tmp_path, prepared_data_dir):
    """The command line end to end: 2 processes of 2 CPU devices on the real data (a short
    epoch); process 0 alone logs, the run folder is finished and its parameters load."""
    results = _two_train_py(tmp_path / "logs", "--epochs", "1", "--val-fraction", "0.9",
                            "--batch-size", "256", "--workdir", tmp_path / "run",
                            "--no-progress", env={"FMNIST_DATA_DIR": str(prepared_data_dir)},
                            timeout=400)
    assert [code for code, _, _ in results] == [0, 0], results
    assert "device: 4 x cpu (cpu), data parallel over 2 processes" in results[0][1]
    assert "for the evaluation report, run: python scripts/evaluate.py" in results[0][1]
    assert _ours(results[1][1]) == [] and results[1][2] == []
    assert folder.finished(tmp_path / "run")
    assert len(load_history(tmp_path / "run")) == 1
    checkpoints.load_variables(tmp_path / "run", folder.load_config(tmp_path / "run"))


@pytest.mark.slow
def test_a_run_folder_process_0_refuses_stops_every_process_with_one_line(tmp_path, tiny_run):
    results = _two_train_py(tmp_path / "logs", "--workdir", tiny_run[0],
                            env={"FMNIST_DATA_DIR": str(tmp_path / "none")})
    assert [code for code, _, _ in results] == [1, 1], results
    assert results[0][2] == [f"error: {tiny_run[0]} already holds a run: pass another "
                             f"--workdir or delete it"]
    assert results[1][2] == [f"error: process 0 refused the run folder {tiny_run[0]}: see its "
                             f"error"]


def _two_train_py(logs, *args, env=None, timeout=240):
    """`scripts/train.py ARGS` as 2 processes of 2 CPU devices; [(returncode, stdout, our
    stderr lines after any note on joining)] for each. Their output goes to files in the folder `logs`, not pipes: a
    process whose pipe nobody reads while the test waits for the other could block on a
    full one (gloo and the coordination service may log much while the other exits), and
    the other then waits for it to shut down."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    logs.mkdir(parents=True, exist_ok=True)
    files = [(open(logs / f"out-{i}", "w+"), open(logs / f"err-{i}", "w+")) for i in range(2)]
    workers = [subprocess.Popen(
        [sys.executable, "scripts/train.py", "--cpu-devices", "2", "--num-processes", "2",
         "--process-id", str(i), "--coordinator-address", f"127.0.0.1:{port}", *map(str, args)],
        cwd=REPO, env=env, stdout=out, stderr=err, text=True) for i, (out, err) in enumerate(files)]
    try:
        for w in workers:
            w.wait(timeout=timeout)
    finally:
        for w in workers:
            w.kill()
    results = []
    for w, (out, err) in zip(workers, files):
        out.seek(0)
        err.seek(0)
        ours = _ours(err.read())
        # A process that joins the others first says what it waits for (`peers.join`).
        if ours[:1] == [f"note: waiting for 2 processes at 127.0.0.1:{port} (up to 300 s)"]:
            ours = ours[1:]
        results.append((w.returncode, out.read(), ours))
        out.close()
        err.close()
    return results


@pytest.mark.slow
def test_resume_with_two_processes_is_refused_or_skipped_on_every_process(tmp_path, tiny_run):
    """Process 0 alone takes the folder back: when it cannot (another process trains in it),
    both stop with one line each; a finished run is left as it is by both (exit 0, process 0
    says so)."""
    finished = _two_train_py(tmp_path / "finished", "--resume", tiny_run[0])
    assert [code for code, _, _ in finished] == [0, 0], finished
    assert "has already finished training: nothing to resume" in finished[0][1]
    assert finished[1][1] == "" and finished[1][2] == []
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    (run_dir / folder.BEST_FILE).unlink()  # as if killed before the end
    with open(run_dir / folder.CONFIG_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a training of that folder holds it
        refused = _two_train_py(tmp_path / "refused", "--resume", run_dir,
                                env={"FMNIST_DATA_DIR": str(tmp_path / "none")})
    assert [code for code, _, _ in refused] == [1, 1], refused
    assert refused[0][2] == [f"error: {run_dir} is being trained by another process: wait for "
                             f"it, or stop it first"]
    assert refused[1][2] == [f"error: process 0 refused the run folder {run_dir}: see its error"]


# On 4 CPU devices: the tiny run's first epoch alone, then its folder made into that of the
# 2-epoch tiny run killed after epoch 1 (config.json says 2 epochs; no best.json), resumed.
_RESUME = """
import dataclasses, json, shutil, sys
from pathlib import Path
from fmnist_jax.run import parallel
parallel.use_cpu_devices(4)
from fmnist_jax.run import folder
from tests.helpers import make_split, tiny_config, train_quietly
run_dir, splits = Path(sys.argv[1]), (make_split(512, seed=0), make_split(300, seed=1))
train_quietly(dataclasses.replace(tiny_config(), epochs=1), run_dir, splits)
(run_dir / folder.CONFIG_FILE).write_text(tiny_config().to_json() + "\\n")
(run_dir / folder.CLAIM_FILE).write_text(
    json.dumps({"config": json.loads(tiny_config().to_json())}))
(run_dir / folder.BEST_FILE).unlink()
train_quietly(tiny_config(), folder.reopen(run_dir), splits)
"""


@pytest.mark.slow
def test_a_run_resumed_on_four_devices_ends_as_the_one_device_run(tmp_path, tiny_run):
    result = subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert '{"resumed_after_epoch": 1}' in (tmp_path / "run" / folder.TIMING_FILE).read_text()
    _assert_same_run(tmp_path / "run", tiny_run[0])


@pytest.fixture(scope="module")
def two_seeds_on_one_device(tmp_path_factory):
    """The shared tiny run as `--seeds 2` (seeds 4 and 5), on this process's one device."""
    run_dir = tmp_path_factory.mktemp("two_seeds")
    train_quietly(dataclasses.replace(tiny_config(), seeds=2), run_dir,
                  (make_split(512, seed=0), make_split(300, seed=1)))
    return run_dir


def _assert_same_seeds(run_dir, reference_dir):
    for seed in (4, 5):
        _assert_same_run(folder.member_dir(run_dir, seed), folder.member_dir(reference_dir, seed))
        assert len(load_history(folder.member_dir(run_dir, seed))) == 2
    assert results.load_summary(run_dir)["n"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("lockstep", [False, True], ids=["one_after_another", "lockstep"])
def test_seeds_on_four_devices_train_as_on_one(tmp_path, two_seeds_on_one_device, lockstep):
    """The pieces combine: --seeds 2 on 4 devices. One after another (a CPU's way): a group
    per device, 2 of them holding only spare places. In lockstep (a GPU's way): a 2 x 2
    mesh, each seed on a group of 2 devices that split its batches."""
    env = {"SEEDS": "2", **({"LOCKSTEP": "1"} if lockstep else {})}
    assert _finish(_worker(tmp_path, 4, env=env))["devices"] == 4
    _assert_same_seeds(tmp_path, two_seeds_on_one_device)


@pytest.mark.slow
@pytest.mark.parametrize("lockstep", [False, True], ids=["one_after_another", "lockstep"])
def test_seeds_over_two_processes_of_two_devices_train_as_on_one(tmp_path,
                                                                 two_seeds_on_one_device,
                                                                 lockstep):
    """--seeds 2 with 2 processes of 2 devices: process 1 runs the same loop of seeds as
    process 0 (it hung in its first collective when it took the run for a single one), each
    seed's folder written once, the numbers those of one device. One after another, process
    1's devices hold only spare places; in lockstep each seed trains on one process's 2
    devices."""
    env = {"SEEDS": "2", **({"LOCKSTEP": "1"} if lockstep else {})}
    assert _two_processes_of_two_devices(tmp_path, env) == [
        {"devices": 4, "local": 2, "processes": 2}] * 2
    _assert_same_seeds(tmp_path, two_seeds_on_one_device)


def _as_if_killed_after_epoch_1(run_dir, seeds):
    """The finished 1-epoch tiny run (of `seeds` seeds) in `run_dir` made into the folder of
    the 2-epoch one killed after epoch 1: its configs (and their records in claim.json) say 2
    epochs, its best.json gone."""
    cfg = dataclasses.replace(tiny_config(), seeds=seeds)
    folders = [(run_dir, cfg)]
    if seeds > 1:
        stored = json.loads((run_dir / folder.SEEDS_FILE).read_text())
        (run_dir / folder.SEEDS_FILE).write_text(json.dumps({**stored,
                                                           "config": json.loads(cfg.to_json())}))
        (run_dir / folder.SUMMARY_FILE).unlink()
        folders = [(folder.member_dir(run_dir, m.seed), m) for m in cfg.members()]
    for member_run, member_cfg in folders:
        (member_run / folder.CONFIG_FILE).write_text(member_cfg.to_json() + "\n")
        (member_run / folder.CLAIM_FILE).write_text(json.dumps(
            {"config": json.loads(member_cfg.to_json())}))
        (member_run / folder.BEST_FILE).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, 2])
def test_two_processes_resume_the_run_they_started(tmp_path, request, seeds):
    """2 processes of 2 devices train epoch 1, are killed (the folder made as a kill after
    epoch 1 leaves it), and resume: process 0 takes the folder back, process 1 runs the same
    loop, and the run ends as the uninterrupted one (one model: that of 4 devices; 2 seeds:
    those of one device)."""
    env = {"SEEDS": str(seeds)}
    _two_processes_of_two_devices(tmp_path, {**env, "EPOCHS": "1"})
    _as_if_killed_after_epoch_1(tmp_path, seeds)
    _two_processes_of_two_devices(tmp_path, {**env, "RESUME": "1"})
    if seeds == 1:
        assert '{"resumed_after_epoch": 1}' in (tmp_path / folder.TIMING_FILE).read_text()
        _assert_same_run(tmp_path, request.getfixturevalue("four_device_run"))
    else:
        _assert_same_seeds(tmp_path, request.getfixturevalue("two_seeds_on_one_device"))


# LeNet-5 members (one stopped) trained one epoch and evaluated with CompiledSeedEpochs: on
# 1 CPU device one after another (the reference), then on argv[1] devices: 4 members one
# after another (a CPU's way) and in lockstep (vmap, a GPU's way), and 3 members one after
# another (a spare place); reports each against its reference, and each epoch program's
# collectives and member shapes.
_SHARED_SEEDS = """
import json, re, sys
from fmnist_jax.run import parallel
parallel.use_cpu_devices(int(sys.argv[1]))
import jax, jax.numpy as jnp, numpy as np
from fmnist_jax import data, streams
from fmnist_jax.run.presets import get_config
from fmnist_jax.run.compiled import CompiledSeedEpochs, step_options
from fmnist_jax.run.prepare import seed_members
from tests.helpers import make_split
cfg = get_config("lenet5", batch_size=32)
train, test = make_split(384, seed=0), make_split(100, seed=1)
report, references = {}, {}
for name, k, devices, at_once in [("reference", 4, jax.devices()[:1], 1),
                                  ("reference", 3, jax.devices()[:1], 1),
                                  ("one_at_a_time", 4, jax.devices(), 1),
                                  ("lockstep", 4, jax.devices(), None),
                                  ("spare_place", 3, jax.devices(), 1)]:
    active_M = jnp.array([True, True, False, True][:k])
    splits, state_M, _ = seed_members(cfg, train.labels_N, list(range(k)))
    key_M = jnp.stack([streams.epoch_shuffle_key(seed, 1) for seed in range(k)])
    half_M = np.full(k, 0.5, np.float32)
    compiled = CompiledSeedEpochs(
        state_M, (train.images_NxHxWx1, train.labels_N),
        np.stack([t for t, _ in splits]).astype(np.int32),
        {"val": (train.images_NxHxWx1, train.labels_N,
                 np.stack([v for _, v in splits]).astype(np.int32)),
         "test": (test.images_NxHxWx1, test.labels_N, None)},
        batch_size=32, eval_batch_size=50, norm_M=data.Normalization(half_M, half_M),
        key_M=key_M, active_M=active_M, options=step_options(cfg),
        parallel=parallel.data_parallel(devices, members=k, members_at_once=at_once))
    initial = jax.device_get(state_M.params)
    state_M, sums, _ = compiled.train(state_M, key_M, active_M)
    params, *sums = jax.device_get((state_M.params, sums, compiled.evaluate(state_M, "val"),
                                    compiled.evaluate(state_M, "test")))
    if name == "reference":
        references[k] = params, sums
        continue
    reference, reference_sums = references[k]
    hlo = compiled._epoch_fn.as_text()
    pairs = list(zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(params)))
    report[name] = {
        "groups": compiled.parallel.seed_groups,
        "params": max(float(np.max(np.abs(a - b))) for a, b in pairs),
        "stopped_kept": all(np.array_equal(a[2], b[2]) for a, b in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(initial))),
        "loss_relative": max(float(np.max(np.abs(a.loss - b.loss) / np.maximum(a.loss, 1e-9)))
                             for a, b in zip(reference_sums, sums)),
        "counts_equal": all(np.array_equal(a.correct, b.correct) and
                            np.array_equal(a.count, b.count)
                            for a, b in zip(reference_sums, sums)),
        "shapes": [np.shape(x) for x in jax.tree_util.tree_leaves((params, sums))][-3:],
        "collectives": sorted(set(re.findall(
            r"all-reduce|all-gather|all-to-all|collective-permute", hlo))),
        "conv1_kernel_members": sorted(set(re.findall(r"f32\\[(\\d+),5,5,1,6\\]", hlo)))}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_seeds_shared_out_to_two_devices_train_as_on_one():
    """Seeds on 2 devices: each device trains its share and never waits for the other (the
    epoch's program has no collective at all; the results are gathered by a program of their
    own). 4 seeds one after another (a CPU's way): each member exactly as on one device; in
    lockstep (vmap: 2 members in each device's kernels) within float rounding; 3 seeds one
    after another (a spare place, skipped): exactly as on one device. A stopped member keeps
    its state exactly and the results come back with one row per member."""
    result = subprocess.run([sys.executable, "-c", _SHARED_SEEDS, "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert "2" in report["lockstep"]["conv1_kernel_members"]  # 4 outside, 2 on each device
    for name, arrangement in report.items():
        assert arrangement["groups"] == 2
        assert arrangement["collectives"] == [], report
        members = 3 if name == "spare_place" else 4
        assert arrangement["shapes"] == [[members]] * 3, report  # the test sums
        assert arrangement["counts_equal"] and arrangement["stopped_kept"], report
        if name == "lockstep":
            assert arrangement["params"] <= ATOL and arrangement["loss_relative"] <= 1e-5
        else:  # each device computes what one device computes
            assert arrangement["params"] == 0.0 and arrangement["loss_relative"] == 0.0, report


@pytest.mark.parametrize("members,devices,groups", [
    (1, 4, 1), (2, 4, 2), (3, 4, 1), (4, 4, 4), (8, 4, 4), (6, 4, 2), (5, 1, 1)])
def test_seeds_in_lockstep_take_the_most_groups_that_share_members_and_devices_evenly(
        members, devices, groups):
    assert parallel.seed_groups(members, devices, members_at_once=None) == groups


@pytest.mark.parametrize("members,devices,groups", [
    (1, 4, 1), (2, 4, 4), (3, 2, 2), (3, 4, 4), (8, 4, 4), (6, 4, 4), (5, 1, 1)])
def test_seeds_one_after_another_take_a_group_per_device(members, devices, groups):
    """Spare places are skipped at no cost one after another, so every device is a group."""
    assert parallel.seed_groups(members, devices, members_at_once=1) == groups


@pytest.mark.parametrize("members,cores,devices", [
    (1, 2, 1), (2, 2, 2), (3, 2, 2), (8, 2, 2), (32, 2, 2), (3, 16, 3), (32, 16, 16),
    (17, 16, 16)])
def test_a_seeds_run_gets_a_cpu_device_per_core_up_to_one_per_seed(members, cores, devices):
    assert parallel.cpu_devices_for(members, cores) == devices


def test_batch_sizes_need_only_split_over_a_group_of_seeds():
    parallel.check_batch_sizes(2, 2, 4, members=2, members_at_once=None)  # 2 groups of 2
    with pytest.raises(FmnistError, match=r"--batch-size 3 does not split over the 2 devices "
                                          r"of each group of seeds \(4 devices in 2 groups\)"):
        parallel.check_batch_sizes(3, 4, 4, members=2, members_at_once=None)
    parallel.check_batch_sizes(3, 5, 4, members=4, members_at_once=None)  # a device per seed
    parallel.check_batch_sizes(3, 5, 4, members=2, members_at_once=1)  # a device per group


_START_DEVICES = """
import sys
from fmnist_jax import cli
args = cli.train_parser().parse_args(sys.argv[2:])
cli.start_devices(args, members=int(sys.argv[1]))
import jax
print(jax.device_count())
"""


# The flag and the variable against the default, here with the setting jax is given recorded
# (this process's jax has started): what the test below shows in real processes.
@pytest.mark.parametrize("members,flags,env,expected", [
    (4, [], {}, "cores"), (1, [], {}, None), (4, ["--cpu-devices", "1"], {}, 1),
    (4, [], {parallel.CPU_DEVICES_ENV: "1"}, 1), (4, ["--cpu-devices", "3"],
                                                  {parallel.CPU_DEVICES_ENV: "1"}, 3)])
def test_start_devices_asks_for_a_cpu_device_per_core_for_seeds_unless_told(
        members, flags, env, expected, monkeypatch):
    from types import SimpleNamespace

    from fmnist_jax import cli

    monkeypatch.delenv(parallel.CPU_DEVICES_ENV, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asked = []
    monkeypatch.setattr(parallel, "jax", SimpleNamespace(config=SimpleNamespace(
        update=lambda name, value: asked.append((name, value)))))
    cli.start_devices(cli.train_parser().parse_args(flags), members=members)
    if expected == "cores":  # one device (a one-core machine): jax's default, left alone
        expected = parallel.cpu_devices_for(members)
        expected = None if expected == 1 else expected
    assert asked == ([] if expected is None else [("jax_num_cpu_devices", expected)])


# One real process in the fast set: the default, read before jax starts.
@pytest.mark.parametrize("members,flags,env,expected", [
    (4, [], {}, "cores"), *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (1, [], {}, 1), (4, ["--cpu-devices", "1"], {}, 1),
        (4, [], {parallel.CPU_DEVICES_ENV: "1"}, 1)])])
def test_train_py_splits_the_cpu_for_seeds_unless_told(members, flags, env, expected):
    """`train.py --seeds K` on a CPU: a device per core, up to one per seed (here K = 4), unless
    --cpu-devices or $FMNIST_CPU_DEVICES says otherwise; one model: one device."""
    environment = {k: v for k, v in os.environ.items() if k != parallel.CPU_DEVICES_ENV}
    result = subprocess.run([sys.executable, "-c", _START_DEVICES, str(members), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**environment, "PYTHONPATH": str(REPO), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    if expected == "cores":
        expected = parallel.cpu_devices_for(members)
    assert int(result.stdout.split()[-1]) == expected


def test_the_default_split_for_seeds_keeps_the_devices_of_a_running_jax(monkeypatch):
    """train_main called in a process whose jax already runs (a notebook, a test) keeps its
    devices for a run of seeds; a split asked for by flag is refused as too late."""
    monkeypatch.delenv(parallel.CPU_DEVICES_ENV, raising=False)
    jax.numpy.zeros(1).block_until_ready()  # jax has started its backend
    before = jax.device_count()
    parallel.use_cpu_devices(None, default=before + 1)
    assert jax.device_count() == before
    with pytest.raises(FmnistError, match="came too late"):
        parallel.use_cpu_devices(before + 1)
