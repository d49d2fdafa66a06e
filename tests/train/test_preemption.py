"""signclip_jax.train.preemption: SIGTERM -> a flag the loop polls; one trainer per workdir."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from signclip_jax.errors import UserError
from signclip_jax.train import preemption


def test_preemption_guard_turns_sigterm_into_flag():
    with preemption.PreemptionGuard() as guard:
        assert guard.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_workdir_lock_refuses_a_second_trainer_and_takes_over_stale_locks(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "train.lock").write_text(str(other.pid))
        with pytest.raises(UserError, match=f"pid {other.pid}"):
            with preemption.WorkdirLock(tmp_path):
                pass
    finally:
        other.kill()
        other.wait()
    # The owner is gone now: the lock is stale and is taken over, then released.
    with preemption.WorkdirLock(tmp_path):
        held = json.loads((tmp_path / "train.lock").read_text())
        assert held == preemption.owner_info(os.getpid()) and held["pid"] == os.getpid()
    assert not (tmp_path / "train.lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


needs_proc = pytest.mark.skipif(
    preemption.process_start_ticks(os.getpid()) is None, reason="needs Linux /proc"
)


@pytest.fixture
def sleeper():
    """A live process unrelated to training (pid reuse after a reboot looks like this)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _write_lock(folder, content, mtime=None):
    path = folder / "train.lock"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _take_over(folder, caplog, *reason):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=preemption.__name__):
        with preemption.WorkdirLock(folder):
            assert json.loads((folder / "train.lock").read_text())["pid"] == os.getpid()
    assert not (folder / "train.lock").exists()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "taking over the stale lock" in message and str(folder / "train.lock") in message
    for part in reason:
        assert part in message, message


@needs_proc
def test_a_live_process_with_another_start_time_or_boot_is_a_stale_owner(tmp_path, sleeper, caplog):
    pid = sleeper.pid
    ticks = preemption.process_start_ticks(pid)
    owner = preemption.owner_info(pid)
    assert owner["start_ticks"] == ticks and owner["host"] == socket.gethostname()
    # The lock's owner started at another time: this pid was reused.
    _write_lock(tmp_path, {**owner, "start_ticks": ticks - 1})
    _take_over(tmp_path, caplog, f"pid {pid} now belongs to another process")
    # Written before a reboot (another boot id): nothing of that boot is running.
    if owner["boot_id"] is not None:  # (some sandboxes have no boot id)
        _write_lock(tmp_path, {**owner, "boot_id": "0000-not-this-boot"})
        _take_over(tmp_path, caplog, "restarted")
    # The same process (pid, start time, boot, host): still refused, naming pid and the way out.
    lock = _write_lock(tmp_path, owner)
    want = re.escape(f"pid {pid} on {owner['host']})") + ".*" + re.escape(f"delete {lock}")
    with pytest.raises(UserError, match=want):
        with preemption.WorkdirLock(tmp_path):
            pass
    assert json.loads(lock.read_text()) == owner  # left alone


@needs_proc
def test_an_old_pid_only_lock_of_a_process_started_after_it_is_stale(tmp_path, sleeper, caplog):
    # The lock file predates the live process: that process cannot have written it.
    _write_lock(tmp_path, str(sleeper.pid), mtime=time.time() - 3600)
    _take_over(tmp_path, caplog, f"pid {sleeper.pid} started after the lock was written")
    # Written after the process started: it may be the trainer, so refuse.
    _write_lock(tmp_path, f"{sleeper.pid}\n")
    with pytest.raises(UserError, match=f"pid {sleeper.pid}\\)"):
        with preemption.WorkdirLock(tmp_path):
            pass


def test_a_lock_from_another_host_is_stale_only_once_it_stops_being_refreshed(tmp_path, caplog):
    owner = {"pid": 1, "host": "another-host.invalid", "boot_id": "x", "start_ticks": 5}
    lock = _write_lock(tmp_path, owner)
    with pytest.raises(UserError, match=r"host another-host\.invalid \(pid 1, lock refreshed"):
        with preemption.WorkdirLock(tmp_path):
            pass
    _write_lock(tmp_path, owner, mtime=time.time() - preemption.WorkdirLock.other_host_stale_s - 60)
    _take_over(tmp_path, caplog, "on host another-host.invalid has not refreshed it")
    assert not lock.exists()


def test_the_owner_refreshes_its_lock_and_garbage_locks_are_stale(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(preemption.WorkdirLock, "heartbeat_s", 0.05)
    with preemption.WorkdirLock(tmp_path):
        lock = tmp_path / "train.lock"
        os.utime(lock, (1000.0, 1000.0))
        deadline = time.time() + 5
        while lock.stat().st_mtime == 1000.0 and time.time() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime > time.time() - 60
    _write_lock(tmp_path, "not a lock {", mtime=time.time() - 10)
    _take_over(tmp_path, caplog, "unreadable content")
    _write_lock(tmp_path, "", mtime=time.time() - 10)  # an old version that died mid-write
    _take_over(tmp_path, caplog, "unreadable content")
