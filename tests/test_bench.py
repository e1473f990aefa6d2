import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from fmnist_jax.steps import TrainState, train_step_jit
from fmnist_jax.models import get_model
from tests.conftest import REPO, make_split, tiny_config

torch = pytest.importorskip("torch")

from fmnist_jax import bench  # noqa: E402
from fmnist_jax.baseline.order import jax_init_params, train_py_epoch_order  # noqa: E402


def test_order_helpers_reproduce_a_train_py_run(tiny_run):
    """Init and batch order of `train_and_evaluate` are what the bench feeds torch."""
    _, state, _ = tiny_run
    cfg, train = tiny_config(), make_split(512, seed=0)
    manual = TrainState.create(apply_fn=get_model("lenet5").apply,
                               params=jax_init_params(cfg.seed), tx=optax.adam(1e-3))
    for epoch in range(1, cfg.epochs + 1):
        for idx in train_py_epoch_order(cfg.seed, epoch, len(train), cfg.batch_size):
            manual, _ = train_step_jit(manual, train.images_NxHxWx1[idx], train.labels_N[idx],
                                       jax.random.key(0))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           state.params, manual.params)


@pytest.mark.slow
def test_quick_bench_script_writes_its_table_and_json(tmp_path, prepared_data_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--device", "cpu", "--data-dir",
         str(prepared_data_dir), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| jax |" in result.stdout and "| torch-seed-style |" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["n_train"] == 2048 and saved["settings"]["epochs"] == 1
    assert saved["command"].startswith("python scripts/bench.py --quick")


def test_bench_flags_are_checked_before_any_work():
    result = subprocess.run([sys.executable, "scripts/bench.py", "--pipelines", "jax,tf"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1 and "unknown pipelines ['tf']" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_runs_all_pipelines_from_the_same_start():
    train, test = make_split(512, seed=0), make_split(200, seed=1)
    settings = bench.BenchSettings(epochs=2, seeds=1)
    result = bench.run_bench(train, test, settings, log_fn=lambda s: None)
    summary = result["summary"]
    assert set(summary) == set(bench.PIPELINES)
    for p, raw in result["raw"].items():
        assert len(raw["epoch_s"]) == 2 and all(t > 0 for t in raw["epoch_s"])
    # Same init, same batches: JAX and tuned torch end at (nearly) the same accuracy.
    assert abs(summary["jax"]["test_accuracy_mean"]
               - summary["torch-tuned"]["test_accuracy_mean"]) <= 0.01
    assert summary["jax"]["epoch_ratio_to_jax"] == 1.0
    table = bench.markdown_table(result)
    assert table.count("\n| ") == 4  # separator and three pipelines
    assert "torch-seed-style" in table
