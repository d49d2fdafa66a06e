"""Training augmentation on the accelerator: the numpy augmentation of data/augment.py as pure,
vectorised jax functions that run inside the jitted train step.

With `data.augment_on_device` the host only reads, pads and draws each clip's resampled frame
count (the one decision that changes a clip's length, so the host can choose the padded
length); everything else is drawn here from keys that depend on (seed, step, epoch, source
index) alone: a resumed run replays exactly, and neither the row an example lands in nor the
device or process count changes it. The order and distributions are augment.augment's: flip,
spatial (augment2d), temporal resampling, noise, then frame dropout.

Batch in (B rows, L padded frames, P points of the spec, W = ceil(P / 8)):
  pose          [B, L, P*3] float16/float32: the clip's normalised points (x, y, z) as stored,
                first T_in frames, zeros after (z is kept even without include_z: the flip's
                re-normalisation measures 3-D shoulder distances)
  pose_mask     [B, L] bool: t < T_in
  pose_observed [B, L, W] uint8: np.packbits of the clip's observed [T_in, P] mask, flat (frame
                after frame, most significant bit first), zero-padded
  aug_frames    [B] int32: frames after temporal resampling (host-drawn), 0 = not resampled
  aug_id        [B, 2] int32: (epoch, source index) of the example
Out: pose [B, min(L, max_frames), D] in data.pose_dtype and its pose_mask (valid prefix), the
other keys unchanged; the augmentation inputs are dropped.

L holds max(T_in, aug_frames) of every row: a resampled clip is read whole and written into
the same slot. Frame dropout only shortens a clip, so its new length is decided here.

Packed rows (several clips per row, later): the per-row core, `augment_row`, already works on
one row holding C clip slots: per-token arrays (slot id per frame) with per-clip parameters
(slot start, T_in, resampled frames, key); every gather stays inside a clip's slot, scans
(previous / next observed frame) are segmented by comparing global frame indices with the
slot bounds, and noise is keyed by (clip key, frame within the clip), so a clip gets the same
result in a packed row as in a row of its own (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from signclip_jax.data import pipeline
from signclip_jax.data.pose import PoseSpec, layout

# Batch keys the host adds for the device augmentation (besides pose and pose_mask).
INPUT_KEYS = ("pose_observed", "aug_frames", "aug_id")

# Stream tags folded into the keys, so that no two decisions share random bits.
_AUGMENT_TAG = 0x41554721  # separates these keys from the model's dropout keys
_FLIP, _SPATIAL, _NOISE, _DROP, _DROP_ONE = 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """What the device augmentation applies: augment.augment's keyword arguments plus the
    pose spec, the seed and the dtype the model reads."""

    spec: PoseSpec
    seed: int = 0
    pose_dtype: str = "float32"
    temporal: bool = False
    temporal_std: float = 0.2  # drawn on the host (pipeline); here for completeness
    spatial: bool = False
    spatial_std: float = 0.2
    noise: bool = False
    noise_std: float = 0.001
    flip_prob: float = 0.0
    frame_dropout_rate: float = 0.0

    @classmethod
    def from_settings(cls, settings: pipeline.InputSettings, seed: int) -> DeviceAugment:
        return cls(
            spec=settings.spec,
            seed=int(seed),
            pose_dtype=settings.pose_dtype,
            **dict(settings.augment),
        )


def from_config(config) -> Callable[[dict[str, Any], jax.Array], dict[str, Any]] | None:
    """The train step's augmentation hook for `config` (the whole training config), or None
    when data.augment_on_device is off. hook(batch, step) -> model batch (traceable)."""
    settings = pipeline.settings_from_config(config)
    if not settings.augment_on_device:
        return None
    aug = DeviceAugment.from_settings(settings, int(config.seed))
    return lambda batch, step: augment_batch(batch, step, aug)


# ---------------------------------------------------------------------------------------------
# Keys.


def example_keys(seed: int, step: jax.Array, aug_id: jax.Array) -> jax.Array:
    """[B] keys: fold_in(key(seed), tag, step, epoch, source index) for aug_id [B, 2]."""
    base = jax.random.fold_in(jax.random.key(seed), _AUGMENT_TAG)
    base = jax.random.fold_in(base, jnp.asarray(step, jnp.uint32))
    ids = jnp.asarray(aug_id).astype(jnp.uint32)
    return jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(base, e), i))(
        ids[:, 0], ids[:, 1]
    )


def _threshold(p: float) -> int:
    """P(bits < threshold) = p for uniform uint32 bits (2**32: always)."""
    return int(min(max(round(float(p) * 2**32), 0), 2**32))


def _below(bits: jax.Array, threshold: int) -> jax.Array:
    if threshold >= 2**32:
        return jnp.ones(bits.shape, bool)
    return bits < jnp.uint32(threshold)


# ---------------------------------------------------------------------------------------------
# Observed bits.


def decode_observed(bits: jax.Array, num_points: int) -> jax.Array:
    """[B, L, W] uint8 (np.packbits of each row's [T, P] mask, flat, zero-padded) -> [B, L, P]
    bool. Elementwise shifts and a reshape, no gather."""
    b, length, w = bits.shape
    flat = bits.reshape(b, length * w)
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
    unpacked = (flat[:, :, None] >> shifts) & jnp.uint8(1)  # [B, L*W, 8]
    unpacked = unpacked.reshape(b, length * w * 8)[:, : length * num_points]
    return unpacked.reshape(b, length, num_points).astype(bool)


# ---------------------------------------------------------------------------------------------
# One row: C clip slots (C = 1 in the padded layout).


def augment_row(
    x: jax.Array,
    observed: jax.Array,
    slot: jax.Array,
    start: jax.Array,
    frames: jax.Array,
    resampled: jax.Array,
    keys: jax.Array,
    aug: DeviceAugment,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augments the clips of one row.

    x [L, P, 3] float32 points, observed [L, P] bool; slot [L] int32: the clip slot of each
    frame (-1: none); per clip [C]: start (first frame of its slot), frames (T_in, valid from
    start), resampled (frames after temporal resampling, 0: not resampled), keys (its key).
    A clip's slot must hold max(T_in, resampled) frames. Returns (points [L, P, 3] with zeros
    outside the clips, observed [L, P], length [C]: each clip's frames from its start).
    """
    length, num_points, _ = x.shape
    lay = layout(aug.spec.components)
    legs = jnp.asarray(lay.legs)
    idx = jnp.arange(length)
    has = slot >= 0
    c = jnp.where(has, slot, 0)  # safe gather index
    num_clips = start.shape[0]
    first_frame = start[c]  # [L]
    local = idx - first_frame
    valid = has & (local < frames[c])
    observed = observed & valid[:, None]
    x = jnp.where(observed[..., None], x, 0.0)

    def clip_key(stream: int) -> jax.Array:  # [C] keys of one decision
        return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)

    def frame_key(stream: int) -> jax.Array:
        # [L] keys by (clip, frame within the clip): a clip draws the same wherever it sits.
        frame = jnp.maximum(local, 0).astype(jnp.uint32)
        return jax.vmap(jax.random.fold_in)(clip_key(stream)[c], frame)

    def clip_sum(values):  # [L, ...] -> [C, ...] summed over each clip's frames
        return jax.ops.segment_sum(values, jnp.where(has, slot, num_clips), num_clips + 1)[
            :num_clips
        ]

    # Flip: negate x, move every point to its mirror's slot, re-normalise by the shoulders.
    if aug.flip_prob > 0:
        flip_bits = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(clip_key(_FLIP))
        flip = _below(flip_bits, _threshold(aug.flip_prob))[c] & has  # [L]
        perm = jnp.asarray(lay.flip_source)
        xf = (x * jnp.array([-1.0, 1.0, 1.0], x.dtype))[:, perm]
        of = observed[:, perm]
        if lay.shoulders is not None:
            rs, ls = lay.shoulders
            both = of[:, rs] & of[:, ls]
            count = clip_sum(both.astype(jnp.float32))  # [C]
            mid = jnp.where(both[:, None], (xf[:, rs] + xf[:, ls]) / 2, 0.0)
            dist = jnp.where(both, jnp.linalg.norm(xf[:, rs] - xf[:, ls], axis=-1), 0.0)
            safe = jnp.maximum(count, 1.0)
            center = clip_sum(mid) / safe[:, None]  # [C, 3]
            mean_dist = clip_sum(dist) / safe
            ok = (count > 0) & (mean_dist > 0)
            center = jnp.where(ok[:, None], center, 0.0)
            scale = jnp.where(ok, 1.0 / jnp.where(ok, mean_dist, 1.0), 1.0)
            body = of & ~legs  # hidden legs stay exactly 0
            shifted = (xf - center[c][:, None]) * scale[c][:, None, None]
            xf = jnp.where(body[..., None], shifted, 0.0)
        x = jnp.where(flip[:, None, None], xf, x)
        observed = jnp.where(flip[:, None], of, observed)

    # Spatial: (x, y) -> (x, y) . M, M = shear . rotation . scale, one draw per clip.
    if aug.spatial:
        params = jax.vmap(lambda k: jax.random.normal(k, (3,), jnp.float32))(clip_key(_SPATIAL))
        shear, angle, scale = (params * aug.spatial_std).T  # [C] each
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        # [[1, s], [0, 1]] . [[cos, -sin], [sin, cos]] . [[1, 0], [0, 1 + k]]
        m = jnp.stack(
            [
                jnp.stack([cos + shear * sin, (-sin + shear * cos) * (1 + scale)], -1),
                jnp.stack([sin, cos * (1 + scale)], -1),
            ],
            -2,
        )  # [C, 2, 2]
        xy = jnp.einsum("lpi,lij->lpj", x[..., :2], m[c])
        x = jnp.concatenate([xy, x[..., 2:]], -1)
        x = jnp.where(observed[..., None], x, 0.0)

    # Temporal: resample the clips the host chose, on a uniform grid, gaps filled per point.
    n_now = frames
    was_resampled = jnp.zeros(length, bool)
    if aug.temporal:
        x, observed, n_now, was_resampled = _resample(
            x, observed, slot, start, frames, resampled, clip_sum
        )

    # Noise: N(0, std) on observed points (the hidden legs too, unless resampled).
    if aug.noise:
        noise = jax.vmap(lambda k: jax.random.normal(k, (num_points, 3), jnp.float32))(
            frame_key(_NOISE)
        )
        target = observed & ~(was_resampled[:, None] & legs)
        x = jnp.where(target[..., None], x + noise * aug.noise_std, x)

    # Frame dropout: each frame kept with probability 1 - rate, at least one; the kept frames
    # move to the front of the slot, in order.
    keep_valid = has & (local < n_now[c])
    if aug.frame_dropout_rate > 0:
        drop_bits = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(frame_key(_DROP))
        keep = ~_below(drop_bits, _threshold(aug.frame_dropout_rate)) & keep_valid
        kept = clip_sum(keep.astype(jnp.int32))  # [C]
        one = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, jnp.maximum(n, 1)))(
            clip_key(_DROP_ONE), n_now
        )  # [C]
        rescue = (kept[c] == 0) & keep_valid & (local == one[c])
        keep = keep | rescue
        kept = clip_sum(keep.astype(jnp.int32))
        # Kept frames of all clips first (in order): clip k's j-th kept frame sits at
        # position (kept frames of clips before k) + j.
        order = jnp.argsort(jnp.where(keep, idx, length + idx), stable=True)
        before = jnp.cumsum(kept) - kept  # [C]
        src = order[jnp.clip(before[c] + local, 0, length - 1)]
        x, observed = x[src], observed[src]
        n_now = kept
    n_final = n_now
    if aug.spec.max_frames > 0:
        n_final = jnp.minimum(n_final, aug.spec.max_frames)
    out_valid = has & (local < n_final[c])
    x = jnp.where((observed & out_valid[:, None])[..., None], x, 0.0)
    return x, observed & out_valid[:, None], n_final


