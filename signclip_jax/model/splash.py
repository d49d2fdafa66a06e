"""Packed-row attention on TPU: the Pallas splash-attention kernel with segment ids.

Used by model/bert.py for packed rows (data/clip_packing.py) when the backend is a TPU. On
other backends it runs in Pallas interpret mode (tests check its numerics on CPU that way).
Splash works in [N, S, Hd] per example and in tiles of `BLOCK` tokens: rows are padded to a
multiple of it with segment 0 (padding attends to padding only) and cut back afterwards, so
a TPU row length that is a multiple of 128 (e.g. data.packing_row_len = 384) wastes nothing.

Not measured on a TPU here. XLA does not partition a Pallas call: under a batch-sharded step
each device runs it on its own rows (model/partition.py, called from model/bert.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

BLOCK = 128  # tokens per tile (q and kv, forward and backward)


@functools.lru_cache(maxsize=16)
def _kernel(heads: int, seq: int, interpret: bool):
    """A splash kernel for [heads, seq, Hd] inputs with a full mask (segments restrict it)."""
    b = BLOCK
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = sm.MultiHeadMask([sm.FullMask((seq, seq)) for _ in range(heads)])
    # Concrete mask tables even when first built inside a trace: the kernel is cached and
    # reused by later traces, which must not see another trace's values.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _interpret() -> bool:
    return jax.default_backend() != "tpu"


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Softmax attention block-diagonal by segment id. q, k, v [B, S, N, Hd], segments [B, S]
    int -> [B, S, N, Hd] in q's dtype (scores scaled by 1/sqrt(Hd), as dot_product_attention).
    """
    _, s, n, hd = q.shape
    pad = (-s) % BLOCK
    total = s + pad
    kernel = _kernel(n, total, _interpret())
    scale = 1.0 / np.sqrt(hd)

    def heads_first(x):  # [B, S, N, Hd] -> [B, N, S + pad, Hd]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    kh, vh = heads_first(k), heads_first(v)
    seg = jnp.pad(jnp.asarray(segments, jnp.int32), ((0, 0), (0, pad)))

    def one(qe, ke, ve, se):
        return kernel(qe, ke, ve, segment_ids=sk.SegmentIds(q=se, kv=se))

    out = jax.vmap(one)(qh, kh, vh, seg)  # [B, N, S + pad, Hd]
    return out.transpose(0, 2, 1, 3)[:, :s].astype(q.dtype)


__all__ = ["BLOCK", "segment_attention"]
