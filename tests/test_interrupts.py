"""Ctrl-C and SIGTERM are never lost, even when Python swallows their exception in a gc
callback."""

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_jax.run import interrupts

REPO = Path(__file__).resolve().parents[1]


def _ctrl_c_swallowed_by_a_gc_callback(*, report: bool = False,
                                       signum: int = signal.SIGINT) -> None:
    """What happens when SIGINT lands while JAX's gc callback runs: the handler's
    KeyboardInterrupt is raised inside the callback, and Python only reports it (through
    the hook in place when `report`, else nowhere: in pytest, its hook would fail the test)."""
    def callback(phase, info):
        if phase == "start":
            signal.raise_signal(signum)

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
    # SIGTERM as Python starts with it (pytest-xdist's workers may have their own).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    before_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGTERM, before_term)


def test_an_interrupt_swallowed_by_gc_is_raised_again(ctrl_c_as_in_a_terminal):
    with interrupts.remembered():
        _ctrl_c_swallowed_by_a_gc_callback()  # returns: the interrupt was swallowed
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_pending()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_sigterm_is_a_remembered_interrupt_of_its_own(ctrl_c_as_in_a_terminal):
    with interrupts.remembered():
        with pytest.raises(interrupts.Terminated):
            signal.raise_signal(signal.SIGTERM)  # the handler raises: the process lives
        _ctrl_c_swallowed_by_a_gc_callback(signum=signal.SIGTERM)
        with pytest.raises(interrupts.Terminated):
            interrupts.raise_if_pending()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Python's default again


def test_an_interrupt_during_a_deferred_block_is_raised_after_it(ctrl_c_as_in_a_terminal):
    finished = False
    with interrupts.remembered():
        with pytest.raises(interrupts.Terminated):
            with interrupts.deferred():  # a checkpoint's save
                signal.raise_signal(signal.SIGTERM)  # remembered, not raised
                finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                raise KeyboardInterrupt  # an exception of the block's own goes through


def test_a_handler_set_by_the_program_is_left_alone(ctrl_c_as_in_a_terminal):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as `nohup`-like launchers may leave it
    with interrupts.remembered():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # ours
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_is_pending_without_ctrl_c(ctrl_c_as_in_a_terminal):
    with interrupts.remembered():
        interrupts.raise_if_pending()


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_command_whose_interrupt_was_swallowed_exits_with_its_status(signum, code, line):
    program = ("import signal\n"
               "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
               "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
               "from fmnist_jax.cli import user_errors_exit_1\n"
               "from tests.test_interrupts import _ctrl_c_swallowed_by_a_gc_callback\n"
               "user_errors_exit_1(lambda argv: _ctrl_c_swallowed_by_a_gc_callback("
               f"report=True, signum={int(signum)}))([])\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == code, result.stderr
    # One line: Python's "Exception ignored in ... KeyboardInterrupt" report is kept quiet.
    assert result.stderr.strip().splitlines() == [line], result.stderr


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