def _resample(x, observed, slot, start, frames, resampled, clip_sum):
    """temporal_resample (pose-format linear interpolation) of the clips with resampled > 0,
    in place of their slots; the other clips are unchanged. Float32 arithmetic."""
    length = x.shape[0]
    idx = jnp.arange(length)
    has = slot >= 0
    c = jnp.where(has, slot, 0)
    s0, t_in, t_out = start[c], frames[c], resampled[c]  # per frame, of its clip
    last_in = s0 + jnp.maximum(t_in, 1) - 1  # last input frame (global)
    big = jnp.int32(2**30)
    # Per point, last observed frame <= j and first observed >= j (global frame numbers);
    # values from another clip's slot are recognised by the slot bounds.
    prev = jax.lax.cummax(jnp.where(observed, idx[:, None], -1), axis=0)  # [L, P]
    nxt = jax.lax.cummin(jnp.where(observed, idx[:, None], big), axis=0, reverse=True)
    count = clip_sum(observed.astype(jnp.int32))[c]  # [L, P]: observations of the clip
    first = _take(nxt, s0)
    last = _take(prev, last_in)
    first_c = jnp.minimum(first, last_in[:, None])
    last_c = jnp.where(last >= s0[:, None], last, s0[:, None])

    k = idx - s0  # output frame within the clip
    t1 = jnp.maximum(t_in - 1, 1)
    n1 = jnp.maximum(t_out - 1, 1)
    ceil = (k * (t_in - 1) + n1 - 1) // n1  # first input frame with i/(T-1) >= k/(T'-1)
    hi = _take(nxt, s0 + jnp.clip(ceil, 0, t_in - 1))  # [L, P]
    second = jnp.take_along_axis(nxt, jnp.minimum(first_c + 1, last_in[:, None]), axis=0)
    hi = jnp.where(hi == first, second, hi)
    hi = jnp.where(hi > last_in[:, None], last_c, hi)
    hi = jnp.minimum(hi, last_in[:, None])
    lo = jnp.take_along_axis(prev, jnp.maximum(hi - 1, s0[:, None]), axis=0)
    lo = jnp.where(lo >= s0[:, None], lo, s0[:, None])

    def time(g):  # global frame -> time on the clip's [0, 1] grid
        return (g - s0[:, None]).astype(jnp.float32) / t1.astype(jnp.float32)[:, None]

    new_t = (k.astype(jnp.float32) / n1.astype(jnp.float32))[:, None]  # [L, 1]
    y_lo = jnp.take_along_axis(x, lo[..., None], axis=0)
    y_hi = jnp.take_along_axis(x, hi[..., None], axis=0)
    x_lo, x_hi = time(lo), time(hi)
    span = jnp.where(x_hi > x_lo, x_hi - x_lo, 1.0)
    values = (y_hi - y_lo) / span[..., None] * (new_t - x_lo)[..., None] + y_lo
    single = jnp.take_along_axis(x, first_c[..., None], axis=0)
    values = jnp.where((count >= 2)[..., None], values, single)
    # new time >= time of first_c (and <= last_c's), compared exactly in integers
    kk = (k * (t_in - 1))[:, None]
    obs_new = (kk >= (first_c - s0[:, None]) * n1[:, None]) & (
        kk <= (last_c - s0[:, None]) * n1[:, None]
    )
    obs_new &= count > 0

    active = has & (t_out > 0)  # frames of resampled clips
    obs_new &= (active & (k < t_out))[:, None]
    values = jnp.where(obs_new[..., None], values, 0.0)
    x = jnp.where(active[:, None, None], values, x)
    observed = jnp.where(active[:, None], obs_new, observed)
    n_now = jnp.where(resampled > 0, resampled, frames)
    return x, observed, n_now, active


