import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fmnist_jax import FmnistError, data
from fmnist_jax.run import checkpoints, folder
from fmnist_jax.run.presets import get_config
from fmnist_jax.data import HALF, normalization_for, split_train_val
from fmnist_jax.steps import predict_logits
from tests.helpers import REPO, make_split, one_error_line, run_script, tiny_config
from tests.helpers import train_quietly as _run


def test_run_folder_learns_and_is_reproducible(tmp_path, tiny_splits, tiny_run):
    run_dir, state, history = tiny_run
    cfg = tiny_config()
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    # Same seed, same bytes; timings live apart in timing.jsonl.
    _run(cfg, tmp_path, tiny_splits)
    assert (tmp_path / folder.HISTORY_FILE).read_bytes() == (
        run_dir / folder.HISTORY_FILE).read_bytes()
    assert folder.load_config(run_dir) == cfg
    variables = checkpoints.load_variables(run_dir, cfg)
    assert set(variables) == {"params"}  # LeNet-5 has no BatchNorm statistics
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"], state.params)
    timing = [json.loads(line) for line in
              (run_dir / folder.TIMING_FILE).read_text().splitlines()]
    assert "compile_seconds" in timing[0]
    assert [row["epoch"] for row in timing if "train_seconds" in row] == [1, 2]
    assert [row["epoch"] for row in timing if "checkpoint_seconds" in row] == [1, 2]


def test_validation_split_is_stratified_disjoint_and_seeded():
    train = make_split(400, seed=2)
    rest, val = split_train_val(train, 0.25, seed=0)
    assert len(rest) + len(val) == 400 and len(val) == sum(
        round(0.25 * n) for n in np.bincount(train.labels_N))
    # Stratified: each class keeps its share; disjoint: no image in both parts.
    np.testing.assert_allclose(np.bincount(val.labels_N, minlength=10),
                               np.round(0.25 * np.bincount(train.labels_N, minlength=10)))
    rows = {r.tobytes() for r in rest.images_NxHxWx1}
    assert not any(v.tobytes() in rows for v in val.images_NxHxWx1)
    _, val_again = split_train_val(train, 0.25, seed=0)
    np.testing.assert_array_equal(val.images_NxHxWx1, val_again.images_NxHxWx1)
    _, val_other = split_train_val(train, 0.25, seed=1)
    assert not np.array_equal(val.images_NxHxWx1, val_other.images_NxHxWx1)
    assert split_train_val(train, 0.0, seed=0) == (train, None)


def test_an_existing_run_is_not_overwritten(tiny_splits, tiny_run):
    run_dir = tiny_run[0]
    before = (run_dir / folder.HISTORY_FILE).read_bytes()
    with pytest.raises(FmnistError, match="already holds a run"):
        _run(tiny_config(), run_dir, tiny_splits)
    assert (run_dir / folder.HISTORY_FILE).read_bytes() == before


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_run):
    run_dir = tiny_run[0]
    with pytest.raises(FmnistError, match="another model than 'cnn'"):
        checkpoints.load_variables(run_dir, get_config(model="cnn"))
    with pytest.raises(FmnistError, match="not a run folder"):
        folder.load_config(run_dir / folder.CHECKPOINTS_DIR)
    with pytest.raises(FmnistError, match="has no model"):
        checkpoints.load_variables(tmp_path / "elsewhere", get_config())


def test_batch_larger_than_the_data_is_a_user_error(tmp_path, tiny_splits):
    with pytest.raises(FmnistError, match="batch size 4096 is larger"):
        _run(get_config(batch_size=4096), tmp_path, tiny_splits)


@pytest.mark.parametrize("flags,message", [
    (["--model", "foo"], "unknown model 'foo'"),
    (["--preset", "bar"], "unknown preset 'bar'"),
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--learning-rate", "-0.1"], "learning rate must be positive"),
    (["--learning-rate", "nan"], "learning rate must be a finite number"),
    (["--warmup-epochs", "inf"], "warmup epochs must be a finite number"),
    (["--seed", str(2**63)], "seed must be in [0, 4294967296)"),
    (["--clip-norm", "big"], "invalid float-or-none value"),
    (["--colour", "red"], "unrecognized arguments: --colour"),
    (["--epochs", "two"], "invalid int value"),
])
def test_bad_flags_get_one_line_and_exit_1(flags, message, run_main):
    assert message in one_error_line(run_main("train.py", *flags))


