"""Contrastive-correct gradient accumulation (GradCache, Gao et al. 2021).

Plain gradient accumulation changes a contrastive loss: each microbatch would only see its own
negatives. GradCache keeps the full-batch loss and still holds only one microbatch of
activations at a time:

  1. embed every microbatch without gradients (`lax.map`) -> embeddings of the full batch;
  2. loss on the full batch, with gradients w.r.t. the embeddings (and loss parameters);
  3. for each microbatch (`lax.scan`), re-run the encoder under `jax.vjp` and pull the cached
     embedding gradients back to the parameters, summing over microbatches.

The result equals `jax.value_and_grad` of the full-batch computation, at the price of one
extra forward pass. It works under `jit` with a batch-sharded input and a `shard_map`ped loss
(`losses.make_loss_fn`): microbatch m takes rows m, m+M, m+2M, ... so, when each device's rows
are a multiple of M, every device contributes an equal share of every microbatch and nothing
moves between devices; the full embedding matrix comes back in the original row order.

Randomness (dropout): pass `rng`; `embed_fn` is then called as `embed_fn(params, microbatch,
key)` with `key = fold_in(rng, m)` in BOTH passes, so the re-run forward is identical to the
cached one. The masks differ from an unaccumulated full-batch step's (different keys per
microbatch), so the match to `value_and_grad` is exact only for deterministic encoders.
With NNX, split the model first: `embed_fn = lambda p, mb: nnx.merge(graphdef, p)(mb)` and
hand dropout keys in explicitly (stateful `nnx.Rngs` would advance between the two passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from signclip_jax.errors import UserError


def _take(tree: Any, m: int, i: jax.Array) -> Any:
    """Microbatch i of M: rows i, i+M, i+2M, ... of every [B, ...] leaf -> [B/M, ...].

    The reshape to [B/M, M, ...] is free (no copy) and the slice copies one microbatch, so the
    full batch is never duplicated: at a 32,768 batch of 256 x 609 float32 poses, a
    microbatch-major copy of the batch alone would be another 19 GiB of device memory.
    """

    def take(x):
        rows = x.reshape(x.shape[0] // m, m, *x.shape[1:])
        return jax.lax.dynamic_index_in_dim(rows, i, axis=1, keepdims=False)

    return jax.tree.map(take, tree)


def _merge(tree: Any) -> Any:
    """Inverse of `_split`: [M, B/M, ...] -> [B, ...] in the original row order."""

    def merge(x):
        return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    return jax.tree.map(merge, tree)


def _batch_size(batch: Any, num_microbatches: int) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise UserError(f"batch leaves need one common leading (batch) dim; got sizes {sizes}")
    (size,) = sizes
    if num_microbatches < 1 or size % num_microbatches:
        raise UserError(
            f"batch size {size} is not divisible by num_microbatches={num_microbatches}"
        )
    return size


def accumulated_value_and_grad(
    embed_fn: Callable[..., tuple[jax.Array, jax.Array]],
    loss_fn: Callable[[jax.Array, jax.Array, Any], Any],
    params: Any,
    batch: Any,
    num_microbatches: int,
    *,
    rng: jax.Array | None = None,
) -> tuple[Any, Any]:
    """`jax.value_and_grad` of `loss_fn(*embed_fn(params, batch), params)`, in M pieces.

    Args:
      embed_fn: `(params, microbatch[, key]) -> (pose_emb [b, H], text_emb [b, H])`.
      loss_fn: `(pose_emb [B, H], text_emb [B, H], params) -> loss` or `(loss, aux)`, e.g.
        `lambda pe, te, p: loss_fn_from_make_loss_fn(pe, te, p["loss"])`. It gets the same
        `params` so loss parameters (temperature, bias) can live in them.
      params: pytree of float arrays to differentiate (encoder and loss parameters).
      batch: pytree of arrays with a common leading dim B (divisible by `num_microbatches`).
      num_microbatches: M; 1 means a plain `value_and_grad` (no second forward pass).
      rng: optional key; microbatch m's forward gets `fold_in(rng, m)` in both passes.
    Returns:
      `(value, grads)`: value has the structure of `loss_fn`'s output (`loss` or
      `(loss, aux)`); grads has the structure of `params`.
    """
    m = num_microbatches
    _batch_size(batch, m)
    returns_aux = []  # set while tracing loss_fn: did it return (loss, aux)?

    def embed(p, mb, i):
        out = embed_fn(p, mb) if rng is None else embed_fn(p, mb, jax.random.fold_in(rng, i))
        return tuple(out)

    def loss_and_aux(pose, text, p):
        out = loss_fn(pose, text, p)
        returns_aux.append(isinstance(out, tuple))
        return out if isinstance(out, tuple) else (out, None)

    def result(value, grads):
        return (value if returns_aux[0] else value[0]), grads

    if m == 1:
        value, grads = jax.value_and_grad(
            lambda p: loss_and_aux(*embed(p, batch, 0), p), has_aux=True
        )(params)
        return result(value, grads)

    index = jnp.arange(m)

    # 1) Embeddings of every microbatch; no activations are kept.
    pose, text = jax.lax.map(
        lambda i: jax.lax.stop_gradient(embed(params, _take(batch, m, i), i)), index
    )
    pose, text = _merge(pose), _merge(text)

    # 2) Full-batch loss; gradients w.r.t. the embeddings and (directly) the params.
    value, (g_pose, g_text, g_direct) = jax.value_and_grad(
        loss_and_aux, argnums=(0, 1, 2), has_aux=True
    )(pose, text, params)

    # 3) Re-run each microbatch under vjp and add its pulled-back parameter gradients.
    def step(acc, i):
        mb, (gp, gt) = _take((batch, (g_pose, g_text)), m, i)
        _, pull_back = jax.vjp(lambda p: embed(p, mb, i), params)
        (g,) = pull_back((gp, gt))
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(step, g_direct, index)
    return result(value, grads)
