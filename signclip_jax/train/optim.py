"""The original optimiser: fairseq Adam, polynomial-decay schedule, global-norm clipping.

fairseq's Adam (reference section 6.2) differs from optax.adam in one detail: it adds eps to
sqrt(v) *before* the bias correction, i.e. update = lr * m_hat / (sqrt(v_hat) + eps/sqrt(bc2))
with bc2 = 1 - b2^t. We implement that form so that the step matches the original exactly
(the difference is tiny, but free to get right).

Non-finite steps (NaN/inf gradients) are skipped and counted by optax.apply_if_finite; the
parameters and moments stay untouched for that step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


class FairseqAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_fairseq_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam direction as fairseq computes it (eps inside the bias correction), unscaled by lr."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return FairseqAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        t = count.astype(jnp.float32)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        step_size = jnp.sqrt(bc2) / bc1
        out = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, FairseqAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """fairseq polynomial_decay (power 1): linear warm-up from 0, then linear decay to end_lr.

    The schedule's argument is the number of updates already done, so the first update uses
    lr 0, as in fairseq. After warm-up: lr * (1 - (n - warmup) / (decay_steps - warmup)).
    """
    warmup = int(cfg.warmup_steps)
    decay = max(int(cfg.decay_steps) - warmup, 1)
    parts = [
        optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
        optax.polynomial_schedule(cfg.lr, cfg.end_lr, power=1, transition_steps=decay),
    ]
    if warmup == 0:
        return parts[1]
    return optax.join_schedules(parts, [warmup])


def make_optimizer(
    cfg: ml_collections.ConfigDict, *, max_bad_steps: int = 100
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> fairseq Adam -> (decoupled weight decay) -> -lr, NaN-safe."""
    schedule = lr_schedule(cfg)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(scale_by_fairseq_adam(cfg.b1, cfg.b2, cfg.eps))
    if cfg.weight_decay:
        # fairseq's Adam adds wd * p to the update scaled by lr (decoupled, AdamW-style).
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=max_bad_steps)
    return tx, schedule


def skipped_steps(opt_state) -> jax.Array:
    """Total number of steps skipped for non-finite gradients so far."""
    return opt_state.total_notfinite
