import dataclasses
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, make_split, one_error_line

torch = pytest.importorskip("torch")

from fmnist_jax import FmnistError  # noqa: E402
from fmnist_jax.baseline import bench  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("flags,rows", [
    ([], ["jax", "torch-tensors", "torch-dataloader"]),
    (["--preset", "cnn", "--pipelines", "jax,torch-tensors"], ["jax", "torch-tensors"]),
])
def test_quick_bench_script_writes_its_table_and_json(flags, rows, tmp_path, prepared_data_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", *flags, "--device", "cpu", "--data-dir",
         str(prepared_data_dir), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
        timeout=600)  # a hang guard: 300 s ran out on the shared machine at load 13
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split("|")[1].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| pipeline", "| ---"))] == rows
    saved = json.loads(out.read_text())
    assert saved["n_train"] == 2048 and saved["settings"]["config"]["epochs"] == 1
    assert saved["command"].startswith("python scripts/bench.py --quick")


@pytest.mark.parametrize("flags,message", [
    (["--pipelines", "jax,tf"], "unknown pipelines ['tf']"),
    (["--num-seeds", "0"], "--num-seeds must be at least 1"),
    (["--preset", "lenet5-gap"], "the PyTorch baseline has no lenet5-gap model (it has lenet5, "
                                 "cnn): pass --pipelines jax, or --preset lenet5 or --preset cnn"),
    (["--preset", "cnn", "--label-smoothing", "0.1"], "changes label_smoothing"),
    (["--optimizer", "adamw", "--pipelines", "torch-tensors"], "changes optimizer"),
    (["--train-images", "10"], "--train-images must be at least the batch size (64)"),
    (["--quick", "--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
    (["--quick", "--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--quick", "--train-images", "0"], "--train-images must be at least the batch size"),
    (["--seed", "1"], "unrecognized arguments: --seed"),
    (["--teacher", "runs/x"], "unrecognized arguments: --teacher"),
    (["--sweep", "learning_rate=1e-3,3e-3"], "unrecognized arguments: --sweep"),
    (["--preset", "lenet5-distilled", "--pipelines", "jax"],
     "preset lenet5-distilled learns from a teacher, and bench.py trains without one"),
    (["--preset", "mlp", "--pipelines", "jax"], "preset mlp lowers the learning rate on a "
     "validation plateau, and the bench holds out no validation split: pass --decay constant"),
    (["--decay", "plateau", "--pipelines", "jax"], "--decay lowers the learning rate on a "
     "validation plateau"),
])
def test_bench_flags_are_checked_before_any_work(flags, message, run_main):
    assert message in one_error_line(run_main("bench.py", *flags, "--data-dir",
                                              "/nonexistent"))


def test_bench_builds_its_runs_from_a_preset():
    cfg = bench.bench_config("lenet5", batch_size=256)
    assert (cfg.model, cfg.batch_size, cfg.val_fraction, cfg.epochs) == ("lenet5", 256, 0.0, 10)
    bench.check_settings(bench.BenchSettings(config=bench.bench_config("lenet5-gap"),
                                             pipelines=("jax",)))  # JAX alone trains any
    # The tutorial CNN's recipe differs from LeNet-5's only in the model and the batch size,
    # both of which the baseline follows.
    bench.check_settings(bench.BenchSettings(config=bench.bench_config("cnn")))
    with pytest.raises(FmnistError, match="has no lenet5-gap model"):
        bench.check_settings(bench.BenchSettings(config=bench.bench_config("lenet5-gap")))
    with pytest.raises(FmnistError, match="changes optimizer, weight_decay"):
        bench.check_settings(bench.BenchSettings(config=bench.bench_config(
            "cnn", optimizer="adamw", weight_decay=1e-4)))
    # The notebook's recipe stops early on its validation split; the bench has none.
    mlp = bench.bench_config("mlp", decay="constant")
    assert (mlp.val_fraction, mlp.patience) == (0.0, 0)
    # A teacher's preset holds out a chosen split (val_seed); the bench holds out none.
    teacher = bench.bench_config("cnn-teacher")
    assert (teacher.model, teacher.val_fraction, teacher.val_seed) == ("cnn", 0.0, None)
    # No pipeline runs a teacher: a config that names one is refused, not trained untaught.
    taught = bench.bench_config("lenet5", teacher="runs/teacher")
    with pytest.raises(FmnistError, match="trains without a teacher.*'runs/teacher'"):
        bench.check_settings(bench.BenchSettings(config=taught, pipelines=("jax",)))
    swept = dataclasses.replace(bench.bench_config("lenet5"), sweep="learning_rate=1e-3,3e-3")
    with pytest.raises(FmnistError, match="trains one recipe.*sweeps 'learning_rate=1e-3,3e-3'"):
        bench.check_settings(bench.BenchSettings(config=swept, pipelines=("jax",)))


def test_bench_accepts_the_cnn_with_a_torch_pipeline(tmp_path, run_main):
    # Accepted: the first error is the missing dataset file, after every config check (an empty
    # --manual-dir: nothing to prepare, no download tried).
    (tmp_path / "empty").mkdir()
    result = run_main("bench.py", "--preset", "cnn", "--pipelines", "jax,torch-tensors",
                      "--device", "cpu", "--out", tmp_path / "bench.json", "--data-dir",
                      tmp_path / "data", "--manual-dir", tmp_path / "empty")
    assert "train-images-idx3-ubyte.gz is missing" in one_error_line(result)


@pytest.mark.slow
def test_bench_trains_the_cnn_in_both_frameworks_from_the_same_start():
    train, test = make_split(256, seed=0), make_split(200, seed=1)
    settings = bench.BenchSettings(config=bench.bench_config("cnn", epochs=2), num_seeds=1,
                                   pipelines=("jax", "torch-tensors"))
    result = bench.run_bench(train, test, settings, log_fn=lambda s: None)
    summary = result["summary"]
    assert set(summary) == {"jax", "torch-tensors"}
    assert result["settings"]["config"]["model"] == "cnn"
    assert all(len(raw["epoch_s"]) == 2 for raw in result["raw"].values())
    # Same init, same batches, same steps: the same test accuracy up to a prediction or two.
    assert abs(summary["jax"]["test_accuracy_mean"]
               - summary["torch-tensors"]["test_accuracy_mean"]) <= 0.01
    assert summary["jax"]["test_accuracy_mean"] > 0.2  # it learned something (chance: 0.1)


@pytest.mark.slow
def test_bench_runs_all_pipelines_from_the_same_start():
    train, test = make_split(512, seed=0), make_split(200, seed=1)
    settings = bench.BenchSettings(config=bench.bench_config("lenet5", epochs=2), num_seeds=1)
    result = bench.run_bench(train, test, settings, log_fn=lambda s: None)
    summary = result["summary"]
    assert set(summary) == set(bench.PIPELINES)
    for p, raw in result["raw"].items():
        assert len(raw["epoch_s"]) == 2
    # Same init, same batches: JAX and torch-tensors end at (nearly) the same accuracy.
    assert abs(summary["jax"]["test_accuracy_mean"]
               - summary["torch-tensors"]["test_accuracy_mean"]) <= 0.01
    table = bench.markdown_table(result)
    assert table.count("\n| ") == 4  # separator and three pipelines
    assert "torch-dataloader" in table


def test_a_bad_out_is_refused_before_the_benchmark(tmp_path, run_main):
    existing = tmp_path / "old.json"
    existing.write_text("earlier results")
    for out, message in [(tmp_path, "is a folder"),
                         ("/proc/self/bench.json", "cannot be written"),
                         (tmp_path / "no" / "bench.json", "does not exist"),
                         (existing, "already exists: pass another --out, delete it, or pass "
                                    "--overwrite")]:
        # The data dir does not exist: a data error would mean --out was checked too late.
        result = run_main("bench.py", "--quick", "--pipelines", "jax", "--out", out,
                          "--data-dir", "/nonexistent")
        assert message in one_error_line(result)
    assert existing.read_text() == "earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no probe left behind
    bench.check_out(existing, overwrite=True)  # --overwrite lets it through


@pytest.mark.slow
def test_bench_stops_after_a_seed_when_told_and_says_how_many_ran():
    train, test = make_split(64, seed=0), make_split(50, seed=1)
    settings = bench.BenchSettings(config=bench.bench_config("lenet5", epochs=1, batch_size=32),
                                   num_seeds=3, pipelines=("jax",))
    seen, epochs = [], []
    result = bench.run_bench(train, test, settings, log_fn=lambda s: None,
                             after_seed=lambda partial: seen.append(partial["seeds_run"]) or False,
                             after_epoch=lambda seed, epoch, raw: epochs.append(
                                 (seed, epoch, len(raw["jax"]["epoch_s"]))))
    assert seen == [1] and result["seeds_run"] == 1
    assert epochs == [(0, 1, 1)]  # the epoch's time, before the seed ends
    assert len(result["raw"]["jax"]["test_accuracy"]) == 1
    assert "(1 seeds)" in bench.markdown_table(result)


def test_the_bench_device_never_sets_jax_on_a_gpu_against_torch_on_a_cpu(monkeypatch):
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(bench, "_torch_has_cuda", lambda: False)
    for requested in ("auto", "cuda"):
        with pytest.raises(FmnistError, match="JAX sees a GPU but torch does not"):
            bench.choose_device(requested)
        assert bench.choose_device(requested, torch_pipelines=False) == "cuda"
    monkeypatch.setattr(bench, "_torch_has_cuda", lambda: True)
    assert bench.choose_device("auto") == "cuda"
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
    assert bench.choose_device("auto") == "cpu"
    with pytest.raises(FmnistError, match="--device cuda, but JAX sees no GPU"):
        bench.choose_device("cuda")


def test_flags_given_with_quick_win_over_its_sizes(run_main, monkeypatch):
    seen = []

    def stop(settings):  # the settings bench.py reached, before any work
        seen.append(settings)
        raise FmnistError("stop")

    monkeypatch.setattr(bench, "check_settings", stop)
    for flags, (seeds, epochs) in ((["--num-seeds", "2", "--epochs", "3"], (2, 3)), ([], (1, 1)),
                                   (["--num-seeds", "2"], (2, 1))):
        assert one_error_line(run_main("bench.py", "--quick", *flags)) == "error: stop"
        assert (seen[-1].num_seeds, seen[-1].config.epochs) == (seeds, epochs), flags
    one_error_line(run_main("bench.py"))
    assert (seen[-1].num_seeds, seen[-1].config.epochs) == (3, 10)  # without --quick
