"""Shared fixtures: tiny synthetic splits for fast tests, the real dataset for slow ones.
Helpers that tests import live in tests/helpers.py."""

import atexit
import gc
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import pytest

from tests.helpers import REPO, SHARED_MANUAL_DIR, make_split, tiny_config, train_quietly

# Catch (B,) vs (B, 1) slips: implicit rank promotion raises in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")

QUICK_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# Set in the environment by the first pytest process (xdist's workers inherit them).
TEST_HOME_ENV = "FMNIST_TESTS_HOME"
USER_HOME_ENV = "FMNIST_TESTS_USER_HOME"


def _isolate_home(config) -> None:
    """Give this test session, and every process its tests start, a HOME of its own: the
    compile cache, tfds's default folder and any library's cache or config then land there,
    never in the user's (a test that kills a process could otherwise damage the user's
    compile cache). Removed when the session ends."""
    if TEST_HOME_ENV in os.environ:  # an xdist worker: its controller made one
        return
    home = tempfile.mkdtemp(prefix="fmnist-tests-home-")
    os.environ[USER_HOME_ENV] = os.environ.get("HOME", "")
    os.environ.update({TEST_HOME_ENV: home, "HOME": home,
                       "XDG_CACHE_HOME": f"{home}/.cache", "XDG_CONFIG_HOME": f"{home}/.config"})
    os.environ.pop("FMNIST_COMPILE_CACHE", None)  # the default, inside this HOME
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


def pytest_configure(config):
    _isolate_home(config)
    _quick_compiles_in_the_fast_set(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """In a pytest-xdist worker, collect the garbage once and freeze what survives. Right
    after this hook the worker reports that it finished; pytest then runs five full garbage
    collections (its last check for unraisable exceptions), and execnet interrupts a worker
    still busy 5 s after the controller's terminate with a SIGINT
    (https://github.com/pytest-dev/pytest-xdist/issues/282). A worker of the whole suite holds
    about two million objects (jax, TensorFlow, torch, compiled programs), a collection takes
    over a second, and the SIGINT lands in jax's gc callback, which pytest then reports as an
    unraisable KeyboardInterrupt. Garbage found here still goes through pytest's check; the
    frozen objects are handed back to the collector at exit, so the interpreter finalizes
    them as usual."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)


def _quick_compiles_in_the_fast_set(config):
    """The fast set (`-m "not slow"`) compiles with LLVM's optimizations off. Its tests are
    mostly XLA compiling small programs that then run for milliseconds, and this takes about
    30% off the set's time (BENCHMARKS.md). The whole suite, as CI runs it, keeps XLA's defaults,
    so every test also runs as a user's programs compile. XLA reads the flags when the
    backend starts, which no import here does; subprocesses inherit them (pytest-xdist's
    workers too, which run this hook again: hence the check that the flag is there)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "not slow" in (config.getoption("markexpr") or "") and QUICK_COMPILE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {QUICK_COMPILE_FLAG}".strip()


@pytest.fixture
def tiny_splits():
    return make_split(512, seed=0), make_split(300, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run_dir, final state, history): two epochs of LeNet-5 on `tiny_splits` data."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    state, history = train_quietly(tiny_config(), run_dir,
                                   (make_split(512, seed=0), make_split(300, seed=1)))
    return run_dir, state, history


@pytest.fixture(scope="session")
def manual_dir() -> Path:
    """The official .gz files: $FMNIST_MANUAL_DIR or ../shared/datasets/fashion_mnist."""
    path = Path(os.environ.get("FMNIST_MANUAL_DIR", SHARED_MANUAL_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST files in {path}")
    return path


@pytest.fixture(scope="session")
def prepared_data_dir(manual_dir, tmp_path_factory) -> Path:
    """A tfds data dir holding the prepared dataset: $FMNIST_DATA_DIR (or a temp dir)."""
    from fmnist_jax.data import prepare

    return prepare(os.environ.get("FMNIST_DATA_DIR") or tmp_path_factory.mktemp("tfds"),
                   manual_dir)


@pytest.fixture(scope="session")
def fashion_mnist(prepared_data_dir):
    """The real (train, test) splits."""
    from fmnist_jax.data import load_fashion_mnist

    return load_fashion_mnist(data_dir=prepared_data_dir)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """`run_script` in this process: `run_main("train.py", *args)` calls the script's main
    (fmnist_jax.cli) with capsys, from the repository root, and returns a CompletedProcess
    (returncode, stdout, stderr), so `one_error_line` reads it as it reads a subprocess's.
    Saves a Python and JAX start-up per call; what only a real process shows (the exit code
    the shell sees, noise at interpreter exit) stays with the `run_script` tests. The compile
    cache is off ($FMNIST_COMPILE_CACHE=none): a main must not point this process's XLA at
    a persistent cache."""
    from fmnist_jax import cli, cli_flags

    mains = {"train.py": cli.train_main, "evaluate.py": cli.evaluate_main,
             "compare.py": cli.compare_main, "predict.py": cli.predict_main,
             "export.py": cli.export_main, "bench.py": cli.bench_main}
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(cli_flags.COMPILE_CACHE_ENV, "none")

    def run(script, *args, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        argv = [str(a) for a in args]
        capsys.readouterr()  # only this call's output
        with pytest.raises(SystemExit) as exit_:
            mains[script](argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *argv], exit_.value.code or 0, out, err)

    return run
