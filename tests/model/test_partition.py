"""Pallas kernels under a batch-sharded step (model/partition.py): on the 8-device CPU mesh
each device runs the kernel on its own rows (no collective in the compiled program), with the
same result as one call on the whole batch, dropout masks included (they hash global rows)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from signclip_jax.model import bert, flash_dropout, partition, splash
from signclip_jax.train import sharding

COLLECTIVE = re.compile(r"(all-gather|all-to-all|all-reduce|collective-permute)\(")


def _inputs(seed=0, b=8, s=16, n=2, hd=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, s, n, hd)).astype(np.float32) for _ in range(3))
    lengths = rng.integers(1, s + 1, b).astype(np.int32)
    segments = np.sort(rng.integers(0, 3, (b, s)), axis=1).astype(np.int32)
    return q, k, v, lengths, segments


def _run(fn, args, mesh, in_context):
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, shard) for a in args]

    def traced(*a):
        if not in_context:
            return fn(*a)
        with partition.batch_sharded(mesh, ("data",)):
            return fn(*a)

    compiled = jax.jit(traced, out_shardings=shard).lower(*args).compile()
    return np.asarray(compiled(*args)), len(COLLECTIVE.findall(compiled.as_text()))


def test_flash_kernel_runs_per_shard_with_the_global_dropout_mask():
    mesh = sharding.make_mesh((8,), ("data",))
    q, k, v, lengths, _ = _inputs()
    seed = np.array([123, 456], np.uint32)

    def attend(q, k, v, lengths):
        return bert._flash_attention(
            q, k, v, lengths=lengths, mask=None, segments=None, seed=seed, rate=0.3
        )

    whole, gathered = _run(attend, [q, k, v, lengths], mesh, in_context=False)
    assert gathered > 0  # without it XLA moves the rows between devices
    per_device, collectives = _run(attend, [q, k, v, lengths], mesh, in_context=True)
    assert collectives == 0
    np.testing.assert_allclose(per_device, whole, rtol=1e-6, atol=1e-6)
    # The same as the unsharded kernel on one device, and dropout really dropped something.
    plain = flash_dropout.attention(q, k, v, lengths=lengths, seed=seed, rate=0.3)
    np.testing.assert_allclose(per_device, np.asarray(plain), rtol=1e-6, atol=1e-6)
    undropped = flash_dropout.attention(q, k, v, lengths=lengths)
    assert np.abs(per_device - np.asarray(undropped)).max() > 1e-2


def test_splash_kernel_runs_per_shard():
    mesh = sharding.make_mesh((8,), ("data",))
    q, k, v, _, segments = _inputs(1)

    def attend(q, k, v, segments):
        return bert._attention(
            q, k, v, lengths=None, mask=None, segments=segments, implementation="splash"
        )

    original = bert._segment_kernel
    bert._segment_kernel = lambda implementation: "splash"
    try:
        per_device, collectives = _run(attend, [q, k, v, segments], mesh, in_context=True)
    finally:
        bert._segment_kernel = original
    assert collectives == 0
    expected = splash.segment_attention(q, k, v, segments)
    np.testing.assert_allclose(per_device, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_without_a_sharded_mesh_the_kernel_is_called_once():
    calls = []

    def kernel(x, row_offset):
        calls.append(row_offset)
        return x * 2

    x = jnp.ones((4, 3))
    np.testing.assert_array_equal(partition.per_shard(kernel, [x]), 2 * np.ones((4, 3)))
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with partition.batch_sharded(one_device, ("data",)):
        partition.per_shard(kernel, [x])
    assert calls == [0, 0]
