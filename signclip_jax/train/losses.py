"""Contrastive losses between pose and text embeddings, single-device or inside `shard_map`.

Every loss takes per-device embeddings `pose_emb, text_emb: [b, H]` (row i of one is the pair of
row i of the other). With `axis_name=None` `b` is the whole batch and the loss is the plain
single-device formula. With `axis_name` (a mesh axis name or a tuple of them, the batch axes)
the function must run inside `jax.shard_map` with the batch sharded over those axes; each
device then holds `b = B / n` rows and the result equals the single-device loss of the global
batch `B`, in value and in gradients:

- `signclip_loss`, `clip_loss` (softmax): all-gather the other modality (tiled, so the transpose
  is a reduce-scatter that routes column gradients back to their owners), local rows x global
  columns `[b, B]` in both directions, labels offset by the device's position, psum / B.
- `siglip_loss` (sigmoid): no all-gather; text chunks travel around the device ring with
  `ppermute` and each device sees one `[b, b]` block at a time. A custom VJP runs the ring again
  in the backward pass (the gradient of each chunk travels with it and ends up at its owner),
  so per-device memory is O(b^2 + b*H) whatever the number of devices.

Logits are computed in float32 with full-precision matmuls: SignCLIP's raw dot products are
~60-95, where bf16 rounding would already move the loss.

`make_loss_fn` wraps a loss (plus cheap metrics) in `jax.shard_map` for a mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from signclip_jax.errors import UserError

AxisName = str | tuple[str, ...] | None

LOSS_NAMES = ("signclip", "clip", "siglip")
_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T in full precision: [m, H] x [n, H] -> [m, n]."""
    return jnp.dot(a, b.T, precision=_HIGHEST)


def l2_normalize(x: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
    """x / max(||x||, eps) along the last axis; finite gradient at x = 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _as_axes(axis_name: Any) -> AxisName:
    if axis_name is None or isinstance(axis_name, str):
        return axis_name
    axes = tuple(axis_name)
    return axes if axes else None


def _to_varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Marks a replicated value as device-varying (its transpose is a psum).

    Needed before a value enters a custom VJP whose backward pass produces per-device
    cotangents; a no-op for axes the value already varies over or when vma is not checked.
    """
    axes = (axis_name,) if isinstance(axis_name, str) else axis_name
    aval = jax.typeof(x)
    # jax 0.10 keeps the varying axes in `aval.mat.varying` (older releases: `aval.vma`).
    mat = getattr(aval, "mat", None)
    varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    missing = tuple(a for a in axes if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _position(axis_name: AxisName, b: int) -> tuple[jax.Array | int, int]:
    """(offset of this device's rows in the global batch, global batch size)."""
    if axis_name is None:
        return 0, b
    return jax.lax.axis_index(axis_name) * b, b * jax.lax.axis_size(axis_name)


def _softmax_ce_sum(
    rows: jax.Array, cols: jax.Array, labels: jax.Array, scale: jax.Array | float
) -> jax.Array:
    """sum_i CE(scale * rows_i . cols^T, labels_i): rows [b, H], cols [B, H], labels [b]."""
    logits = scale * _dot_t(rows, cols)
    pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos)


def _bidirectional_ce_sum(
    pose: jax.Array, text: jax.Array, scale: jax.Array | float, axis_name: AxisName
) -> tuple[jax.Array, int]:
    """(sum over the GLOBAL batch of CE(pose->text) + CE(text->pose), global batch size)."""
    b = pose.shape[0]
    offset, global_b = _position(axis_name, b)
    labels = offset + jnp.arange(b)
    if axis_name is None:
        pose_all, text_all = pose, text
    else:
        # Tiled all-gather; its transpose (reduce-scatter) sends column gradients home.
        pose_all = jax.lax.all_gather(pose, axis_name, tiled=True)
        text_all = jax.lax.all_gather(text, axis_name, tiled=True)
    total = _softmax_ce_sum(pose, text_all, labels, scale) + _softmax_ce_sum(
        text, pose_all, labels, scale
    )
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total, global_b


def signclip_loss(pose_emb: jax.Array, text_emb: jax.Array, *, axis_name: AxisName = None):
    """The original `MMContraLoss`: CE(V·Tᵀ, diag) + CE(T·Vᵀ, diag).

    Raw dot products (no normalisation, no temperature); each CE is a mean over the global
    batch and the two directions are SUMMED, so uninformative logits give 2 ln B.

    Args:
      pose_emb, text_emb: [b, H] (local rows when `axis_name` is given).
      axis_name: batch mesh axes when called inside `shard_map`, else None.
    Returns: scalar float32 loss (identical on every device).
    """
    axis_name = _as_axes(axis_name)
    pose, text = pose_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    total, global_b = _bidirectional_ce_sum(pose, text, 1.0, axis_name)
    return total / global_b


def clip_loss(
    pose_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    axis_name: AxisName = None,
    max_logit_scale: float = math.log(100),
):
    """CLIP InfoNCE: L2-normalised embeddings, logits exp(min(logit_scale, max)) * cos.

    Mean of the two directional CEs (open_clip convention). The clamp is applied in the
    forward pass (open_clip clamps the parameter after each step instead): above the maximum
    the scale stops changing and gets no gradient.

    Args:
      pose_emb, text_emb: [b, H]. logit_scale: scalar (log of the inverse temperature).
    Returns: scalar float32 loss.
    """
    axis_name = _as_axes(axis_name)
    pose = l2_normalize(pose_emb.astype(jnp.float32))
    text = l2_normalize(text_emb.astype(jnp.float32))
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), max_logit_scale))
    total, global_b = _bidirectional_ce_sum(pose, text, scale, axis_name)
    return 0.5 * total / global_b


