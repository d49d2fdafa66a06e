"""Blockwise (flash) softmax attention with attention-probability dropout, in Pallas.

model.attention = "pallas". The forward kernel walks the keys tile by tile with an online
softmax (fp32 running max and sum per query); the backward kernels (one for dK/dV, one for dQ)
recompute the probabilities from q, k and the saved per-query max and sum, and the dropout
mask from the counter-based hash of (seed, b, n, t, s) (model/attention_dropout.py), so no
[S, S] array is ever stored. Dropout follows HF BERT: the probabilities are normalised first,
then dropped and the kept ones scaled (`attention_dropout.apply`); rate 0 is plain attention.

Which keys a query attends to is given by integer ids: query t sees key s iff
q_ids[b, t] == k_ids[b, s]. A key-padding mask (valid prefix lengths or any [B, S] mask) is
q_ids = 1, k_ids = mask; packed rows are q_ids = k_ids = segment ids. Masked logits are
float32 min, as the XLA path, so a query with no visible key gets the same uniform average.
Rows are padded to a multiple of the tile sizes inside; those extra keys get -inf.

On GPU the kernels lower through Pallas' Triton backend (tile sizes must be powers of 2, at
least 16 there); elsewhere they run in interpret mode (slow: for tests). Not yet measured on a
GPU. XLA does not partition a Pallas call: under a batch-sharded step each device runs it on
its own rows (model/partition.py), with `row_offset` keeping the dropout mask global.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from signclip_jax.model import attention_dropout as ad

BLOCK_Q = 32  # query tile (GPU default; a tuning knob for the first GPU session)
BLOCK_K = 32  # key tile
_MASKED = float(np.finfo(np.float32).min)
# Pallas' Triton backend on GPU (jax 0.10 would otherwise pick Mosaic GPU, whose copies need
# warpgroup-sized blocks); num_warps / num_stages are tuning knobs for the first GPU session.
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=2)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _logits(q, k, qid, kid, s_idx, *, sm_scale, seq):
    """[bq, Hd] x [bk, Hd] -> masked fp32 logits [bq, bk]."""
    x = (
        jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        * sm_scale
    )
    x = jnp.where(qid[:, None] == kid[None, :], x, _MASKED)
    return jnp.where(s_idx[None, :] < seq, x, -jnp.inf), qid[:, None] == kid[None, :]


def _row_hash(seed_ref):
    """hy of this program's (b, n) (grid axes 1 and 2). Read at the kernel's top level:
    interpret mode does not lower program_id inside loops."""
    b = pl.program_id(1).astype(jnp.uint32) + seed_ref[2]  # + the shard's first row
    return ad.row_hash(seed_ref[0], seed_ref[1], b, pl.program_id(2))


def _keep_scale(seed1, hy, t_idx, s_idx, *, rate):
    """The dropout factor of a tile [bq, bk]: keep_scale(rate) where kept, else 0."""
    keep = ad.keep_from_hash(ad.element_hash(seed1, hy, t_idx[:, None], s_idx[None, :]), rate)
    return jnp.where(keep, jnp.float32(ad.keep_scale(rate)), jnp.float32(0.0))


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a^T b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(
    seed_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, o_ref, m_ref, total_ref,
    *, sm_scale, rate, block_q, block_k, seq, num_k,
):  # fmt: skip
    i = pl.program_id(0)
    q = q_ref[...]
    t_idx = i * block_q + jnp.arange(block_q)
    qid = qid_ref[pl.ds(i * block_q, block_q)]
    seed1, hy = seed_ref[1], _row_hash(seed_ref)

    def body(j, carry):
        o, m, total = carry
        ks = pl.ds(j * block_k, block_k)
        s_idx = j * block_k + jnp.arange(block_k)
        x, _ = _logits(q, k_ref[ks, :], qid, kid_ref[ks], s_idx, sm_scale=sm_scale, seq=seq)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(x - m_new[:, None])
        total = total * correction + jnp.sum(p, axis=1)  # normaliser of the undropped probabilities
        if rate:
            p = p * _keep_scale(seed1, hy, t_idx, s_idx, rate=rate)
        v = v_ref[ks, :]
        o = o * correction[:, None] + _dot(p.astype(v.dtype), v)
        return o, m_new, total

    init = (
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        jnp.full((block_q,), _MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    o, m, total = jax.lax.fori_loop(0, num_k, body, init)
    o_ref[...] = (o / total[:, None]).astype(o_ref.dtype)
    m_ref[...] = m
    total_ref[...] = total


def _probs_and_ds(q, k, v, do, qid, kid, m, total, delta, t_idx, s_idx, seeds, *, statics):
    """Recomputed tile [bq, bk]: dropped probabilities (for dV) and the logits' gradient."""
    x, visible = _logits(q, k, qid, kid, s_idx, sm_scale=statics["sm_scale"], seq=statics["seq"])
    p = jnp.exp(x - m[:, None]) / total[:, None]
    dp = jax.lax.dot_general(
        do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # d(dropped probabilities)
    if statics["rate"]:
        factor = _keep_scale(*seeds, t_idx, s_idx, rate=statics["rate"])
        p_dropped, dp = p * factor, dp * factor
    else:
        p_dropped = p
    ds = jnp.where(visible, p * (dp - delta[:, None]), 0.0)  # masked logits are constants
    return p_dropped, ds


def _dkdv_kernel(
    seed_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, do_ref, m_ref, total_ref, delta_ref,
    dk_ref, dv_ref, *, sm_scale, rate, block_q, block_k, seq, num_q,
):  # fmt: skip
    j = pl.program_id(0)
    ks = pl.ds(j * block_k, block_k)
    k, v, kid = k_ref[ks, :], v_ref[ks, :], kid_ref[ks]
    s_idx = j * block_k + jnp.arange(block_k)
    statics = dict(sm_scale=sm_scale, rate=rate, seq=seq)
    seeds = (seed_ref[1], _row_hash(seed_ref))

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(i * block_q, block_q)
        q, do = q_ref[qs, :], do_ref[qs, :]
        t_idx = i * block_q + jnp.arange(block_q)
        p_dropped, ds = _probs_and_ds(
            q, k, v, do, qid_ref[qs], kid, m_ref[qs], total_ref[qs], delta_ref[qs], t_idx, s_idx,
            seeds, statics=statics,
        )  # fmt: skip
        dv = dv + _dot_tn(p_dropped.astype(do.dtype), do)
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, num_q, body, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    seed_ref, qid_ref, kid_ref, q_ref, k_ref, v_ref, do_ref, m_ref, total_ref, delta_ref,
    dq_ref, *, sm_scale, rate, block_q, block_k, seq, num_k,
):  # fmt: skip
    i = pl.program_id(0)
    qs = pl.ds(i * block_q, block_q)
    q, do = q_ref[...], do_ref[...]
    qid, m, total, delta = qid_ref[qs], m_ref[...], total_ref[...], delta_ref[...]
    t_idx = i * block_q + jnp.arange(block_q)
    statics = dict(sm_scale=sm_scale, rate=rate, seq=seq)
    seeds = (seed_ref[1], _row_hash(seed_ref))

    def body(j, dq):
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :]
        s_idx = j * block_k + jnp.arange(block_k)
        _, ds = _probs_and_ds(
            q, k, v_ref[ks, :], do, qid, kid_ref[ks], m, total, delta, t_idx, s_idx, seeds,
            statics=statics,
        )  # fmt: skip
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------- specs
def _tile(block):  # [B, S, N, Hd] tile of `block` tokens at grid step (i, b, n)
    return lambda hd: pl.BlockSpec((None, block, None, hd), lambda i, b, n: (b, i, n, 0))


