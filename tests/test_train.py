import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmnist_jax import FmnistError, checkpoint
from fmnist_jax.config import get_config
from fmnist_jax.steps import Normalization, create_train_state, predict_logits
from fmnist_jax.train import train_and_evaluate
from tests.conftest import REPO


def _run(cfg, workdir, splits):
    train, test = splits
    return train_and_evaluate(cfg, workdir, train=train, test=test, log_fn=lambda s: None,
                              progress=False)


def test_run_folder_learns_and_is_reproducible(tmp_path, tiny_splits):
    cfg = get_config(epochs=3, batch_size=32, eval_batch_size=128, seed=4)
    state, history = _run(cfg, tmp_path / "a", tiny_splits)
    _run(cfg, tmp_path / "b", tiny_splits)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    # Same seed, same bytes; timings live apart in timing.jsonl.
    a, b = (tmp_path / d / checkpoint.HISTORY_FILE for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert checkpoint.load_config(tmp_path / "a") == cfg
    params = checkpoint.load_params(tmp_path / "a", cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)
    timing = [json.loads(line) for line in (tmp_path / "a" / checkpoint.TIMING_FILE).open()]
    assert "compile_seconds" in timing[0] and len(timing) == 4


def test_an_existing_run_is_not_overwritten(tmp_path, tiny_splits):
    cfg = get_config(epochs=1, batch_size=64, eval_batch_size=100)
    _run(cfg, tmp_path, tiny_splits)
    before = (tmp_path / checkpoint.HISTORY_FILE).read_bytes()
    with pytest.raises(FmnistError, match="already holds a run"):
        _run(cfg, tmp_path, tiny_splits)
    assert (tmp_path / checkpoint.HISTORY_FILE).read_bytes() == before


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_splits):
    _run(get_config(epochs=1, eval_batch_size=100), tmp_path, tiny_splits)
    with pytest.raises(FmnistError, match="another model than 'cnn'"):
        checkpoint.load_params(tmp_path, get_config(model="cnn"))
    with pytest.raises(FmnistError, match="not a run folder"):
        checkpoint.load_config(tmp_path / "params")
    with pytest.raises(FmnistError, match="has no model"):
        checkpoint.load_params(tmp_path / "elsewhere", get_config())


def test_batch_larger_than_the_data_is_a_user_error(tmp_path, tiny_splits):
    with pytest.raises(FmnistError, match="batch size 4096 is larger"):
        _run(get_config(batch_size=4096), tmp_path, tiny_splits)


@pytest.mark.parametrize("flags,message", [
    (["--model", "foo"], "unknown model 'foo'"),
    (["--preset", "bar"], "unknown preset 'bar'"),
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--lr", "-0.1"], "learning rate must be positive"),
    (["--epochs", "two"], "invalid int value"),
])
def test_bad_flags_get_one_line_and_exit_1(flags, message):
    result = subprocess.run([sys.executable, "scripts/train.py", *flags], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_seed_recipe_end_to_end_on_real_data(tmp_path, fashion_mnist):
    """Two epochs of seed-002 on the real data; the eval count equals an independent count."""
    cfg = get_config(epochs=2)
    state, history = _run(cfg, tmp_path, fashion_mnist)
    assert history[-1]["test_accuracy"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = fashion_mnist[1]
    logits = np.asarray(predict_logits(state, test.images_NxHxWx1, batch_size=1000,
                                       norm=Normalization()))
    correct = int(np.sum(logits.argmax(-1) == test.labels_N))
    assert history[-1]["test_accuracy"] == correct / 10_000
