"""Multi-process start-up: call `jax.distributed.initialize` only when the environment says so.

A single-GPU or laptop run needs no coordinator, so initialisation is gated (as big_vision
gates it on an environment variable). It happens when any of these holds:

- explicit: `SIGNCLIP_COORDINATOR=host:port`, `SIGNCLIP_NUM_PROCESSES=N`, `SIGNCLIP_PROCESS_ID=i`
  (or the same as train flags). Used by the loopback tests and by hand-made launchers.
- SLURM: more than one task in the job step (`SLURM_NTASKS` > 1); JAX reads the rest.
- Cloud TPU pod slice: more than one worker in `TPU_WORKER_HOSTNAMES`; JAX reads the rest.
  Only GKE sets that variable: TPU VMs made with gcloud publish the topology through GCE
  metadata instead, so launch/tpu/worker_train.sh sets `SIGNCLIP_DISTRIBUTED=1`.
- `SIGNCLIP_DISTRIBUTED=1`: let JAX auto-detect whatever cluster it is on.

Must run before anything touches a JAX device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

from signclip_jax.errors import UserError

log = logging.getLogger(__name__)


def cluster_kind(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process environment this is: "explicit", "slurm", "tpu", "auto" or None."""
    env = os.environ if env is None else env
    if env.get("SIGNCLIP_COORDINATOR"):
        return "explicit"
    if _as_int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS"), 1) > 1:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    if env.get("SIGNCLIP_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return "auto"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Initialises jax.distributed if this is a multi-process run. Returns whether it did."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get("SIGNCLIP_COORDINATOR")
    if coordinator:
        num_processes = num_processes or _as_int(env.get("SIGNCLIP_NUM_PROCESSES"), None)
        process_id = (
            process_id if process_id is not None else _as_int(env.get("SIGNCLIP_PROCESS_ID"), None)
        )
        if num_processes is None or process_id is None:
            raise UserError(
                "a coordinator address needs the number of processes and this process's id "
                "(SIGNCLIP_NUM_PROCESSES and SIGNCLIP_PROCESS_ID, or the matching flags)"
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} is not in [0, {num_processes})")
        log.info(
            "jax.distributed: process %d of %d, coordinator %s",
            process_id,
            num_processes,
            coordinator,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
        return True
    kind = cluster_kind(env)
    if kind is None:
        return False
    log.info("jax.distributed: auto-detecting the %s cluster", kind)
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True


def _as_int(value: str | None, default):
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"expected an integer in the environment, got {value!r}") from None