def test_a_bad_flag_in_a_real_process_is_one_line_and_exit_1():
    """The exit status the shell sees, and nothing else on stderr (argparse alone exits 2)."""
    result = subprocess.run([sys.executable, "scripts/train.py", "--colour", "red"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unrecognized arguments: --colour" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_seed_recipe_end_to_end_on_real_data(tmp_path, fashion_mnist):
    """Two epochs of the lenet5 preset on the real data; the eval count equals an independent
    count."""
    cfg = get_config(epochs=2)
    state, history = _run(cfg, tmp_path, fashion_mnist)
    assert history[-1]["test_accuracy"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = fashion_mnist[1]
    logits = np.asarray(predict_logits(state, test.images_NxHxWx1, batch_size=1000,
                                       norm=HALF))
    correct = int(np.sum(logits.argmax(-1) == test.labels_N))
    assert history[-1]["test_accuracy"] == correct / 10_000


def test_dataset_normalization_uses_the_training_pixels():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    images[0] = 255  # half the pixels 1.0, half 0.0: mean 0.5, std 0.5
    assert normalization_for("dataset", images) == (0.5, 0.5)
    images[1] = 51  # 0.2: mean 0.6, std 0.4
    mean, std = normalization_for("dataset", images)
    assert (mean, std) == pytest.approx((0.6, 0.4))
    assert normalization_for("half", images) == HALF


def test_run_folder_records_the_normalization(tiny_run):
    assert folder.load_normalization(tiny_run[0]) == HALF


@pytest.mark.slow
def test_a_val_fraction_that_leaves_no_batch_says_so(tmp_path, tiny_splits):
    with pytest.raises(FmnistError, match=r"val fraction 0.99999 holds out 512 of the 512 "
                                          r"training images and leaves 0, fewer than one batch "
                                          r"of 32: lower --val-fraction"):
        _run(get_config(epochs=1, batch_size=32, val_fraction=0.99999), tmp_path / "run",
             tiny_splits)
    assert not (tmp_path / "run").exists()  # the claim was given back


@pytest.mark.slow
def test_two_trainings_on_one_workdir_one_gets_it(tmp_path, prepared_data_dir):
    workdir = tmp_path / "run"
    args = ["--workdir", workdir, "--data-dir", prepared_data_dir, "--epochs", "1",
            "--batch-size", "1000", "--no-report", "--no-progress"]  # the winner's epoch: short
    procs = [subprocess.Popen([sys.executable, "scripts/train.py", *map(str, args)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser_err = next(err for code, _, err in results if code == 1)
    assert loser_err.strip().splitlines() == [f"error: {workdir} already holds a run, being "
                                              f"trained by another process: pass another "
                                              f"--workdir"]
    assert checkpoints.load_variables(workdir, folder.load_config(workdir)) is not None


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_while_compiling_stops_quietly(tmp_path, prepared_data_dir, signum,
                                                         code, line):
    # A shell without job control starts background jobs with SIGINT ignored: the child
    # installs the handlers a terminal would give it, then runs the script. (Not preexec_fn:
    # it forks this multithreaded process, and JAX warns of that.)
    as_in_a_terminal = ("import runpy, signal, sys\n"
                        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                        "sys.argv = sys.argv[1:]\n"
                        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", as_in_a_terminal, "scripts/train.py", "--workdir",
         str(tmp_path / "run"), "--data-dir", str(prepared_data_dir), "--epochs", "1",
         "--no-progress", "--model", "cnn",
         "--compile-cache", "none"],  # a warm cache could finish compiling before the signal
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for out_line in proc.stdout:  # "images:" is printed just before the compilation starts
        if out_line.startswith("images:"):
            break
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err and "Segmentation" not in err
    assert not (tmp_path / "run").exists()  # nothing was trained: the claim was given back


def test_a_compile_cache_that_cannot_be_written_is_one_line(run_main):
    result = run_main("train.py", "--compile-cache", "/proc/self/xla", "--epochs", "1")
    assert "cannot write the compile cache /proc/self/xla" in one_error_line(result)


@pytest.mark.slow
def test_a_second_run_loads_its_programs_from_the_compile_cache(tmp_path):
    """Two tiny runs (CSV data) on one fresh compile cache: the first fills it, the second
    finds every program there and adds nothing."""
    for name, seed, n in (("train", 0, 256), ("test", 1, 100)):
        data.write_csv_split(make_split(n, seed=seed), tmp_path / f"{name}.csv")
    cache = tmp_path / "xla"

    def train(run):
        result = run_script("train.py", "--train-csv", tmp_path / "train.csv", "--test-csv",
                            tmp_path / "test.csv", "--epochs", "1", "--batch-size", "32",
                            "--eval-batch-size", "50", "--no-report", "--no-progress",
                            "--workdir", tmp_path / run, "--compile-cache", cache,
                            timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        timing = json.loads((tmp_path / run / folder.TIMING_FILE).read_text().splitlines()[0])
        assert {"startup_seconds", "compile_seconds"} <= timing.keys()  # both recorded
        return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name.endswith("-cache")}

    first = train("run1")
    assert len(first) >= 2  # at least the epoch and the evaluation
    assert train("run2") == first  # every entry read, none written again
