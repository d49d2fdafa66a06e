"""Device mesh, logical partitioning rules for parameters, and batch sharding.

Parameters carry their logical axis names as Variable metadata (`nnx.Param(value,
logical_axes=("embed", "mlp"))`); that metadata survives `nnx.state`, `nnx.split`, `jax.jit`,
gradients and `nnx.Optimizer` state (checked with flax 0.12.8). A rule table maps each logical
name to mesh axes; `param_shardings` turns a whole state into NamedShardings.

Default layout (FSDP): the "embed" dimension is split over the "fsdp" axis. When it is not
divisible, the "fsdp" axis moves to the largest other unsharded dimension that is, else the
parameter is replicated on that axis. Meshes with a "model" axis also get tensor parallelism
on "heads", "mlp", "vocab" and "embed_out". Mesh axes that a mesh lacks are simply dropped, so
the same rules serve (data,), (data, fsdp) and (data, fsdp, model) meshes.

The batch (leading dim) is split over all batch axes, ("data", "fsdp") by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from signclip_jax.errors import UserError

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed_out", "model"),
    ("pose_in", None),
)
DEFAULT_BATCH_AXES = ("data", "fsdp")
# Axes that may move to another dimension when theirs is not divisible: pure storage
# sharding (FSDP) gathers the full parameter before use, so which dimension is split does not
# change the computation. Tensor-parallel axes stay put (or replicate).
FALLBACK_AXES = ("fsdp",)


def make_mesh(
    shape: Sequence[int],
    axis_names: Sequence[str] = ("data", "fsdp"),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes).

    One entry of `shape` may be -1 (= all remaining devices). Axes are `AxisType.Auto`:
    plain jit/GSPMD code (embedding lookups with a sharded batch) fails under Explicit axes.
    """
    shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise UserError(f"mesh.shape {shape} has {len(shape)} axes but names {axis_names}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh.shape {shape}: sizes must be positive, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise UserError(f"mesh.shape {shape}: {len(devices)} devices not divisible by {known}")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise UserError(
            f"mesh.shape {shape} needs {math.prod(shape)} devices; {len(devices)} available"
        )
    return jax.make_mesh(
        shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def _rule_axes(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    fallback_axes: Sequence[str] = FALLBACK_AXES,
) -> P:
    """PartitionSpec (one entry per dim) for an array with these logical axis names.

    Each mesh axis is used at most once (first dim wins) and only if the mesh has it. A dim
    whose size is not divisible by its mesh axes is replicated; a displaced axis from
    `fallback_axes` then moves to the largest still-unsharded dim it divides.
    `logical_axes=None` (unannotated) gives full replication.
    """
    shape = tuple(shape)
    if logical_axes is None:
        return P(*([None] * len(shape)))
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {shape}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec: list[tuple[str, ...] | None] = [None] * len(shape)
    displaced: list[str] = []
    for dim, name in enumerate(logical_axes):
        axes = tuple(a for a in _rule_axes(name, rules) if a in sizes and a not in used)
        if not axes:
            continue
        if shape[dim] % math.prod(sizes[a] for a in axes) == 0:
            spec[dim] = axes
            used.update(axes)
        else:
            displaced.extend(a for a in axes if a in fallback_axes)
    for axis in displaced:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % sizes[axis] == 0]
        if free and axis not in used:
            dim = max(free, key=lambda d: shape[d])  # first of the largest
            spec[dim] = (axis,)
            used.add(axis)
    return P(*(None if a is None else a[0] if len(a) == 1 else a for a in spec))


def _leaf_sharding(leaf: Any, mesh: Mesh, rules: Rules) -> Any:
    if isinstance(leaf, nnx.Variable):
        value = leaf.get_raw_value()
        logical = leaf.get_metadata().get("logical_axes")
        spec = logical_to_spec(logical, np.shape(value), mesh, rules)
        return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P(*([None] * len(np.shape(leaf)))))


def param_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Same tree as `state`, each leaf replaced by its NamedSharding.

    `state` is an `nnx.State` (params, or `nnx.state(optimizer)`, whose moment Variables keep
    the params' `logical_axes`), or any pytree; Variables without `logical_axes` and plain
    arrays are replicated. Usable with `jax.device_put(state, shardings)` and as jit
    `in_shardings`/`out_shardings`. Values may be arrays or `jax.ShapeDtypeStruct`s.
    """
    return jax.tree.map(
        lambda x: _leaf_sharding(x, mesh, rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _batch_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in batch_axes if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> NamedSharding:
    """Leading dim split over the batch axes present in the mesh, other dims replicated."""
    return NamedSharding(mesh, P(_batch_axes(mesh, batch_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Full replication on every device of the mesh (scalars, loss params, metrics)."""
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> int:
    """How many pieces the global batch is cut into (product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in _batch_axes(mesh, batch_axes))


def shard_batch(
    batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    batch_axes: Sequence[str] = DEFAULT_BATCH_AXES,
) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over the batch axes.

    Every process passes its own slice ([b_process, ...], same size on every process); the
    global batch is their concatenation in process order. Works single- and multi-process.
    """
    sharding = batch_sharding(mesh, batch_axes)
    local_shards = len(sharding.addressable_devices) // _replicas_per_shard(mesh, batch_axes)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % max(local_shards, 1):
            raise UserError(
                f"batch key {key!r} has shape {value.shape}: its leading dim must split evenly "
                f"over this process's {local_shards} batch shards"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _replicas_per_shard(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    return mesh.size // num_batch_shards(mesh, batch_axes)


def optimizer_shardings(tx, params, mesh: Mesh):
    """Shardings of `tx.init(params)`: moments like their parameters, counters replicated.

    `jax.jit(tx.init)` alone leaves every leaf on one device; this gives the placement to
    pass as its `out_shardings` (and to the train step).
    """
    abstract = jax.eval_shape(tx.init, params)
    param_sharding = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        param_sharding,
        transform_non_params=lambda _: replicated(mesh),
    )