# ---------------------------------------------------------------- sigmoid (SigLIP), ring form


def _sigmoid_block_sum(v, t, scale, bias, positive_diag):
    """sum of -log sigmoid(z * logits) for one [b, b'] block; z = +1 on the diagonal iff
    `positive_diag` (the device's own chunk), -1 elsewhere."""
    logits = scale * _dot_t(v, t) + bias
    eye = jnp.eye(v.shape[0], t.shape[0], dtype=logits.dtype)
    z = jnp.where(positive_diag, 2.0 * eye - 1.0, -1.0)
    return jnp.sum(-jax.nn.log_sigmoid(z * logits))


def _shift(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sends x from ring position i to i+1 (positions are the linear index over axis_name)."""
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_sum(v, t, scale, bias, axis_name):
    """Sum over local rows x ALL columns of the sigmoid loss terms: v, t [b, H] local."""
    return _ring_sigmoid_fwd(v, t, scale, bias, axis_name)[0]


def _ring_sigmoid_fwd(v, t, scale, bias, axis_name):
    n = jax.lax.axis_size(axis_name)

    def step(_, carry):
        chunk, acc = carry
        chunk = _shift(chunk, axis_name)
        return chunk, acc + _sigmoid_block_sum(v, chunk, scale, bias, False)

    # After k shifts device i holds the text chunk of device i-k: k = 0 carries the positives.
    own = _sigmoid_block_sum(v, t, scale, bias, True)
    _, total = jax.lax.fori_loop(1, n, step, (t, own))
    # Residuals are the inputs only: the backward pass recomputes each block.
    return total, (v, t, scale, bias)


def _ring_sigmoid_bwd(axis_name, res, g):
    v, t, scale, bias = res
    n = jax.lax.axis_size(axis_name)

    def block_grads(chunk, positive_diag):
        dots = _dot_t(v, chunk)
        logits = scale * dots + bias
        # d/dx of -log sigmoid(z x) is sigmoid(x) - [z == 1].
        eye = jnp.eye(v.shape[0], chunk.shape[0], dtype=logits.dtype)
        d = g * (jax.nn.sigmoid(logits) - jnp.where(positive_diag, eye, 0.0))
        dv = scale * jnp.dot(d, chunk, precision=_HIGHEST)
        dchunk = scale * jnp.dot(d.T, v, precision=_HIGHEST)
        return dv, dchunk, jnp.sum(d * dots), jnp.sum(d)

    def step(_, carry):
        chunk, dchunk, dv, dscale, dbias = carry
        # The chunk's gradient accumulator travels with the chunk.
        chunk, dchunk = _shift(chunk, axis_name), _shift(dchunk, axis_name)
        dv_k, dchunk_k, ds_k, db_k = block_grads(chunk, False)
        return chunk, dchunk + dchunk_k, dv + dv_k, dscale + ds_k, dbias + db_k

    dv, dt, dscale, dbias = block_grads(t, True)
    _, dchunk, dv, dscale, dbias = jax.lax.fori_loop(1, n, step, (t, dt, dv, dscale, dbias))
    # Device i now holds chunk i+1's complete gradient: one more shift sends it home.
    return dv, _shift(dchunk, axis_name), dscale, dbias


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def siglip_loss(
    pose_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_name: AxisName = None,
):
    """SigLIP sigmoid loss: -1/B sum_i sum_j log sigmoid(z_ij (exp(t) cos_ij + b)).

    z_ij = +1 for matching pairs, -1 otherwise; B is the global batch (sum over all columns,
    mean over rows, as in the SigLIP paper). Sharded: ring exchange of the text chunks, per
    device memory O(b^2) independent of the number of devices (see module docstring).

    Args:
      pose_emb, text_emb: [b, H]. logit_scale, logit_bias: scalars (t' and b of the paper).
    Returns: scalar float32 loss.
    """
    axis_name = _as_axes(axis_name)
    pose = l2_normalize(pose_emb.astype(jnp.float32))
    text = l2_normalize(text_emb.astype(jnp.float32))
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    bias = jnp.asarray(logit_bias, jnp.float32)
    b = pose.shape[0]
    if axis_name is None:
        return _sigmoid_block_sum(pose, text, scale, bias, True) / b
    # The custom VJP returns per-device cotangents for scale and bias; making them varying
    # first lets the transpose of that cast psum them.
    scale, bias = _to_varying(scale, axis_name), _to_varying(bias, axis_name)
    total = jax.lax.psum(_ring_sigmoid_sum(pose, text, scale, bias, axis_name), axis_name)
    return total / (b * jax.lax.axis_size(axis_name))


# ---------------------------------------------------------------- metrics and wiring


def loss_metrics(
    pose_emb: jax.Array,
    text_emb: jax.Array,
    *,
    logit_scale: jax.Array | None = None,
    logit_bias: jax.Array | None = None,
    normalize: bool = False,
    axis_name: AxisName = None,
) -> dict[str, jax.Array]:
    """Cheap diagnostics over the global batch (no gradient flows through them).

    Keys: `acc_pose_to_text`, `acc_text_to_pose` (in-batch top-1 retrieval accuracy),
    `pos_logit`, `neg_logit` (mean logit of matching / non-matching pairs, after scale and
    bias), `pose_norm`, `text_norm` (mean L2 norm of the raw embeddings). Sharded, this
    all-gathers both modalities (forward only): O(b*B) memory, also for SigLIP.
    """
    axis_name = _as_axes(axis_name)
    pose = jax.lax.stop_gradient(pose_emb).astype(jnp.float32)
    text = jax.lax.stop_gradient(text_emb).astype(jnp.float32)
    b = pose.shape[0]
    offset, global_b = _position(axis_name, b)
    labels = offset + jnp.arange(b)
    sums = {
        "pose_norm": jnp.sum(jnp.linalg.norm(pose, axis=-1)),
        "text_norm": jnp.sum(jnp.linalg.norm(text, axis=-1)),
    }
    if normalize:
        pose, text = l2_normalize(pose), l2_normalize(text)
    if axis_name is None:
        pose_all, text_all = pose, text
    else:
        pose_all = jax.lax.all_gather(pose, axis_name, tiled=True)
        text_all = jax.lax.all_gather(text, axis_name, tiled=True)
    scale = 1.0 if logit_scale is None else jnp.exp(jax.lax.stop_gradient(logit_scale))
    bias = 0.0 if logit_bias is None else jax.lax.stop_gradient(logit_bias)
    p2t = scale * _dot_t(pose, text_all) + bias  # [b, B]
    t2p = scale * _dot_t(text, pose_all) + bias
    pos = jnp.take_along_axis(p2t, labels[:, None], axis=1)[:, 0]
    sums["acc_pose_to_text"] = jnp.sum(jnp.argmax(p2t, axis=1) == labels).astype(jnp.float32)
    sums["acc_text_to_pose"] = jnp.sum(jnp.argmax(t2p, axis=1) == labels).astype(jnp.float32)
    sums["pos_logit"] = jnp.sum(pos)
    neg_sum = jnp.sum(p2t) - jnp.sum(pos)
    if axis_name is not None:
        sums, neg_sum = jax.lax.psum((sums, neg_sum), axis_name)
    metrics = {k: v / global_b for k, v in sums.items()}
    metrics["neg_logit"] = neg_sum / max(global_b * (global_b - 1), 1)
    return metrics


def init_loss_params(name: str, config: Any = None) -> dict[str, jax.Array]:
    """Learnable loss parameters (replicated scalars).

    signclip: none. clip: logit_scale = log(1/0.07) (CLIP). siglip: logit_scale = log(10),
    logit_bias = -10 (SigLIP paper). `config` (the `loss` section, or a config holding one)
    may override them with `logit_scale_init` / `logit_bias_init`.
    """
    _check_name(name)
    cfg: Mapping = {} if config is None else config
    if "loss" in cfg:
        cfg = cfg["loss"]
    get = cfg.get
    if name == "signclip":
        return {}
    if name == "clip":
        return {"logit_scale": jnp.float32(get("logit_scale_init", math.log(1 / 0.07)))}
    return {
        "logit_scale": jnp.float32(get("logit_scale_init", math.log(10.0))),
        "logit_bias": jnp.float32(get("logit_bias_init", -10.0)),
    }


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        raise UserError(f"loss.name must be one of {', '.join(LOSS_NAMES)}; got {name!r}")


def _loss_and_metrics(name, pose, text, params, axis_name, with_metrics, max_logit_scale):
    if name == "signclip":
        loss = signclip_loss(pose, text, axis_name=axis_name)
        extra, metric_kw = {}, {}
    elif name == "clip":
        scale = jnp.minimum(params["logit_scale"], max_logit_scale)
        loss = clip_loss(
            pose, text, params["logit_scale"], axis_name=axis_name, max_logit_scale=max_logit_scale
        )
        extra = {"logit_scale": jnp.exp(scale)}
        metric_kw = {"logit_scale": scale, "normalize": True}
    else:
        loss = siglip_loss(
            pose, text, params["logit_scale"], params["logit_bias"], axis_name=axis_name
        )
        extra = {"logit_scale": jnp.exp(params["logit_scale"]), "logit_bias": params["logit_bias"]}
        metric_kw = {
            "logit_scale": params["logit_scale"],
            "logit_bias": params["logit_bias"],
            "normalize": True,
        }
    if not with_metrics:
        return loss, {}
    metrics = loss_metrics(pose, text, axis_name=axis_name, **metric_kw)
    metrics.update(jax.lax.stop_gradient(extra))
    return loss, metrics


@functools.cache
def _jitted_single_device_loss(name: str):
    fn = make_loss_fn(name, None, with_metrics=False)
    return jax.jit(lambda pose, text, params: fn(pose, text, params)[0])


def reference_loss(name: str, pose_emb: Any, text_emb: Any, loss_params: dict) -> jax.Array:
    """Single-device loss `name` on host arrays [N, H] (validation loss on gathered embeddings)."""
    _check_name(name)
    return _jitted_single_device_loss(name)(
        jnp.asarray(pose_emb), jnp.asarray(text_emb), loss_params
    )


def make_loss_fn(
    name: str,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    *,
    with_metrics: bool = True,
    max_logit_scale: float = math.log(100),
) -> Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, dict]]:
    """f(pose_emb [B, H], text_emb [B, H], loss_params) -> (loss, metrics), sharded.

    The embeddings are global arrays sharded on their leading dim over `batch_axes` (axes
    missing from the mesh are ignored); `loss_params` (see `init_loss_params`) and the outputs
    are replicated. With `mesh=None` or no batch axis in the mesh it is the single-device loss.
    Differentiable w.r.t. the embeddings and `loss_params`; call it under `jax.jit`.
    """
    _check_name(name)
    axes = () if mesh is None else tuple(a for a in batch_axes if a in mesh.axis_names)
    axis_name = axes if axes else None

    def local(pose, text, params):
        return _loss_and_metrics(name, pose, text, params, axis_name, with_metrics, max_logit_scale)

    if axis_name is None:
        return local
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=(P(), P()))
