"""benchmarks/: the measurement tools outside the package still run and still measure what
they say (the timings themselves are not checked)."""

import json
import os
import re

import numpy as np
import pytest

from benchmarks.device_split import markdown_table, time_device_split
from benchmarks.profiling import layer_formulations, toeplitz_3d_rows_lenet5
from fmnist_jax.run.presets import get_config
from tests.helpers import (REPO, FlaxLeNet5, assert_model_equals_flax, make_split, needs,
                           one_error_line, run_script)


@pytest.mark.slow
def test_time_device_split_times_every_config_each_round():
    cfg = get_config(model="mlp", batch_size=32, val_fraction=0.0)  # compiles fastest
    rows = time_device_split(cfg, make_split(64), batch_sizes=[32], device_counts=[1],
                             rounds=2, log_fn=lambda line: None)
    assert [(r["batch_size"], r["devices"]) for r in rows] == [(32, 1)]
    for row in rows:
        assert len(row["epoch_s"]) == 2 and all(s > 0 for s in row["epoch_s"])
        assert row["vs_first"] == 1.0 and row["round_ratios"] == [1.0, 1.0]
    assert markdown_table(rows).count("\n") == 2  # header, rule, one row


@pytest.mark.parametrize("flags,message", [  # a process each: the second in the fast set
    pytest.param(["--devices", "1,2"],
                 "asks for 2 devices and this process has 1: pass --cpu-devices 2",
                 marks=pytest.mark.slow),
    (["--cpu-devices", "2", "--batch-sizes", "63"],
     "--batch-size 63 does not split over the 2 devices"),
])
def test_time_device_split_refuses_what_it_cannot_time(tmp_path, flags, message):
    result = run_script("benchmarks.time_device_split", *flags,
                        env={"FMNIST_DATA_DIR": str(tmp_path), "FMNIST_MANUAL_DIR": str(tmp_path)})
    assert message in one_error_line(result)


def test_layer_formulations_times_each_form_of_each_shape_and_names_the_pick():
    shapes = [(8, 2, 4, 3, 1, "VALID")]  # Cin 2: the input's gradient is taken too
    lines = []
    rows = layer_formulations(shapes, batch_size=2, iters=1, rounds=2,
                              impls=("im2col", "toeplitz"), log=lines.append)
    assert [r["shape"] for r in rows] == shapes and len(lines) == 1
    assert set(rows[0]["us"]) == {"im2col", "toeplitz"} and min(rows[0]["us"].values()) > 0
    assert rows[0]["picked"] in {"toeplitz", "im2col", "shifted"}


@pytest.mark.slow  # a model no backend picks, kept for comparisons
def test_toeplitz_3d_rows_lenet5_is_lenet5():
    assert_model_equals_flax(toeplitz_3d_rows_lenet5(), FlaxLeNet5())


# Makes tensorflow, tensorflow_datasets and tensorboardX unimportable in every process that has
# its folder on PYTHONPATH, as on a GPU machine that lacks them. importlib.util.find_spec still
# finds a spec (without an origin, which torch's import-time scan of module paths skips): a
# finder that raised there would break that scan, and the check asks for the idx data source.
_HIDE_TF = """
import importlib.machinery
import sys

class _Absent:
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "tensorflow_datasets", "tensorboardX"}:
            return importlib.machinery.ModuleSpec(name, self, origin=None)
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow  # a dozen processes that each start jax and compile: minutes on 2 cores
def test_gpu_check_smoke_writes_both_files_without_tensorflow(tmp_path, manual_dir):
    from benchmarks.gpu_check import SHARES
    from benchmarks.gpu_report import TITLES

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_HIDE_TF)
    out = tmp_path / "out"
    result = run_script("benchmarks.gpu_check", "--smoke", "--out", out, "--manual-dir",
                        manual_dir, "--budget-s", 900, timeout=1200,
                        env={"PYTHONPATH": f"{REPO}{os.pathsep}{shim}"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    page = (out / "gpu_check.md").read_text()
    assert set(report["parts"]) == set(SHARES) == set(TITLES)
    assert all(f"## {title}" in page for title in TITLES.values())
    for name in ("environment", "tests", "conv_formulations", "bench_lenet5", "train_run",
                 "seeds"):
        assert report["parts"][name]["status"] == "ok", report["parts"][name]
    assert report["parts"]["tests"]["passed"] == 2
    checkpoint = report["parts"]["train_run"]["checkpoint"]
    assert checkpoint["same_sha256"] and checkpoint["arrays_equal"]
    env = report["parts"]["environment"]["result"]
    assert env["versions"]["jax"] and env["python"]
    if not report["gpu"]:
        assert report["parts"]["precision"]["status"] == "skipped: no GPU"
        assert page.count("skipped: no GPU") >= 3  # precision, conv's GPU choice, torch-CUDA


def test_gpu_check_wants_the_official_files_before_any_work(tmp_path):
    result = run_script("benchmarks.gpu_check", "--out", tmp_path / "out", "--manual-dir",
                        tmp_path)
    assert "lacks train-images-idx3-ubyte.gz" in one_error_line(result)
    assert not (tmp_path / "out").exists()


@needs("onnxruntime")
@needs("torch")
@pytest.mark.slow
def test_check_export_rows_of_every_format_agree_with_predict(tiny_run, tmp_path):
    from benchmarks.check_export import check_run, markdown

    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1)).astype(np.uint8)
    rows = check_run(tiny_run[0], images, tmp_path)
    assert [r["format"].split()[0] for r in rows] == ["predict", "stablehlo", "onnx", "torch"]
    assert all(r["diff"] < 1e-5 for r in rows[1:]) and rows[1]["batch_1"] > 0
    assert markdown(rows).count("\n") == len(rows) + 1


@needs("torch")
@pytest.mark.slow  # torch and jax start, three pipelines compile: about 14 s
def test_user_model_smoke_times_the_three_pipelines():
    result = run_script("benchmarks.user_model", "--smoke", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 5, result.stdout  # header, rule, three pipelines
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| flax-nn-conv (scaled from 8 images)", "| fmnist-conv", "| torch"]
    assert table[-1].endswith("| 1.00 |") and "83,466 parameters" in result.stdout
    assert "load average" in result.stdout


@needs("torch")
@pytest.mark.slow  # jax and torch start, a few tiny programs compile
def test_xla_conv_in_loop_smoke_prints_every_piece():
    result = run_script("benchmarks.xla_conv_in_loop", "--smoke", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pieces = re.findall(r", (\w[\w .]*): [\d.]+ ms as one call, [\d.]+ ms a pass in a loop",
                        result.stdout)
    assert pieces == ["forward", "input gradient", "kernel gradient"], result.stdout
    matmuls = re.findall(r"conv matmuls, ([\w .]+): [\d.]+ ms a step", result.stdout)
    assert matmuls == ["xla matmuls", "torch.mm", "torch layers"], result.stdout


@pytest.mark.slow
def test_worker_end_probe_writes_one_line_per_process(tmp_path):
    """With two workers: the controller's and each worker's line, each a finite time."""
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST")}  # this test may itself run in a worker
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "benchmarks.worker_end_probe", "-n", "2", "-q",
         "-p", "no:cacheprovider", "tests/test_over_seeds.py"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**env, "PYTHONPATH": str(REPO), "WORKER_END_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = sorted(path.read_text() for path in tmp_path.glob("worker-end-*.txt"))
    assert [line.split("\t")[0] for line in lines] == ["controller", "gw0", "gw1"]
    for line in lines:
        seconds = float(re.search(r"cleanups (\S+) s", line).group(1))
        assert 0 <= seconds < 60 and re.search(r"objects \d+\tone gc.collect \S+ s\n$", line)


_SAVES_ON_CTRL_C = """
import sys, time
from pathlib import Path
try:
    time.sleep(60)
