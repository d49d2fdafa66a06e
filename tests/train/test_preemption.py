"""signclip_jax.train.preemption: SIGTERM -> a flag the loop polls; one trainer per workdir."""

import os
import signal
import subprocess
import sys

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
        assert (tmp_path / "train.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "train.lock").exists()
