"""The device a command trains on: named first, and a GPU asked for but missing in one line.
Each runs in its own process: choosing a platform in this one would change every later test."""

import importlib.util

import jax
import pytest

from tests.helpers import one_error_line, run_script

no_cuda_plugin = pytest.mark.skipif(
    any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin")),
    reason="a CUDA plugin is installed: the GPU may be there")


@no_cuda_plugin
@pytest.mark.parametrize("flags, env, asker", [
    (["--device", "cuda"], {}, "--device cuda"),
    pytest.param([], {"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda", marks=pytest.mark.slow),
    pytest.param([], {"FMNIST_DEVICE": "cuda"}, "FMNIST_DEVICE=cuda", marks=pytest.mark.slow),
])
def test_a_gpu_asked_for_and_missing_is_one_line_with_the_install_command(tmp_path, flags, env,
                                                                          asker):
    result = run_script("train.py", "--workdir", tmp_path / "run", "--compile-cache", "none",
                        *flags, env=env)
    line = one_error_line(result)
    assert line.startswith(f"error: {asker} asks for a CUDA GPU") and '".[cuda12]"' in line
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize("flag, env, asker", [
    ("cuda", None, "--device cuda"), ("cuda", "cpu", "--device cuda"),
    (None, "cuda", "FMNIST_DEVICE=cuda"), (None, " CUDA", "FMNIST_DEVICE=cuda"),
    ("cpu", "cuda", None)])
def test_the_gpu_request_is_named_where_it_came_from(flag, env, asker, monkeypatch):
    import jax

    from fmnist_jax import cli_flags

    told = []
    monkeypatch.setattr(jax.config, "update", lambda *setting: told.append(setting))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    if env is None:
        monkeypatch.delenv(cli_flags.DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(cli_flags.DEVICE_ENV, env)
    assert cli_flags.use_device(flag) == asker
    assert told == [("jax_platforms", flag or env.strip().lower())]


def test_an_unknown_device_is_refused_before_jax_is_told(monkeypatch):
    import jax

    from fmnist_jax import FmnistError, cli_flags

    monkeypatch.setenv(cli_flags.DEVICE_ENV, "tpu")
    platforms = jax.config.jax_platforms
    with pytest.raises(FmnistError, match="FMNIST_DEVICE=tpu is not one of auto, cpu, cuda"):
        cli_flags.use_device(None)
    assert jax.config.jax_platforms == platforms


# Without --device the platform is left alone: that case runs in this process (run_main);
# --device cpu chooses one, so it runs in its own process (slow).
@pytest.mark.parametrize("flags", [[], pytest.param(["--device", "cpu"], marks=pytest.mark.slow)])
def test_the_first_line_of_a_training_names_the_device(tmp_path, flags, run_main, monkeypatch):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("not,a,header\n")
    args = ["--workdir", tmp_path / "run", "--compile-cache", "none", "--train-csv", bad_csv,
            "--test-csv", bad_csv, *flags]
    if flags:
        result = run_script("train.py", *args)
    else:
        monkeypatch.delenv("FMNIST_DEVICE", raising=False)
        result = run_main("train.py", *args)
    first_line = result.stdout.splitlines()[0]
    backend = "cpu" if flags else jax.default_backend()  # the GPU check runs this on a GPU
    assert first_line.startswith(f"device: {backend} (") and ", jax " in first_line
    assert "bad.csv" in one_error_line(result)  # the data come after the device line
