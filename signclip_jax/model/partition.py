"""Pallas kernels under a batch-sharded mesh: each device runs the kernel on its own rows.

XLA does not partition a `pallas_call` (splash attention on TPU, model/splash.py; our flash
kernel, model/flash_dropout.py): under jit with batch-sharded q, k, v it would gather every
device's rows onto each device and run the whole batch everywhere. The train and eval steps
(train/step.py) trace the model inside `batch_sharded(mesh, axes)`, and the attention code
calls its kernels through `per_shard`, which runs them in `jax.shard_map` over those axes.
Outside such a context (a single device, inference, tests) `per_shard` calls the kernel as is.

Kernels that hash the batch index (dropout) take `row_offset`, the global index of the
shard's first row, so the masks do not depend on the number of devices.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

_LOCAL = threading.local()


@contextlib.contextmanager
def batch_sharded(mesh: Mesh, axes: Sequence[str]) -> Iterator[None]:
    """While tracing inside it, `per_shard` runs kernels per shard of `axes` of `mesh`."""
    previous = getattr(_LOCAL, "current", None)
    _LOCAL.current = (mesh, tuple(axes))
    try:
        yield
    finally:
        _LOCAL.current = previous


def _current() -> tuple[Mesh, tuple[str, ...]] | None:
    current = getattr(_LOCAL, "current", None)
    if current is None:
        return None
    mesh, axes = current
    return (mesh, axes) if _size(mesh, axes) > 1 else None


def per_shard(
    kernel: Callable[..., jax.Array],
    sharded: Sequence[jax.Array],
    replicated: Sequence[jax.Array] = (),
) -> jax.Array:
    """kernel(*sharded, *replicated, row_offset=...) with `sharded` arrays [B, ...] split
    over the batch axes of the current `batch_sharded` mesh (each device gets its rows and
    row_offset = the global index of its first row; the result [B, ...] is split the same
    way), `replicated` ones whole on every device. Without a sharded mesh: one call,
    row_offset 0."""
    current = _current()
    if current is None:
        return kernel(*sharded, *replicated, row_offset=0)
    mesh, axes = current
    rows = sharded[0].shape[0]

    def local(*args):
        local_rows = args[0].shape[0]
        if local_rows * _size(mesh, axes) != rows:
            raise ValueError(f"{rows} rows do not split over the batch axes {axes}")
        offset = jax.lax.axis_index(axes) * local_rows
        return kernel(*args, row_offset=offset)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(*(P(axes) for _ in sharded), *(P() for _ in replicated)),
        out_specs=P(axes),
        check_vma=False,  # Pallas calls carry no varying-axes information
    )(*sharded, *replicated)


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


__all__ = ["batch_sharded", "per_shard"]
