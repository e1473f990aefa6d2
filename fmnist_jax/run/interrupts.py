"""Ctrl-C that is never lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode of the main thread. When that
bytecode belongs to a garbage-collector callback (JAX registers one, `_xla_gc_callback`, which
runs at any allocation, often while XLA compiles), Python reports the exception as
"ignored" and goes on: the command would train to the end as if no key had been pressed.
So the commands' handler also remembers the signal, and the training loop calls
`raise_if_pending` where it is safe to stop (after the set-up, before each epoch), which
raises the interrupt again if it was swallowed. Python's report of the swallowed one (a
traceback ending in KeyboardInterrupt) is kept off the terminal: the interrupt is not lost,
so there is nothing to report.

The pending flag is process state on the host, set only by the signal handler; nothing jitted
reads it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_pending = threading.Event()


def _on_sigint(signum, frame) -> None:
    _pending.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """While inside, Ctrl-C raises KeyboardInterrupt as usual and is also remembered. Only in
    the main thread, and only where Python's own handler is installed (a shell starts
    background jobs with SIGINT ignored: that stays so)."""
    _pending.clear()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    report_fn = sys.unraisablehook

    def report_unless_remembered(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending.is_set()):
            report_fn(unraisable)

    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = report_unless_remembered
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = report_fn
        _pending.clear()


def raise_if_pending() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and its exception was swallowed."""
    if _pending.is_set():
        raise KeyboardInterrupt
