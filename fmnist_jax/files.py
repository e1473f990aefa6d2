"""Small helpers that several layers share: an atomic file write, an exclusive file lock,
quieting absl's logs, and an exception's first line for a one-line error."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: a crash or
    a full disk never leaves a half file in place of a good one. OSError on failure, with
    the temporary file removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: writers may race
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def lock_file(handle, *, wait: bool) -> bool:
    """An exclusive flock on the open file `handle`, held until it is closed or unlocked.
    `wait` False: False at once when another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def quiet_absl(level: str = "fatal") -> Iterator[None]:
    """absl's log verbosity set to `level` ("error" or "fatal") inside the block: the
    libraries that log through absl (orbax, tfds) then fail only through their exceptions,
    which the caller turns into one line."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity({"error": absl_logging.ERROR, "fatal": absl_logging.FATAL}[level])
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut
    after the last whole word within `limit` characters, with " ..." marking the cut: the
    part worth quoting in a one-line error, with no path or word broken off mid-way."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit + 1)
    return line[:cut if cut > 0 else limit].rstrip() + " ..."
