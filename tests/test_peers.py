"""Several processes that cannot meet, or lose one: each ends with one `error:` line and exit
1 in a bounded time, never jax's stack trace after minutes."""

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from fmnist_jax import FmnistError
from fmnist_jax.data.csv_source import write_csv_split
from fmnist_jax.run import folder, parallel, peers
from tests.helpers import REPO, make_split, one_error_line, run_script
from tests.test_parallel import _free_port, _ours


@pytest.mark.parametrize("address,message", [
    ("hostA", "--coordinator-address 'hostA' has no port: give HOST:PORT"),
    ("hostA:", "--coordinator-address 'hostA:' has no port: give HOST:PORT"),
    ("hostA:abc", "the port must be a number from 1 to 65535, got 'abc'"),
    ("hostA:0", "got '0'"),
    ("hostA:70000", "got '70000'"),
    (":12345", "--coordinator-address :12345 has no host"),
    ("::1:12345", "write an IPv6 address in brackets, e.g. [::1]:12345"),
    ("no-such-host.invalid:12345", "the host no-such-host.invalid does not resolve"),
])
def test_a_malformed_coordinator_address_is_refused_before_jax_sees_it(address, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        parallel.distributed_settings(address, 2, 0)


def test_the_address_from_the_environment_is_named_so(monkeypatch):
    monkeypatch.setenv(parallel.COORDINATOR_ENV, "hostA")
    with pytest.raises(FmnistError, match=r"\$FMNIST_COORDINATOR_ADDRESS 'hostA' has no port"):
        parallel.distributed_settings(None, 2, 0)


@pytest.mark.parametrize("address", ["127.0.0.1:12345", "localhost:1", "[::1]:65535"])
def test_good_coordinator_addresses_pass(address):
    settings = parallel.distributed_settings(address, 2, 1, connect_timeout=7)
    assert (settings.coordinator_address, settings.connect_timeout) == (address, 7)
    assert parallel.distributed_settings(address, 2, 1).connect_timeout == 300


def test_a_connect_timeout_below_one_second_is_refused():
    with pytest.raises(FmnistError, match="--connect-timeout must be at least 1"):
        parallel.distributed_settings("127.0.0.1:1", 2, 0, connect_timeout=0)


@pytest.mark.slow
@pytest.mark.parametrize("address,message", [
    ("hostA:abc", "the port must be a number from 1 to 65535, got 'abc'"),  # was a segfault
    ("no-such-host.invalid:12345", "the host no-such-host.invalid does not resolve"),
])
def test_train_py_refuses_a_malformed_address_in_one_line(tmp_path, address, message):
    result = run_script("train.py", "--num-processes", 2, "--process-id", 1,
                        "--coordinator-address", address, "--workdir", tmp_path / "run",
                        timeout=60)
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_process_started_alone_gives_up_after_the_connect_timeout(tmp_path):
    """Its peers never come: a note says what it waits for, then one line at the timeout
    (it was jax's C++ check failure after 300 s)."""
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = run_script("train.py", "--num-processes", 2, "--process-id", 0,
                        "--coordinator-address", address, "--connect-timeout", 2,
                        "--workdir", tmp_path / "run", timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"note: waiting for 2 processes at {address} (up to 2 s)",
        f"error: the other processes did not join at {address} within 2 s: start all 2 "
        f"processes with the same --coordinator-address, one of them with --process-id 0 "
        f"(or pass a longer --connect-timeout)"]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two processes training, then the watch's 30 s of silence
def test_a_process_killed_while_training_ends_the_other_with_one_line(tmp_path):
    """Process 1 killed after the first epoch: process 0 says so and how to go on, within
    the watch's SILENCE_S (it waited jax's heartbeat timeout, then aborted with a stack
    trace); the folder then resumes as any interrupted run."""
    write_csv_split(make_split(4096, seed=0), tmp_path / "train.csv")
    write_csv_split(make_split(300, seed=1), tmp_path / "test.csv")
    run_dir, address = tmp_path / "run", f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = [(open(tmp_path / f"out-{i}", "w+"), open(tmp_path / f"err-{i}", "w+"))
            for i in range(2)]
    workers = [subprocess.Popen(
        [sys.executable, "scripts/train.py", "--num-processes", "2", "--process-id", str(i),
         "--coordinator-address", address, "--train-csv", str(tmp_path / "train.csv"),
         "--test-csv", str(tmp_path / "test.csv"), "--epochs", "100", "--batch-size", "32",
         "--eval-batch-size", "100", "--val-fraction", "0", "--no-progress",
         "--workdir", str(run_dir)], cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        for i, (out, err) in enumerate(logs)]
    try:
        deadline = time.monotonic() + 300
        history = run_dir / folder.HISTORY_FILE
        while not (history.exists() and history.read_text().strip()):
            assert time.monotonic() < deadline and workers[0].poll() is None, \
                (tmp_path / "err-0").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # into epoch 2
        workers[1].kill()
        killed = time.monotonic()
        workers[0].wait(timeout=peers.SILENCE_S + 60)
        took = time.monotonic() - killed
    finally:
        for w in workers:
            w.kill()
            w.wait()
    err = (tmp_path / "err-0").read_text()
    assert workers[0].returncode == 1, err[-3000:]
    assert _ours(err) == [
        f"note: waiting for 2 processes at {address} (up to 300 s)",
        f"error: process 1 of 2 stopped: restart every process with --resume {run_dir}"]
    assert took < peers.SILENCE_S + 30
    for out, err_file in logs:
        out.close()
        err_file.close()


class _Store:
    """The coordination service's key-value store as the watch uses it, with process 1's
    heartbeat set by the test."""

    def __init__(self):
        self.values = {f"{peers._KEY}1": "5"}

    def key_value_set(self, key, value, allow_overwrite):
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in list(self.values.items()) if k.startswith(prefix)]


def _watch(monkeypatch):
    monkeypatch.setattr(peers, "BEAT_S", 0.05)
    monkeypatch.setattr(peers, "SILENCE_S", 1.0)
    left = []
    monkeypatch.setattr(peers, "_leave", left.append)  # instead of os._exit
    store = _Store()
    watch = peers.PeerWatch(store, 2, 0)
    monkeypatch.setattr(peers, "_watch_uncaught_exceptions", lambda: None)
    monkeypatch.setattr("atexit.register", lambda fn, *a: None)
    # start() makes it the process's watch: undone after the test, or a later test's error
    # in this worker would end the worker as a process of a run that lost a peer.
    monkeypatch.setattr(peers.PeerWatch, "current", None)
    watch.start()
    return watch, store, left


@pytest.mark.slow
def test_the_last_beat_of_a_killed_process_is_not_news_from_it(monkeypatch):
    """Process 1 beat once more just before it was killed, and the watch reads that beat only
    after this process's collective failed: hear_from_others must still wait for the watch
    to find process 1 silent (then its line is the one printed), not return at once."""
    watch, store, left = _watch(monkeypatch)
    time.sleep(0.3)  # the watch has read "5"
    store.values[f"{peers._KEY}1"] = "6"  # the last beat, not read yet
    watch.hear_from_others()
    watch._leave_as(peers._DONE)
    assert left and left[0].startswith("process 1 of 2 stopped")


def test_a_process_that_beats_is_heard_at_once(monkeypatch):
    watch, store, left = _watch(monkeypatch)
    beating = threading.Event()

    def beat():
        count = 6
        while not beating.wait(0.05):
            store.values[f"{peers._KEY}1"] = str(count)
            count += 1

    threading.Thread(target=beat, daemon=True).start()
    started = time.monotonic()
    watch.hear_from_others()
    took = time.monotonic() - started
    beating.set()
    watch._leave_as(peers._DONE)
    assert not left and took < 0.9
