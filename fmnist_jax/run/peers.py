"""The processes of one run, as they meet and while they train: the coordinator's address
checked before jax sees it, the join bounded by --connect-timeout, and a watch on the other
processes so that one that stops ends the others with one line.

jax reports these failures badly: its coordination client ends the process through a C++
check failure (a stack trace, no Python exception) when the others do not join in time,
when a process stops sending heartbeats (after 100 s, while the others wait in a collective
or a barrier) and when process 0, which hosts the coordination service, is gone; the text
is in jax's own fault-tolerance guide (https://github.com/jax-ml/jax/pull/39095). So each
deadline here is ours and comes before jax's: a timer for the join, and our own heartbeats
through the coordination service's key-value store for the training, each ending the
process with `os._exit` after one `error:` line (jax's shutdown at exit would wait in a
barrier for the process that is gone).

Process 0's death is the exception: every other process's client aborts at once from a
thread of its own, before any Python code here can run.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time

from fmnist_jax.errors import FmnistError

DEFAULT_CONNECT_TIMEOUT_S = 300
# jax's heartbeat timeout, passed explicitly: our watch must decide well before it.
JAX_HEARTBEAT_TIMEOUT_S = 100
# A process whose heartbeat has not changed for this long has stopped (its own heartbeats
# come from a thread every BEAT_S; a busy process still runs it).
SILENCE_S = 30.0
BEAT_S = 1.0
GRACE_S = 10.0
_KEY = "fmnist_jax/alive/"
_DONE, _FAILED = "done", "failed"


def check_address(address: str, what: str = "--coordinator-address") -> str:
    """`address` if it is HOST:PORT ([IPV6]:PORT for an IPv6 address) with a port in
    1..65535 and a host that resolves; else FmnistError naming `what` (the flag or the
    environment variable it came from)."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:([^:]*)", address)
    if bracketed:
        host, port = bracketed.groups()
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif address.count(":") > 1:
        raise FmnistError(f"{what} {address} is not HOST:PORT: write an IPv6 address in "
                          f"brackets, e.g. [::1]:12345")
    else:
        host, port = address, ""
    if not port:
        raise FmnistError(f"{what} {address!r} has no port: give HOST:PORT, process 0's host "
                          f"and a free port there, e.g. {host or 'localhost'}:12345")
    if not host:
        raise FmnistError(f"{what} {address} has no host: give HOST:PORT, process 0's host "
                          f"and a free port there")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise FmnistError(f"{what} {address}: the port must be a number from 1 to 65535, "
                          f"got {port!r}")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise FmnistError(f"{what} {address}: the host {host} does not resolve ({reason}): "
                          f"give process 0's host name or IP address") from None
    return address


