"""The training process's guards: a stop signal becomes a saved checkpoint, one trainer per
workdir.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag the train loop polls (save, then exit);
`WorkdirLock` refuses a second trainer writing the same local workdir.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from signclip_jax import files
from signclip_jax.errors import UserError


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

    Two runs writing one workdir corrupt each other's checkpoints and metrics. The lock holds
    the owner's pid; a lock whose process is gone (killed run) is taken over. Object-store
    workdirs (gs://) are not locked: there, one job per workdir is the launcher's job.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = None if files.is_remote(workdir) else Path(workdir) / "train.lock"

    def __enter__(self) -> WorkdirLock:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _read_pid(self.path)
                if owner is not None and owner != os.getpid() and _pid_alive(owner):
                    raise UserError(
                        f"{self.path.parent} is in use by another training process (pid {owner}); "
                        f"stop it or use another --workdir"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc) -> None:
        if self.path is not None and _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