except KeyboardInterrupt:
    Path(sys.argv[1]).write_text("saved")
"""


def _gpu_check(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    return gpu_check, gpu_check.Check(tmp_path, tmp_path, smoke=True, budget_s=60)


@pytest.mark.slow  # three processes, each left to start before its deadline: 20 s
def test_gpu_check_stops_a_part_with_ctrl_c_before_killing_it(tmp_path, monkeypatch):
    """A part past its deadline gets Ctrl-C first (pytest then writes its junit XML, a part
    its last result); one that ignores it is killed `grace` seconds past the deadline."""
    import signal
    import sys
    import time

    gpu_check, check = _gpu_check(tmp_path, monkeypatch)
    check.grace = 6
    saved = tmp_path / "saved.txt"
    start = time.time()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a check started with nohup
    try:
        ran = check.run([sys.executable, "-c", _SAVES_ON_CTRL_C, str(saved)], start + 6)
    finally:
        signal.signal(signal.SIGINT, before)
    assert ran["timed_out"] and ran["rc"] is not None and saved.read_text() == "saved"
    assert time.time() - start < 11.5  # Ctrl-C soon after the deadline, no kill at 12 s
    ignores = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    start = time.time()
    ran = check.run([sys.executable, "-c", ignores], start + 6)
    assert ran["timed_out"] and ran["rc"] is None and 11.9 < time.time() - start < 30
    ran = check.run([sys.executable, "-c", "pass"], time.time() + 30)
    assert ran == {**ran, "rc": 0, "timed_out": False}


@pytest.mark.slow  # pytest starts in a process of its own and is stopped at its deadline
def test_gpu_check_tests_part_keeps_the_counts_of_a_run_stopped_at_its_deadline(
        tmp_path, monkeypatch):
    import time

    gpu_check, check = _gpu_check(tmp_path, monkeypatch)
    tests = tmp_path / "test_two.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\n"
                     "def test_slow():\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "SMOKE_TESTS", [str(tests)])
    entry = check.tests(time.time() + 25)  # pytest's start, on a loaded machine too
    assert entry["status"] == gpu_check.PARTIAL, entry
    assert (entry["passed"], entry["failed"], entry["interrupted"]) == (1, 0, 1)
    assert entry["env"] == {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def test_gpu_report_shows_a_bench_stopped_mid_seed_and_accuracy_at_a_common_epoch():
    from benchmarks.gpu_report import markdown

    results = {"date": "D", "mode": "full", "budget_s": 480, "gpu": True, "parts": {
        "bench_lenet5": {"status": "partial: out of time", "asked": {"epochs": 10},
                         "result": {"pipelines": ["jax"], "in_progress": {
                             "seed": 0, "epoch": 2, "epoch_s": {"jax": [0.123456, 0.1]}}}},
        "train_run": {"status": "ok", "train": {"status": "ok", "final": {
            "epoch": 3, "test_accuracy": 0.9}, "test_accuracy_by_epoch": [0.8, 0.85, 0.9]}},
        "precision": {"status": "partial: out of time", "runs": {"cpu": {
            "status": "partial: out of time", "final": {"epoch": 2, "test_accuracy": 0.86},
            "test_accuracy_by_epoch": [0.81, 0.86]}}}}}
    page = markdown(results)
    assert "stopped in seed 0 after epoch 2; its epoch seconds: jax [0.1235, 0.1]" in page
    assert "| cpu | partial: out of time | 2 | 0.86 |" in page
    assert ("at epoch 2, the last every run reached: test accuracy gpu (default precision: "
            "TF32) 0.85, cpu 0.86") in page
