"""A pytest plugin that measures what a process does after its session has finished: the
seconds from the end of `pytest_sessionfinish` (where an xdist worker reports to its
controller that it is done) to the end of the last config cleanup (pytest's five garbage
collections among them), the objects the collector then tracks, and one more collection:

    FMNIST_MANUAL_DIR=DIR python -m pytest -n 2 -p benchmarks.worker_end_probe

One line per process (`gw0`, `gw1`, `controller`) in the folder $WORKER_END_DIR (default the
current folder), in a file of its own: worker-end-PID.txt. execnet interrupts a worker still
busy 5 s after the controller's terminate, so a figure near 5 s is one to act on.
"""

import gc
import os
import time
from pathlib import Path

import pytest

_finished: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session):
    result = yield  # after every plain implementation, the conftest's included
    _finished["at"] = time.perf_counter()
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Registered first, so the last of the cleanups to run (they run last in, first out)."""

    def report() -> None:
        after_s = time.perf_counter() - _finished.get("at", float("nan"))
        start = time.perf_counter()
        gc.collect()
        collect_s = time.perf_counter() - start
        name = os.environ.get("PYTEST_XDIST_WORKER", "controller")
        folder = Path(os.environ.get("WORKER_END_DIR", "."))
        (folder / f"worker-end-{os.getpid()}.txt").write_text(
            f"{name}\tend of sessionfinish -> end of the cleanups {after_s:.2f} s\t"
            f"objects {len(gc.get_objects())}\tone gc.collect {collect_s:.2f} s\n")

    config.add_cleanup(report)