def _take(table: jax.Array, rows: jax.Array) -> jax.Array:
    """table [L, P] at row rows[j] for every point: [L, P]."""
    return jnp.take_along_axis(table, jnp.broadcast_to(rows[:, None], table.shape), axis=0)


# ---------------------------------------------------------------------------------------------
# The padded batch.


def augment_batch(batch: dict[str, Any], step: jax.Array, aug: DeviceAugment) -> dict[str, Any]:
    """Device-augmentation batch (module docstring) -> model batch. Traceable (jit it)."""
    pose = jnp.asarray(batch["pose"])
    b, length, width = pose.shape
    num_points = aug.spec.num_points
    if width != num_points * 3:
        raise ValueError(f"pose has {width} values per frame, expected {num_points} x 3 points")
    x = pose.astype(jnp.float32).reshape(b, length, num_points, 3)
    observed = decode_observed(jnp.asarray(batch["pose_observed"]), num_points)
    mask = jnp.asarray(batch["pose_mask"])
    frames = jnp.sum(mask, axis=1).astype(jnp.int32)  # valid prefix
    resampled = jnp.asarray(batch["aug_frames"]).astype(jnp.int32)
    if not aug.temporal:
        resampled = jnp.zeros_like(resampled)
    keys = example_keys(aug.seed, step, batch["aug_id"])
    slot = jnp.zeros(length, jnp.int32)
    zero = jnp.zeros(1, jnp.int32)

    def row(xr, orow, n, r, k):
        return augment_row(xr, orow, slot, zero, n[None], r[None], k[None], aug)

    x, _, n_final = jax.vmap(row)(x, observed, frames, resampled, keys)
    out_len = length if aug.spec.max_frames <= 0 else min(length, aug.spec.max_frames)
    x = x[:, :out_len]
    if not aug.spec.include_z:
        x = x[..., :2]
    feats = jnp.nan_to_num(x.reshape(b, out_len, -1))
    out = {k: v for k, v in batch.items() if k not in INPUT_KEYS}
    out["pose"] = feats.astype(jnp.dtype(pipeline.numpy_dtype(aug.pose_dtype)))
    out["pose_mask"] = jnp.arange(out_len)[None, :] < n_final[:, :1]
    return out


__all__ = [
    "INPUT_KEYS",
    "DeviceAugment",
    "augment_batch",
    "augment_row",
    "decode_observed",
    "example_keys",
    "from_config",
]
