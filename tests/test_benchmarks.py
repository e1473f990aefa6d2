"""benchmarks/: the measurement tools outside the package still run and still measure what
they say (the timings themselves are not checked)."""

import pytest

from benchmarks.device_split import markdown_table, time_device_split
from benchmarks.profiling import toeplitz_3d_rows_lenet5
from fmnist_jax.run.config import get_config
from tests.helpers import (FlaxLeNet5, assert_model_equals_flax, make_split, one_error_line,
                           run_script)


def test_time_device_split_times_every_config_each_round():
    cfg = get_config(model="mlp", batch_size=32, val_fraction=0.0)  # compiles fastest
    rows = time_device_split(cfg, make_split(64), batch_sizes=[32], device_counts=[1],
                             rounds=2, log_fn=lambda line: None)
    assert [(r["batch_size"], r["devices"]) for r in rows] == [(32, 1)]
    for row in rows:
        assert len(row["epoch_s"]) == 2 and all(s > 0 for s in row["epoch_s"])
        assert row["vs_first"] == 1.0 and row["round_ratios"] == [1.0, 1.0]
    assert markdown_table(rows).count("\n") == 2  # header, rule, one row


@pytest.mark.parametrize("flags,message", [
    (["--devices", "1,2"], "asks for 2 devices and this process has 1: pass --cpu-devices 2"),
    (["--cpu-devices", "2", "--batch-sizes", "63"],
     "--batch-size 63 does not split over the 2 devices"),
])
def test_time_device_split_refuses_what_it_cannot_time(tmp_path, flags, message):
    result = run_script("benchmarks.time_device_split", *flags,
                        env={"FMNIST_DATA_DIR": str(tmp_path), "FMNIST_MANUAL_DIR": str(tmp_path)})
    assert message in one_error_line(result)


@pytest.mark.slow  # a model no backend picks, kept for comparisons
def test_toeplitz_3d_rows_lenet5_is_lenet5():
    assert_model_equals_flax(toeplitz_3d_rows_lenet5(), FlaxLeNet5())