def _row(seq, hd):  # [B, S, N, Hd]: all tokens of one (b, n)
    return pl.BlockSpec((None, seq, None, hd), lambda i, b, n: (b, 0, n, 0))


def _stats_tile(block):  # [B, N, S] per-query statistics
    return pl.BlockSpec((None, None, block), lambda i, b, n: (b, n, i))


def _stats_row(seq):
    return pl.BlockSpec((None, None, seq), lambda i, b, n: (b, n, 0))


def _ids_row(seq):  # [B, S] ids
    return pl.BlockSpec((None, seq), lambda i, b, n: (b, 0))


_SEED = pl.BlockSpec((3,), lambda i, b, n: (0,))  # seed words, row offset


def _forward(q, k, v, qid, kid, seed, *, rate, block_q, block_k, seq, sm_scale):
    bsz, sp, heads, hd = q.shape
    kernel = functools.partial(
        _forward_kernel, sm_scale=sm_scale, rate=rate, block_q=block_q,
        block_k=block_k, seq=seq, num_k=sp // block_k,
    )  # fmt: skip
    stats = jax.ShapeDtypeStruct((bsz, heads, sp), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid=(sp // block_q, bsz, heads),
        in_specs=[
            _SEED,
            _ids_row(sp),
            _ids_row(sp),
            _tile(block_q)(hd),
            _row(sp, hd),
            _row(sp, hd),
        ],
        out_specs=[_tile(block_q)(hd), _stats_tile(block_q), _stats_tile(block_q)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats],
        interpret=_interpret(),
        compiler_params=_TRITON,
        name="flash_dropout_forward",
    )(seed, qid, kid, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, qid, kid, seed, rate, statics):
    return _forward(q, k, v, qid, kid, seed, rate=rate, **dict(statics))[0]


def _flash_fwd(q, k, v, qid, kid, seed, rate, statics):
    o, m, total = _forward(q, k, v, qid, kid, seed, rate=rate, **dict(statics))
    return o, (q, k, v, qid, kid, seed, o, m, total)


def _flash_bwd(rate, statics, residuals, do):
    q, k, v, qid, kid, seed, o, m, total = residuals
    bsz, sp, heads, hd = q.shape
    st = dict(statics)
    block_q, block_k, seq, sm_scale = st["block_q"], st["block_k"], st["seq"], st["sm_scale"]
    # rowsum(dP * P) of the softmax gradient; with dropout it is still do . o (o dropped).
    delta = jnp.einsum("bsnh,bsnh->bns", o.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(sm_scale=sm_scale, rate=rate, block_q=block_q, block_k=block_k, seq=seq)
    args = (seed, qid, kid, q, k, v, do, m, total, delta)
    row, stats = _row(sp, hd), _stats_row(sp)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, num_q=sp // block_q, **common),
        grid=(sp // block_k, bsz, heads),
        in_specs=[_SEED, _ids_row(sp), _ids_row(sp), row, row, row, row, stats, stats, stats],
        out_specs=[_tile(block_k)(hd), _tile(block_k)(hd)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=_interpret(),
        compiler_params=_TRITON,
        name="flash_dropout_dkdv",
    )(*args)
    q_tile, stats_tile = _tile(block_q)(hd), _stats_tile(block_q)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_k=sp // block_k, **common),
        grid=(sp // block_q, bsz, heads),
        in_specs=[
            *(_SEED, _ids_row(sp), _ids_row(sp), q_tile, row, row, q_tile),
            *(stats_tile, stats_tile, stats_tile),
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=_interpret(),
        compiler_params=_TRITON,
        name="flash_dropout_dq",
    )(*args)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    segments: jax.Array | None = None,
    seed: jax.Array | None = None,
    rate: float = 0.0,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    row_offset: jax.Array | int = 0,
) -> jax.Array:
    """Softmax attention with dropout on the probabilities. q, k, v [B, S, N, Hd] (bf16 or
    fp32); at most one of lengths [B] int (valid prefix), mask [B, S] bool (keys) and
    segments [B, S] int (packed rows); seed [2] uint32 (`attention_dropout.seed_words`), needed
    when rate > 0 -> [B, S, N, Hd] in q's dtype. Logits are scaled by 1/sqrt(Hd).
    row_offset: the global index of row 0 (a batch shard's first row, model/partition.py):
    the dropout mask hashes global rows, whatever the number of devices.
    """
    bsz, s, _, hd = q.shape
    if sum(x is not None for x in (lengths, mask, segments)) > 1:
        raise ValueError("flash attention takes at most one of lengths, mask and segments")
    if rate and seed is None:
        raise ValueError("flash attention with dropout needs a seed")
    ad.threshold(rate)  # validates the rate
    if segments is not None:
        qid = kid = jnp.asarray(segments, jnp.int32)
    else:
        if lengths is not None:
            mask = _key_mask(jnp.asarray(lengths, jnp.int32), s)
        kid = jnp.ones((bsz, s), jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        qid = jnp.ones((bsz, s), jnp.int32)
    tile = int(np.lcm(block_q, block_k))
    pad = (-s) % tile
    hd_pad = int(pl.next_power_of_2(hd)) - hd  # Triton tiles are powers of 2

    def padded(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, hd_pad)))

    qid, kid = (jnp.pad(x, ((0, 0), (0, pad)), constant_values=-1) for x in (qid, kid))
    seed = jnp.zeros((2,), jnp.uint32) if seed is None else jnp.asarray(seed, jnp.uint32)
    seed = jnp.concatenate([seed, jnp.asarray(row_offset, jnp.uint32).reshape(1)])
    scale = float(1 / np.sqrt(hd))
    statics = (("block_q", block_q), ("block_k", block_k), ("seq", s), ("sm_scale", scale))
    # hashable, for custom_vjp's static arguments; the scale of the unpadded head dim
    out = _flash(padded(q), padded(k), padded(v), qid, kid, seed, float(rate), statics)
    return out[:, :s, :, :hd]


def _key_mask(lengths: jax.Array, seq: int) -> jax.Array:
    """Valid-prefix lengths [B] -> key mask [B, seq] bool (as bert.key_mask)."""
    return jnp.arange(seq, dtype=jnp.int32)[None] < lengths[:, None]


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    segments: jax.Array | None = None,
    seed: jax.Array | None = None,
    rate: float = 0.0,
) -> jax.Array:
    """The same attention in plain XLA (explicit [B, N, S, S]), for tests: fp32 logits."""
    s = q.shape[1]
    x = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    x = x / np.sqrt(q.shape[-1])
    if segments is not None:
        visible = (segments[:, :, None] == segments[:, None, :])[:, None]
    elif lengths is not None or mask is not None:
        keys = _key_mask(jnp.asarray(lengths, jnp.int32), s) if mask is None else mask
        visible = keys[:, None, None, :]
    else:
        visible = jnp.ones((1, 1, 1, s), bool)
    p = jax.nn.softmax(jnp.where(visible, x, _MASKED), axis=-1)
    if rate:
        p = ad.apply(p, seed, rate)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v)


__all__ = ["BLOCK_K", "BLOCK_Q", "attention", "reference"]
