"""Training-time pose augmentation (reference section 4), numpy only, seeded by a Generator.

All functions take and return a `PoseArray` (normalised, legs hidden) and never modify their
input. `augment` applies them in the original's order: flip, spatial (augment2d), temporal,
noise; then frame dropout, which is ours (the original has none). The original draws from the
global `np.random` state seeded per item; here every draw comes from the `rng` passed in, so a
(seed, epoch, index)-derived Generator gives the same per-item determinism.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from signclip_jax.data.pose import PoseArray, PoseSpec, layout, normalize_points


def resampled_frames(frames, fps, ratio, max_frames: int):
    """Frame count `temporal_resample` gives a clip of `frames` frames at `fps` for `ratio`,
    or 0 where it leaves the clip unchanged. Scalars or arrays (broadcast), numpy only.

    Applies when T > 1, ratio > 0, T * ratio < max_frames (0 = no limit), fps > 0, and the
    new clip has >= 2 frames: new_fps = round(fps * ratio), T' = round(T * new_fps / fps)
    (float64, round half to even, as Python's round).
    """
    t = np.asarray(frames, np.float64)
    fps = np.asarray(fps, np.float64)
    ratio = np.asarray(ratio, np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = np.isfinite(ratio) & (ratio > 0) & (t > 1) & np.isfinite(fps) & (fps > 0)
        if max_frames > 0:
            ok &= t * ratio < max_frames
        new_fps = np.where(ok, np.rint(fps * ratio), 0.0)
        new_t = np.where(ok & (new_fps > 0), np.rint(t * new_fps / np.where(ok, fps, 1.0)), 0.0)
    new_t = np.where(new_t >= 2, new_t, 0.0)
    out = new_t.astype(np.int64)
    return out if out.ndim else int(out)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash (uint64 arrays, wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_normal(seed: int, epoch, index, stream: int = 0) -> np.ndarray:
    """N(0, 1) draws that are a function of (seed, epoch, index, stream) alone, vectorised.

    A counter-based generator (splitmix64 hashes of the key, then Box-Muller on two 53-bit
    uniforms): a batch of examples costs a few numpy operations, not a Generator each.
    epoch, index: int arrays (broadcast). Returns float64 of their broadcast shape.
    """
    epoch = np.atleast_1d(np.asarray(epoch)).astype(np.uint64)
    index = np.atleast_1d(np.asarray(index)).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.full(1, int(seed) % 2**64, np.uint64))
        h = _mix64(h ^ np.uint64(int(stream) % 2**64))
        h = _mix64(_mix64(h ^ epoch) ^ index)
        a, b = _mix64(h ^ np.uint64(1)), _mix64(h ^ np.uint64(2))
    u1 = (a >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    u2 = (b >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def temporal_resample(arr: PoseArray, ratio: float, max_frames: int) -> PoseArray:
    """Resamples to `round(fps * ratio)` fps like pose-format `interpolate(kind='linear')`.

    Applied only if T > 1 and T * ratio < max_frames (strict; max_frames 0 = no limit);
    otherwise the input is returned. The new clip has round(T * new_fps / fps) frames on a
    uniform [0, 1] time grid. Each point is linearly interpolated between the frames where it is
    observed, so interior gaps are filled; new frames before its first or after its last
    observation are 0 and unobserved. Ratio > 1 gives more frames (slower signing).
    Guards the original lacks: no-op when the ratio, fps or new fps is not positive or the new
    clip would have fewer than 2 frames (the original would produce an empty clip).
    [T, P, 3] -> [T', P, 3].
    """
    t = arr.num_frames
    new_t = int(resampled_frames(t, arr.fps, ratio, max_frames))
    if new_t == 0:
        return arr
    new_fps = round(arr.fps * ratio)

    steps = np.linspace(0, 1, t)
    new_steps = np.linspace(0, 1, new_t)
    obs = arr.observed  # [T, P]
    num_points = obs.shape[1]
    cols = np.arange(num_points)
    frames = np.arange(t)[:, None]
    # Per point: last observed frame <= each frame (-1: none), first observed >= it (T: none).
    prev = np.maximum.accumulate(np.where(obs, frames, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(obs, frames, t)[::-1], axis=0)[::-1]
    count = obs.sum(axis=0)
    first, last = nxt[0], prev[-1]  # [P]
    first_c, last_c = np.minimum(first, t - 1), np.maximum(last, 0)
    # pose-format fills the new frames from the first one at or after the first observation
    # to the last one at or before the last observation; the rest stay 0 (unobserved).
    observed = (new_steps[:, None] >= steps[first_c]) & (new_steps[:, None] <= steps[last_c])
    observed &= count > 0

    # scipy interp1d(kind='linear') on each point's observed frames: hi = the first observed
    # frame at or after the new time (the second observation at the first one, the last
    # observation past the end), lo = the observed frame before hi.
    ceil = np.searchsorted(steps, new_steps)  # first original frame with steps >= new time
    hi = nxt[np.minimum(ceil, t - 1)]  # [T', P]
    second = nxt[np.minimum(first_c + 1, t - 1), cols]
    hi = np.where(hi == first, second, hi)
    hi = np.minimum(np.where(hi >= t, last_c, hi), t - 1)
    lo = prev[np.maximum(hi - 1, 0), cols].clip(0)
    points = arr.points.astype(np.float64)
    y_lo, y_hi = points[lo, cols], points[hi, cols]  # [T', P, 3]
    x_lo = steps[lo]
    with np.errstate(divide="ignore", invalid="ignore"):  # points with < 2 observations
        slope = (y_hi - y_lo) / (steps[hi] - x_lo)[..., None]
        values = slope * (new_steps[:, None] - x_lo)[..., None] + y_lo
    # A single observation is kept only where a new frame falls exactly on it.
    values = np.where((count >= 2)[:, None], values, points[first_c, cols])
    out = np.where(observed[..., None], values, 0.0)
    return PoseArray(points=out.astype(np.float32), observed=observed, fps=float(new_fps))


def flip_horizontal(arr: PoseArray, spec: PoseSpec) -> PoseArray:
    """Mirrors the signer: negate x, move every landmark to its mirror image's slot, re-normalise.

    Left/right body points swap (section-4 permutation), face points swap with their mirror image
    (the 128-point list of section 4 for reduced_face; the full 468-point mirror for holistic),
    the two hands swap. Sets that contain the shoulders are re-normalised as the original does
    (a near no-op: the clip was normalised already); hand-only sets keep the shoulder frame of
    the full pose they were normalised in. `dominant_hand` has no left-hand slot, so the right
    hand is mirrored in place. Flipping twice gives the input back (to float rounding).
    """
    lay = layout(spec.components)
    points = arr.points.astype(np.float64)
    points[..., 0] *= -1
    points = np.where(arr.observed[..., None], points, 0.0)  # no -0.0 for missing points
    points = points[:, lay.flip_source]
    observed = arr.observed[:, lay.flip_source]
    if lay.shoulders is not None:
        rs, ls = lay.shoulders
        body = observed & ~lay.legs  # hidden legs stay exactly 0
        p32 = points.astype(np.float32)
        points = normalize_points(
            p32, body, p32[:, rs], p32[:, ls], observed[:, rs], observed[:, ls], name="<flip>"
        )
    return PoseArray(points=points.astype(np.float32), observed=observed, fps=arr.fps)


def spatial_transform(arr: PoseArray, rng: np.random.Generator, std: float = 0.2) -> PoseArray:
    """pose-format `augment2d`: shear s, rotation θ, scale k ~ N(0, std), one per clip.

    M = [[1, s], [0, 1]] · [[cos θ, -sin θ], [sin θ, cos θ]] · [[1, 0], [0, 1 + k]];
    (x, y) -> (x, y) · M; z unchanged; missing points stay 0. Draw order: shear, rotation, scale.
    """
    shear = rng.normal(0.0, std)
    angle = rng.normal(0.0, std)
    scale = rng.normal(0.0, std)
    m = np.array([[1.0, shear], [0.0, 1.0]])
    m = m @ np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = m @ np.array([[1.0, 0.0], [0.0, 1.0 + scale]])
    points = arr.points.copy()
    points[..., :2] = arr.points[..., :2] @ m.astype(np.float32)
    points = np.where(arr.observed[..., None], points, np.float32(0))
    return PoseArray(points=points, observed=arr.observed.copy(), fps=arr.fps)


def gaussian_noise(arr: PoseArray, rng: np.random.Generator, std: float = 0.001) -> PoseArray:
    """Adds N(0, std) to every coordinate of observed points (hidden legs included)."""
    noise = rng.normal(0.0, std, size=arr.points.shape).astype(np.float32)
    points = np.where(arr.observed[..., None], arr.points + noise, arr.points)
    return PoseArray(points=points, observed=arr.observed.copy(), fps=arr.fps)


def frame_dropout(arr: PoseArray, rng: np.random.Generator, rate: float) -> PoseArray:
    """Drops each frame independently with probability `rate`, keeping at least one."""
    t = arr.num_frames
    if rate <= 0 or t == 0:
        return arr
    keep = rng.random(t) >= rate
    if not keep.any():
        keep[rng.integers(t)] = True
    return PoseArray(points=arr.points[keep], observed=arr.observed[keep], fps=arr.fps)


def augment(
    arr: PoseArray,
    spec: PoseSpec,
    rng: np.random.Generator,
    *,
    temporal: bool = False,
    temporal_std: float = 0.2,
    spatial: bool = False,
    spatial_std: float = 0.2,
    noise: bool = False,
    noise_std: float = 0.001,
    flip_prob: float = 0.0,
    frame_dropout_rate: float = 0.0,
) -> PoseArray:
    """The original's training augmentation: flip, spatial, temporal, noise; then frame dropout.

    The temporal ratio is drawn from N(1, temporal_std) and applied under `spec.max_frames`
    (section 4). With everything off the input is returned unchanged.
    """
    if flip_prob > 0 and rng.random() < flip_prob:
        arr = flip_horizontal(arr, spec)
    if spatial:
        arr = spatial_transform(arr, rng, std=spatial_std)
    resampled = False
    if temporal:
        ratio = rng.normal(1.0, temporal_std)
        before = arr
        arr = temporal_resample(arr, ratio, spec.max_frames)
        resampled = arr is not before
    if noise:
        if resampled:
            # pose-format's interpolation leaves the hidden legs with confidence 0, i.e. masked,
            # so the original adds no noise to them after a temporal resampling.
            legs = layout(spec.components).legs
            masked = dataclasses.replace(arr, observed=arr.observed & ~legs)
            arr = dataclasses.replace(
                gaussian_noise(masked, rng, std=noise_std), observed=arr.observed
            )
        else:
            arr = gaussian_noise(arr, rng, std=noise_std)
    if frame_dropout_rate > 0:
        arr = frame_dropout(arr, rng, frame_dropout_rate)
    return arr
