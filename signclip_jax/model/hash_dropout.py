"""Dropout of any rank with a counter-based hash mask, and `HashDropout`, an NNX module.

The mask follows attention_dropout.py's scheme for arrays of any shape: element i (its
row-major flat index, a uint32 counter) is kept iff the top 16 bits of
`counter_hash(seed, i)` (two keyed murmur3 fmix32 rounds) are >= round(rate * 65536), and
kept values are scaled by the reciprocal of that exact keep probability. Compared with
`nnx.Dropout` (`jax.random.bernoulli`: threefry, 32 random bits per decision, the bits
materialised) it is a few integer ops per element that XLA fuses into the consumer, and a
pure function of (seed, flat index): the backward pass and a replayed step recompute it.

Limit: the flat index is one 32-bit counter, so an array may hold at most 2**32 elements
(BERT's hidden states [B, S, H] reach 448 x 258 x 1024 ~ 1.2e8); larger arrays are a
ValueError. The mask depends on the flat index, so it is tied to the array's shape: the
same seed on a differently shaped array gives a different (equally random) mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from signclip_jax.model import attention_dropout as ad

MAX_ELEMENTS = 1 << 32  # the flat index is one uint32 counter


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element of `shape` as uint32, built from per-axis iotas
    so XLA fuses it into the consumer instead of materialising it."""
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        if shape[axis] > 1:  # (a size-1 axis adds nothing; its stride may be 2**32)
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return jnp.broadcast_to(index, shape)


def keep_mask_nd(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """seed [2] uint32 (`attention_dropout.seed_words`), any shape -> keep mask of `shape`
    (bool), True with probability 1 - threshold(rate) / 65536, element i a function of
    (seed, flat index i) only. Raises ValueError past 2**32 elements."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
        raise ValueError(
            f"hash dropout on shape {shape}: {size} elements exceed 2**32, the range of its "
            "32-bit element counter"
        )
    seed = jnp.asarray(seed, jnp.uint32)
    h = ad.counter_hash(seed[0], seed[1], _flat_index(shape))
    return ad.keep_from_hash(h, rate)


def apply_nd(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """Dropout on x (any shape) with the hash mask: kept entries scaled by
    `attention_dropout.keep_scale(rate)`, dropped ones 0. rate 0 returns x unchanged."""
    if rate == 0.0:
        return x
    return ad.apply_keep(x, keep_mask_nd(seed, x.shape, rate), rate)


class HashDropout(nnx.Module):
    """`nnx.Dropout`'s interface (as BERT uses it) with the hash mask of `apply_nd`.

    `deterministic` is toggled by `.train()` / `.eval()`; when it is True, or rate is 0, the
    call is the identity. Otherwise each call draws one key from `self.rngs` (a fork of the
    `rng_collection` stream, exactly as nnx.Dropout builds it, so the model's RNG state has
    the same layout and training's per-step key reset applies unchanged) and derives the
    64-bit seed of the mask from it.
    """

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        ad.threshold(rate)  # validates 0 <= rate < 1
        self.rate = rate
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(f"rngs must be an nnx.Rngs, RngStream or None, not {type(rngs)}")

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """inputs (any shape) -> same shape and dtype."""
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        else:
            raise TypeError("HashDropout is in train mode but has no rngs to draw a key from")
        return apply_nd(inputs, ad.seed_words(key), self.rate)

    def set_view(self, deterministic: bool | None = None) -> None:
        """For `nnx.view`, as nnx.Dropout."""
        if deterministic is not None:
            self.deterministic = deterministic


__all__ = ["MAX_ELEMENTS", "HashDropout", "apply_nd", "keep_mask_nd"]