def _exit_now(code: int) -> None:
    """End the process at once, its output flushed: no atexit handler runs (jax's shutdown
    would wait in a barrier for a process that is gone)."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _leave(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    _exit_now(1)


def join(address: str, num_processes: int, process_id: int, timeout_s: int) -> None:
    """`jax.distributed.initialize`, bounded: a note on stderr says what this process waits
    for; when the others have not joined within `timeout_s`, one line and exit 1 (jax's own
    deadline, later than ours, would abort with a stack trace)."""
    import jax

    print(f"note: waiting for {num_processes} processes at {address} (up to {timeout_s} s)",
          file=sys.stderr, flush=True)
    lock = threading.Lock()
    joined = False

    def give_up():
        with lock:
            if not joined:
                _leave(f"the other processes did not join at {address} within {timeout_s} s: "
                       f"start all {num_processes} processes with the same "
                       f"--coordinator-address, one of them with --process-id 0 (or pass a "
                       f"longer --connect-timeout)")

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(address, num_processes, process_id,
                                   initialization_timeout=2 * timeout_s + 30,
                                   heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S)
    finally:
        with lock:
            joined = True
        timer.cancel()
    from jax._src import distributed  # the client jax made: jax.distributed does not expose it

    PeerWatch(distributed.global_state.client, num_processes, process_id).start()


class PeerWatch:
    """Heartbeats of our own among the processes of a run: every BEAT_S each process counts
    up its key in the coordination service's store and reads the others'. One whose count
    has not moved for SILENCE_S has stopped, and this process leaves with one line; so it
    does GRACE_S after one left with an error of its own ("failed": this process may be
    waiting for it in a collective), which gives this process's own error, if it has the
    same one, the time to be the line it prints. One that finished ("done") is left alone."""

    current: PeerWatch | None = None
    # The run folder, once there is one: the line then says how to continue it.
    run_folder: str | None = None

    def __init__(self, client, num_processes: int, process_id: int):
        self.client, self.n, self.me = client, num_processes, process_id
        self.others = [p for p in range(num_processes) if p != process_id]
        self.stopping = threading.Event()
        self.last: dict[int, str | None] = dict.fromkeys(self.others)
        self.changed = dict.fromkeys(self.others, time.monotonic())  # when last[p] changed
        # How many changes of each other's heartbeat this watch has seen: what
        # `hear_from_others` counts (a clock can be restarted, a count cannot).
        self.beats_seen = dict.fromkeys(self.others, 0)

    def start(self) -> None:
        import atexit

        PeerWatch.current = self
        self._beat(0)
        threading.Thread(target=self._run, name="fmnist-peer-watch", daemon=True).start()
        _watch_uncaught_exceptions()
        # Runs before jax's own shutdown (registered when jax was imported, so later).
        atexit.register(self._leave_as, _DONE)

    def _beat(self, value: int | str) -> None:
        self.client.key_value_set(f"{_KEY}{self.me}", str(value), allow_overwrite=True)

    def _values(self) -> dict[int, str]:
        pairs = self.client.key_value_dir_get(_KEY)
        return {int(key.rsplit("/", 1)[1]): value for key, value in pairs}

    def _run(self) -> None:
        count, previous = 0, time.monotonic()
        while not self.stopping.wait(BEAT_S):
            now = time.monotonic()
            if now - previous > 5 * BEAT_S:
                # This process itself was held up: it cannot judge the others' silence.
                self.changed = dict.fromkeys(self.others, now)
            previous, count = now, count + 1
            try:
                self._beat(count)
                values = self._values()
            except Exception:  # the coordination service is gone: jax ends this process
                values = {}
            for peer in self.others:
                # A key missing (the store unreadable, or a stopped process's key dropped)
                # is no beat.
                value = values.get(peer)
                if value is not None and value != self.last[peer]:
                    self.last[peer], self.changed[peer] = value, now
                    self.beats_seen[peer] += 1
            for peer in self.others:
                failed = self.last[peer] == _FAILED and now - self.changed[peer] > GRACE_S
                silent = (self.last[peer] not in (_DONE, _FAILED)
                          and now - self.changed[peer] > SILENCE_S)
                if (failed or silent) and not self.stopping.is_set():
                    how = (f"restart every process with --resume {self.run_folder}"
                           if self.run_folder else "start every process again")
                    try:
                        self._beat(_FAILED)
                    except Exception:
                        pass
                    _leave(f"process {peer} of {self.n} stopped"
                           f"{' with an error (see its output)' if failed else ''}: {how}")

    def _leave_as(self, value: str) -> None:
        """Stop watching and tell the others how this process leaves."""
        self.stopping.set()
        try:
            self._beat(value)
        except Exception:
            pass

    def hear_from_others(self) -> None:
        """Return once every other process has beaten since this call, or left on purpose;
        where one has stopped, the watch ends this process first (within SILENCE_S). An
        error of this process may be a process that stopped, seen from here (a collective
        or a barrier that failed): that is then the line to print."""
        # Two changes, not one: the watch reads the store once a BEAT_S, so the first change
        # it sees after this call may be the last beat of a process killed just before.
        wanted = {p: self.beats_seen[p] + 2 for p in self.others}
        # Twice the silence: the watch restarts its clocks when this process was held up
        # (a loaded machine), and must still be able to judge a stopped process first.
        deadline = time.monotonic() + 2 * SILENCE_S + 3 * BEAT_S
        while time.monotonic() < deadline:
            if all(self.beats_seen[p] >= wanted[p] or self.last[p] in (_DONE, _FAILED)
                   for p in self.others):
                return
            time.sleep(0.1)

    def wait_for_others(self) -> None:
        """Until every other process has left on purpose (up to SILENCE_S + GRACE_S)."""
        deadline = time.monotonic() + SILENCE_S + GRACE_S
        while time.monotonic() < deadline:
            try:
                values = self._values()
            except Exception:
                return
            if all(values.get(p) in (_DONE, _FAILED) for p in self.others):
                time.sleep(1.0)  # their own os._exit, under way
                return
            time.sleep(0.2)


def leave_with_error(message: str) -> None:
    """With several processes: unless another process has stopped (then the watch's line
    ends this one), print `message` as this process's `error:` line and end at once
    (`_exit_now`), process 0, the coordination service's host, once the others have left
    too (jax would end them with a stack trace when it is gone). With one process: return,
    nothing done."""
    watch = PeerWatch.current
    if watch is None:
        return
    watch.hear_from_others()
    print(f"error: {message}", file=sys.stderr)
    watch._leave_as(_FAILED)
    if watch.me == 0:
        watch.wait_for_others()
    _exit_now(1)


def _watch_uncaught_exceptions() -> None:
    """An exception no one catches while the processes train together (a collective that
    fails because a process is gone) hears from the others first: a process that stopped
    is one line; anything else is the traceback it is."""
    original = sys.excepthook

    def hook(kind, value, traceback):
        watch = PeerWatch.current
        if watch is None or issubclass(kind, KeyboardInterrupt):
            return original(kind, value, traceback)
        watch.hear_from_others()
        original(kind, value, traceback)
        watch._leave_as(_FAILED)
        if watch.me == 0:
            watch.wait_for_others()
        _exit_now(1)

    sys.excepthook = hook
