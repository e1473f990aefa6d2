"""Ctrl-C is never lost, even when Python swallows its KeyboardInterrupt in a gc callback."""

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_jax.run import interrupts

REPO = Path(__file__).resolve().parents[1]


def _ctrl_c_swallowed_by_a_gc_callback(*, report: bool = False) -> None:
    """What happens when SIGINT lands while JAX's gc callback runs: the handler's
    KeyboardInterrupt is raised inside the callback, and Python only reports it (through
    the hook in place when `report`, else nowhere: in pytest, its hook would fail the test)."""
    def callback(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(callback)
    hook = sys.unraisablehook
    if not report:
        sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
        sys.unraisablehook = hook


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    # A shell without job control starts background jobs (CI's, perhaps) with SIGINT ignored,
    # and then Python installs no handler: give the test the handler a terminal would.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_interrupt_swallowed_by_gc_is_raised_again(ctrl_c_as_in_a_terminal):
    with interrupts.remembered():
        _ctrl_c_swallowed_by_a_gc_callback()  # returns: the interrupt was swallowed
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_pending()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_nothing_is_pending_without_ctrl_c(ctrl_c_as_in_a_terminal):
    with interrupts.remembered():
        interrupts.raise_if_pending()


def test_a_command_whose_ctrl_c_was_swallowed_exits_130():
    code = ("import signal\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
            "from fmnist_jax.cli import user_errors_exit_1\n"
            "from tests.test_interrupts import _ctrl_c_swallowed_by_a_gc_callback\n"
            "user_errors_exit_1(lambda argv: _ctrl_c_swallowed_by_a_gc_callback(report=True))"
            "([])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 130, result.stderr
    # One line: Python's "Exception ignored in ... KeyboardInterrupt" report is kept quiet.
    assert result.stderr.strip().splitlines() == ["interrupted"], result.stderr


def test_other_unraisable_errors_are_still_reported(ctrl_c_as_in_a_terminal, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable))

    class FailsWhenCollected:
        def __del__(self):
            raise ValueError("from __del__")

    with interrupts.remembered():
        FailsWhenCollected()  # dropped at once: __del__ raises, Python reports it
    assert [type(u.exc_value) for u in seen] == [ValueError]
    sys.unraisablehook(None)  # the hook given back on the way out is the one found
    assert seen[-1] is None
