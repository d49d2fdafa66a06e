"""The training process's guards: a stop signal becomes a saved checkpoint, one trainer per
workdir.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag the train loop polls (save, then exit);
`WorkdirLock` refuses a second trainer writing the same local workdir.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from signclip_jax import files
from signclip_jax.errors import UserError

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the train loop polls: save, then exit cleanly.

    Preemptible TPU VMs and SLURM send SIGTERM shortly before they stop a job. A second
    SIGINT (Ctrl-C twice) falls back to the default behaviour and stops at once.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class WorkdirLock:
    """Refuses a second trainer in the same local workdir (`workdir/train.lock`).

    Two runs writing one workdir corrupt each other's checkpoints and metrics. The lock is a
    JSON object naming its owner: pid, host, the kernel's boot id and the process's start time
    (Linux /proc/<pid>/stat field 22, clock ticks since boot), written whole (temporary file +
    link) so a reader never sees half a lock. A process id alone is not enough: after a reboot
    or a long time, the same pid may belong to an unrelated process.

    A lock is taken over, with a warning, when its owner is surely gone: the pid is not alive,
    the host matches but the boot id differs (rebooted), or the pid now belongs to a process
    that started at another time (pid reused). A lock from another host (a shared file
    system) cannot be checked there: the owner refreshes the file's time every
    `heartbeat_s`, and such a lock is taken over once it is `other_host_stale_s` old.
    A lock of a live owner refuses, naming pid, host and the file.

    Old locks hold just a pid (no host): its process is taken to be the owner unless it is gone
    or started after the lock file was last written (it cannot have written it: pid reused).
    Object-store workdirs (gs://) are not locked: there, one job per workdir is the launcher's.
    """

    heartbeat_s = 30.0
    other_host_stale_s = 600.0

    def __init__(self, workdir: str | os.PathLike):
        self.path = None if files.is_remote(workdir) else Path(workdir) / "train.lock"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine: dict[str, Any] | None = None

    def __enter__(self) -> WorkdirLock:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = owner_info(os.getpid())
        text = json.dumps(mine, sort_keys=True)
        while True:
            if _create(self.path, text):
                break
            try:
                raw = self.path.read_text()
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError as e:
                raise UserError(f"cannot read the lock {self.path}: {e.strerror or e}") from None
            stale = _stale_reason(_parse(raw), raw, age, self.path, mine, self.other_host_stale_s)
            if stale is None:
                time.sleep(0.1)  # being written by another process (old versions wrote late)
                continue
            # Re-read right before removing, so a lock just replaced by another process stays.
            try:
                if self.path.read_text() != raw:
                    continue
            except FileNotFoundError:
                continue
            log.warning("taking over the stale lock %s: %s", self.path, stale)
            self.path.unlink(missing_ok=True)
        self._mine = mine
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="train.lock", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        """Refreshes the lock's time, so that another host sharing the folder sees it live."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed or unreachable: the next __enter__ elsewhere decides

    def __exit__(self, *exc) -> None:
        if self.path is None or self._mine is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = _parse(self.path.read_text())
        except OSError:
            held = None
        if held == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine, self._thread = None, None


def owner_info(pid: int) -> dict[str, Any]:
    """What identifies process `pid` in a lock: pid, host, boot id and start time (the last
    two None where /proc does not give them)."""
    return {
        "pid": int(pid),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start_ticks": process_start_ticks(pid),
    }


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        # Field 2 (the command name) is in parentheses and may hold spaces or ')': split
        # after the last ')'; what follows starts at field 3.
        return int(stat[stat.rindex(")") + 2 :].split()[22 - 3])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of `pid` (seconds since the epoch), or None."""
    ticks = process_start_ticks(pid)
    if ticks is None:
        return None
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return None


def _create(path: Path, text: str) -> bool:
    """Writes `text` to `path` only if it does not exist, whole (temporary file + link)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".train.lock-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the owner from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return True
    finally:
        os.unlink(tmp)


def _parse(raw: str) -> dict[str, Any] | None:
    """The lock's owner: the JSON object, {"pid": n} for an old lock, None if unreadable."""
    raw = raw.strip()
    try:
        return {"pid": int(raw)}
    except ValueError:
        pass
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("pid"), int):
        return None
    return obj


def _stale_reason(
    owner: dict[str, Any] | None,
    raw: str,
    age: float,
    path: Path,
    mine: dict[str, Any],
    other_host_stale_s: float,
) -> str | None:
    """Why the lock is stale, None to look again in a moment; UserError when it is held."""
    if owner is None:
        if not raw.strip() and age < 2.0:
            return None  # an old version creates the file first and writes the pid after
        return f"unreadable content {raw[:40]!r}"
    pid = owner["pid"]
    host = owner.get("host")
    how = f"stop it or use another --workdir; if no training runs there, delete {path}"
    if host is not None and host != mine["host"]:
        if age > other_host_stale_s:
            return f"pid {pid} on host {host} has not refreshed it for {age:.0f} s"
        raise UserError(
            f"{path.parent} is in use by a training process on host {host} (pid {pid}, "
            f"lock refreshed {age:.0f} s ago); {how}"
        )
    if owner.get("boot_id") and mine["boot_id"] and owner["boot_id"] != mine["boot_id"]:
        return f"pid {pid} ran before this machine was restarted (boot id changed)"
    if pid == mine["pid"] and owner.get("start_ticks") in (None, mine["start_ticks"]):
        return "left by this process"
    if not _pid_alive(pid):
        return f"pid {pid} is not running"
    ticks = owner.get("start_ticks")
    now_ticks = process_start_ticks(pid)
    if ticks is not None and now_ticks is not None and ticks != now_ticks:
        return f"pid {pid} now belongs to another process (started at another time)"
    if "host" not in owner:  # an old lock: just a pid
        started = _process_start_time(pid)
        if started is not None and started > time.time() - age + 2.0:  # btime: whole seconds
            return f"pid {pid} started after the lock was written (pid reused)"
    raise UserError(
        f"{path.parent} is in use by another training process (pid {pid}"
        + (f" on {host}" if host else "")
        + f"); {how}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True
