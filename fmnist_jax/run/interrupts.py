"""Ctrl-C and SIGTERM that are never lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode of the main thread. When that
bytecode belongs to a garbage-collector callback (JAX registers one, `_xla_gc_callback`, which
runs at any allocation, often while XLA compiles), Python reports the exception as
"ignored" and goes on: the command would train to the end as if no key had been pressed.
So the commands' handler also remembers the signal, and the training calls `raise_if_pending`
where it is safe to stop (after the data loads, after the set-up, before each epoch), which
raises the interrupt again if it was swallowed. Python's report of the swallowed one (a
traceback ending in KeyboardInterrupt) is kept off the terminal: the interrupt is not lost,
so there is nothing to report.

SIGTERM (what `kill`, Slurm's preemption and a container's stop send) takes the same way, as
`Terminated`, a KeyboardInterrupt: by default it would end the process at once, leaving a
folder claimed before its first epoch and a checkpoint half written, where Ctrl-C gives the
first back and finishes the second (`deferred`).

Inside `deferred` (a checkpoint's save) either signal is only remembered, and raised on the
way out: the save, a fraction of a second, is finished, with its manifest, rather than left
half written, which would cost the run that epoch.

The pending signal is process state on the host, set only by the signal handler; nothing
jitted reads it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same clean stop."""


_pending: list[int] = []  # the signal that came, at most one
_deferring: list[bool] = []  # non-empty inside `deferred`


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame) -> None:
    if not _pending:
        _pending.append(signum)
    if not _deferring:
        raise _interrupt(signum)


def _ours(signum: int) -> bool:
    """Whether the signal still has the handler Python gives it: a shell starts background
    jobs with SIGINT ignored, and a program may have set its own; both stay so."""
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return signal.getsignal(signum) is default


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """While inside, Ctrl-C raises KeyboardInterrupt as usual and SIGTERM raises Terminated,
    and either is also remembered. Only in the main thread, and only for a signal whose
    handler is Python's own (`_ours`)."""
    _pending.clear()
    signums = [signum for signum in (signal.SIGINT, signal.SIGTERM) if _ours(signum)]
    if threading.current_thread() is not threading.main_thread() or not signums:
        yield
        return
    report_fn = sys.unraisablehook

    def report_unless_remembered(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending):
            report_fn(unraisable)

    before = {signum: signal.signal(signum, _on_signal) for signum in signums}
    sys.unraisablehook = report_unless_remembered
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        sys.unraisablehook = report_fn
        _pending.clear()


def raise_if_pending() -> None:
    """Raise the interrupt again (KeyboardInterrupt, or Terminated for SIGTERM) if its signal
    came and its exception was swallowed."""
    if _pending:
        raise _interrupt(_pending[0])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside, Ctrl-C and SIGTERM (where `remembered` handles them) are only
    remembered; one that came is raised on the way out, unless an exception leaves first."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if not _deferring:
        raise_if_pending()
