"""Counter-based dropout masks for attention probabilities: a stateless integer hash.

`jax.random.bernoulli` (threefry, 32 random bits per decision) materialises a [B, N, T, S]
array of random bits per layer. Here each keep decision is a pure function of
(64-bit seed, b, n, t, s) computed with a few uint32 multiply / xor / shift steps, so XLA can
fuse it into the softmax fusion (and a Pallas kernel can recompute it per tile: it needs no
state and no neighbouring elements). The same seed gives the same mask whatever the layout
(the batch size, sequence length or tiling around the element), so a backward pass or a
resumed step recomputes it exactly; a different dropout key gives an unrelated mask.

The hash: murmur3's 32-bit finalizer (`_fmix32`) applied in two keyed rounds,
    hy = fmix32(fmix32(((b << 16) | n) ^ seed0) + seed1)            per (b, n)
    h  = fmix32(fmix32(((t << 16) | s) + seed1) ^ hy)               per element
and a decision compares the top 16 bits of h with a threshold: drop iff
(h >> 16) < round(rate * 65536). 16 bits per decision instead of 32: the drop probability is
round(rate * 65536) / 65536, within 2**-17 (7.6e-6) of `rate` (rate 0.1 -> 0.100006); kept
probabilities are scaled by 65536 / (65536 - threshold), the reciprocal of the exact keep
probability, so the expectation is unbiased. b, n, t, s must each be < 65536.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BITS = 16  # bits compared per decision
_LEVELS = 1 << BITS


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def seed_words(key: jax.Array) -> jax.Array:
    """A dropout key (typed or raw) -> the 64-bit seed of one call as [2] uint32."""
    return jax.random.bits(key, (2,), jnp.uint32)


def threshold(rate: float) -> int:
    """Drop iff the 16 decision bits < this: round(rate * 65536)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate} is not in [0, 1)")
    return round(rate * _LEVELS)


def keep_scale(rate: float) -> float:
    """The factor kept probabilities are multiplied by: 1 / (exact keep probability)."""
    return _LEVELS / (_LEVELS - threshold(rate))


def counter_hash(seed0: jax.Array, seed1: jax.Array, x: jax.Array) -> jax.Array:
    """Two keyed fmix32 rounds of a uint32 counter x (broadcasting): for a fixed seed a
    bijection of uint32, so distinct counters never share a word."""
    return _fmix32(_fmix32(jnp.asarray(x).astype(jnp.uint32) ^ seed0) + seed1)


def row_hash(seed0: jax.Array, seed1: jax.Array, b: jax.Array, n: jax.Array) -> jax.Array:
    """The per-(batch row, head) word hy. seed0, seed1: the seed's uint32 words; b, n
    broadcastable ints (scalars inside a kernel)."""
    y = (jnp.asarray(b).astype(jnp.uint32) << 16) | jnp.asarray(n).astype(jnp.uint32)
    return counter_hash(seed0, seed1, y)


def element_hash(seed1: jax.Array, hy: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """The decision word h of query t, key s under row hash hy (broadcasting)."""
    x = (jnp.asarray(t).astype(jnp.uint32) << 16) | jnp.asarray(s).astype(jnp.uint32)
    return _fmix32(_fmix32(x + seed1) ^ hy)


def keep_from_hash(h: jax.Array, rate: float) -> jax.Array:
    """Decision words -> keep mask (bool, same shape)."""
    return (h >> (32 - BITS)) >= jnp.uint32(threshold(rate))


def _check_sizes(shape: tuple[int, ...]) -> None:
    if any(d > _LEVELS for d in shape):
        raise ValueError(f"attention dropout mask shape {shape}: every axis must be <= 65536")


def keep_mask(seed: jax.Array, shape: tuple[int, int, int, int], rate: float) -> jax.Array:
    """seed [2] uint32 (`seed_words`), shape (B, N, T, S) -> keep mask [B, N, T, S] bool,
    True with probability 1 - threshold(rate) / 65536, element (b, n, t, s) a function of
    (seed, b, n, t, s) only."""
    _check_sizes(shape)
    bsz, heads, tq, sk = shape
    seed = jnp.asarray(seed, jnp.uint32)
    b = jnp.arange(bsz)[:, None, None, None]
    hy = row_hash(seed[0], seed[1], b, jnp.arange(heads)[None, :, None, None])
    t = jnp.arange(tq)[None, None, :, None]
    s = jnp.arange(sk)[None, None, None, :]
    return keep_from_hash(element_hash(seed[1], hy, t, s), rate)


def apply_keep(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """x where `keep`, scaled by `keep_scale(rate)`; 0 elsewhere (x's dtype)."""
    scale = np.asarray(keep_scale(rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def apply(probs: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """Dropout on attention probabilities [B, N, T, S] with the hash mask: kept entries are
    scaled by `keep_scale(rate)`, dropped ones are 0. rate 0 returns probs unchanged."""
    if rate == 0.0:
        return probs
    return apply_keep(probs, keep_mask(seed, probs.shape, rate), rate)


__all__ = [
    "BITS",
    "apply",
    "apply_keep",
    "counter_hash",
    "element_hash",
    "keep_from_hash",
    "keep_mask",
    "keep_scale",
    "row_hash",
    "seed_words",
    "threshold",
]
