"""Device augmentation (data/augment_device.py) against the numpy augmentation (data/augment.py).

Deterministic parts (temporal interpolation for a given frame count, the flip, the observed
bits) are compared value for value; the random parts by their distributions over a few
thousand examples: two-sample Kolmogorov-Smirnov statistics under the critical value for
alpha = 1e-3 at the sample sizes used, and proportions within 4 standard errors. Each check
also rejects a slightly wrong distribution (the test has power). The seeds are fixed, so the
outcome is deterministic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from signclip_jax.data import augment, augment_device, pipeline
from signclip_jax.data.augment_device import DeviceAugment, augment_batch, augment_row
from signclip_jax.data.pose import (
    PoseArray,
    PoseSpec,
    layout,
    pose_to_array,
    read_pose,
    to_features,
)
from signclip_jax.data.synthetic import holistic_header, pose_bytes, random_clip

HOUSE = "spreadthesign-ase-house.pose"


def clip(seed=0, spec=None, frames=None, gaps=True) -> PoseArray:
    """A generated, normalised clip; optionally cut to `frames` frames."""
    spec = spec or PoseSpec()
    data, conf = random_clip(seed)
    if gaps:  # interior gaps in both hands
        data[8:11, :, 501 + 21 : 543], conf[8:11, :, 501 + 21 : 543] = 0, 0
        data[20:21, :, 501:522], conf[20:21, :, 501:522] = 0, 0
    arr = pose_to_array(read_pose(pose_bytes(holistic_header(), data, conf, 25.0)), spec)
    if frames is not None:
        arr = PoseArray(arr.points[:frames], arr.observed[:frames], arr.fps)
    return arr


def device_batch(arrs, aug_frames=None, ids=None, length=None, dtype=np.float32):
    """The host's device-augmentation batch of PoseArrays, built by hand from the contract."""
    b = len(arrs)
    p = arrs[0].points.shape[1]
    aug_frames = np.zeros(b, np.int32) if aug_frames is None else np.asarray(aug_frames)
    length = length or int(max(max(a.num_frames for a in arrs), aug_frames.max()))
    pose = np.zeros((b, length, p * 3), dtype)
    mask = np.zeros((b, length), bool)
    bits = np.zeros((b, length, (p + 7) // 8), np.uint8)
    for i, a in enumerate(arrs):
        t = a.num_frames
        pose[i, :t] = a.points.reshape(t, -1)
        mask[i, :t] = True
        packed = np.packbits(a.observed.reshape(-1))
        bits[i].reshape(-1)[: len(packed)] = packed
    ids = np.stack([np.zeros(b), np.arange(b)], -1) if ids is None else np.asarray(ids)
    return {
        "pose": pose,
        "pose_mask": mask,
        "pose_observed": bits,
        "aug_frames": aug_frames.astype(np.int32),
        "aug_id": ids.astype(np.int32),
    }


@functools.cache
def _jitted(aug: DeviceAugment):
    return jax.jit(lambda batch, step: augment_batch(batch, step, aug))


def run(aug: DeviceAugment, batch, step=0) -> tuple[np.ndarray, np.ndarray]:
    """(points [B, L', P, 3] float32, lengths [B]) of the augmented batch."""
    out = _jitted(aug)(batch, jnp.int32(step))
    pose = np.asarray(out["pose"], np.float32)
    b, length, _ = pose.shape
    return pose.reshape(b, length, -1, 3 if aug.spec.include_z else 2), np.asarray(
        out["pose_mask"]
    ).sum(1)


def ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_critical(n, m, alpha=1e-3) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def host(arr, spec, n, seed=0, **kwargs):
    """numpy augment.augment of `arr` for examples 0..n-1 of epoch 0 (their own rngs)."""
    rngs = (pipeline.example_rng(seed, 0, i) for i in range(n))
    return [augment.augment(arr, spec, rng, **kwargs) for rng in rngs]


# --- deterministic parts ----------------------------------------------------------------------


def test_the_host_sends_what_the_step_reads():
    assert pipeline.device_batch_keys() == augment_device.INPUT_KEYS


def test_observed_bits_roundtrip():
    rng = np.random.default_rng(0)
    for p in (203, 21, 8, 543):
        masks = [rng.random((t, p)) < 0.7 for t in (1, 5, 13)]
        arrs = [PoseArray(np.zeros((len(m), p, 3), np.float32), m, 25.0) for m in masks]
        batch = device_batch(arrs, length=16)
        got = np.asarray(augment_device.decode_observed(jnp.asarray(batch["pose_observed"]), p))
        for i, m in enumerate(masks):
            np.testing.assert_array_equal(got[i, : len(m)], m)
            assert not got[i, len(m) :].any()


def _check_temporal(arrs, ratios, max_frames=256):
    spec = PoseSpec(max_frames=max_frames)
    want = [augment.temporal_resample(a, r, max_frames) for a, r in zip(arrs, ratios)]
    frames = [augment.resampled_frames(a.num_frames, a.fps, r, max_frames) for a, r in
              zip(arrs, ratios)]  # fmt: skip
    assert all(f == w.num_frames or f == 0 for f, w in zip(frames, want))
    got, lengths = run(DeviceAugment(spec=spec, temporal=True), device_batch(arrs, frames))
    for i, w in enumerate(want):
        assert lengths[i] == min(w.num_frames, max_frames)
        np.testing.assert_allclose(got[i, : lengths[i]], w.points[:max_frames], atol=2e-6)
        assert not got[i, lengths[i] :].any()


@pytest.mark.parametrize("seed", [0, 1])
def test_temporal_resampling_equals_numpy(seed):
    """Device interpolation for the host's frame count == augment.temporal_resample
    (gaps filled, single observations, points never seen), incl. ratios that leave it."""
    arr = clip(seed)
    rng = np.random.default_rng(seed)
    obs = arr.observed & (rng.random(arr.observed.shape) > 0.4)
    obs[:, 60] = False  # never seen
    obs[:, 61] = False
    obs[5, 61] = True  # seen once
    holes = PoseArray(np.where(obs[..., None], arr.points, 0).astype(np.float32), obs, arr.fps)
    arrs = [arr, arr, holes, holes, arr, clip(seed + 5, frames=2)]
    _check_temporal(arrs, [0.63, 1.37, 1.0, 2.2, 0.9, 1.0])
    # Under max_frames: resampled only when T * ratio < max_frames; the rest is cut.
    _check_temporal([arr, arr], [1.3, 0.9], max_frames=60)


@pytest.mark.shared_data
def test_temporal_resampling_equals_numpy_real(shared_pose):
    arr = pose_to_array(read_pose(shared_pose(HOUSE).read_bytes()), PoseSpec())
    _check_temporal([arr] * 4, [0.8, 1.0, 1.2, 1.37])


@pytest.mark.parametrize("components", ["reduced_face", "holistic", "hands", "dominant_hand"])
def test_flip_equals_numpy(components):
    spec = PoseSpec(components=components)
    arrs = [clip(s, spec, frames=30) for s in (0, 1)]
    got, lengths = run(DeviceAugment(spec=spec, flip_prob=1.0), device_batch(arrs))
    for i, a in enumerate(arrs):
        want = augment.flip_horizontal(a, spec)
        assert lengths[i] == a.num_frames
        np.testing.assert_allclose(got[i, : a.num_frames], want.points, atol=2e-6)


def test_everything_off_and_features_layout():
    """No augmentation: the step's pose is to_features of the clip, cut to max_frames, in the
    model's dtype, without z when include_z is off."""
    for include_z, dtype in ((True, "float32"), (False, "bfloat16")):
        spec = PoseSpec(include_z=include_z, max_frames=50)
        arrs = [clip(0, frames=70), clip(1, frames=20)]
        batch = device_batch(arrs, dtype=np.float16)
        out = _jitted(DeviceAugment(spec=spec, pose_dtype=dtype))(batch, jnp.int32(0))
        assert out["pose"].shape == (2, 50, spec.feature_dim) and out["pose"].dtype == dtype
        assert set(out) == {"pose", "pose_mask"}  # the augmentation inputs are dropped
        for i, a in enumerate(arrs):
            stored = PoseArray(a.points.astype(np.float16).astype(np.float32), a.observed, 25.0)
            want = to_features(stored, spec)
            t = len(want)
            assert int(out["pose_mask"][i].sum()) == t
            np.testing.assert_array_equal(
                np.asarray(out["pose"][i, :t], np.float32),
                want.astype(pipeline.numpy_dtype(dtype)).astype(np.float32),
            )


# --- keys ---------------------------------------------------------------------------------------

ALL = dict(temporal=True, spatial=True, noise=True, noise_std=0.01, flip_prob=0.5,
           frame_dropout_rate=0.2)  # fmt: skip


def test_keys_same_example_same_result_other_steps_differ():
    spec = PoseSpec(max_frames=64)
    aug = DeviceAugment(spec=spec, seed=3, **ALL)
    arrs = [clip(s, frames=40) for s in range(4)]
    ids = np.array([[0, 10], [0, 11], [1, 10], [0, 12]])
    batch = device_batch(arrs, aug_frames=[50, 0, 30, 0], ids=ids, length=64)
    a, la = run(aug, batch, step=5)
    b, lb = run(aug, batch, step=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = run(aug, batch, step=6)
    for i in range(4):  # every row changes with the step
        assert not np.array_equal(a[i], c[i])
    # Rows are independent of their position and of the other rows of the batch.
    perm = [2, 0, 3, 1]
    shuffled = {k: v[perm] for k, v in batch.items()}
    d, ld = run(aug, shuffled, step=5)
    np.testing.assert_array_equal(d, a[perm])
    np.testing.assert_array_equal(ld, la[perm])
    # Another epoch of the same example (same clip, same step) is another draw.
    assert not np.array_equal(a[0, :5], a[2, :5])
    # The seed matters (the keys are all that depends on it).
    other = augment_device.example_keys(4, 5, ids)
    same = augment_device.example_keys(3, 5, ids)
    assert not np.array_equal(jax.random.key_data(other), jax.random.key_data(same))


def test_packed_row_gives_each_clip_what_its_own_row_gives():
    """augment_row with two clip slots in one row == each clip alone (all augmentations):
    the per-token form the packed layout will use."""
    spec = PoseSpec(max_frames=64)
    aug = DeviceAugment(spec=spec, seed=1, **ALL)
    a, b = clip(0, frames=30), clip(1, frames=25)
    keys = augment_device.example_keys(1, 7, jnp.array([[0, 3], [0, 4]]))
    res = jnp.array([36, 0], jnp.int32)  # clip 0 resampled to 36 frames, clip 1 not

    row = jax.jit(functools.partial(augment_row, aug=aug))
    # Each clip alone: a row that is its slot.
    x = np.zeros((2, 64, 203, 3), np.float32)
    o = np.zeros((2, 64, 203), bool)
    x[0, :30], o[0, :30] = a.points, a.observed
    x[1, :25], o[1, :25] = b.points, b.observed
    zero = jnp.zeros(1, jnp.int32)
    xs, os_, ns = jax.vmap(lambda x, o, t, r, k: row(x, o, jnp.zeros(64, jnp.int32), zero,
                                                      t[None], r[None], k[None]))(
        jnp.asarray(x), jnp.asarray(o), jnp.array([30, 25]), res, keys
    )  # fmt: skip
    xa, oa, na = xs[0, :36], os_[0, :36], ns[0]
    xb, ob, nb = xs[1, :25], os_[1, :25], ns[1]
    assert not np.asarray(xs[0, 36:]).any() and not np.asarray(xs[1, 25:]).any()
    # One row: clip 0 in frames 0..35, clip 1 in 36..60, padding 61..63.
    x = np.zeros((64, 203, 3), np.float32)
    o = np.zeros((64, 203), bool)
    x[:30], o[:30] = a.points, a.observed
    x[36:61], o[36:61] = b.points, b.observed
    slot = np.full(64, -1, np.int32)
    slot[:36], slot[36:61] = 0, 1
    xr, orow, n = row(jnp.asarray(x), jnp.asarray(o), jnp.asarray(slot), jnp.array([0, 36]),
                      jnp.array([30, 25]), res, keys)  # fmt: skip
    assert n.tolist() == [int(na[0]), int(nb[0])] and int(na[0]) < 36
    np.testing.assert_allclose(xr[:36], xa, atol=1e-6)
    np.testing.assert_allclose(xr[36:61], xb, atol=1e-6)
    np.testing.assert_array_equal(orow[:36], oa)
    np.testing.assert_array_equal(orow[36:61], ob)
    assert not np.asarray(xr[61:]).any()


# --- distributions ------------------------------------------------------------------------------

N = 2000  # examples per distribution check


def _device(arr, spec, n=N, step=0, aug_frames=None, length=None, **kwargs):
    aug = DeviceAugment(spec=spec, seed=0, **kwargs)
    batch = device_batch([arr] * n, aug_frames=aug_frames, length=length)
    return run(aug, batch, step=step)


def test_spatial_transform_distribution():
    spec = PoseSpec(max_frames=8)
    arr = clip(0, frames=2, gaps=False)
    points = [0, 16, 100, 190]  # nose, right wrist, a face point, a right-hand point
    want = np.stack([a.points[0, points, :2] for a in host(arr, spec, N, spatial=True)])
    got, _ = _device(arr, spec, spatial=True)
    got = got[:, 0, points, :2]
    crit = ks_critical(N, N)
    stats = [ks(got[:, k, c], want[:, k, c]) for k in range(len(points)) for c in range(2)]
    assert max(stats) < crit, (stats, crit)
    # Power: std 0.26 instead of 0.2 is rejected.
    wider, _ = _device(arr, spec, spatial=True, spatial_std=0.26)
    wider = wider[:, 0, points, :2]
    assert max(ks(wider[:, k, c], want[:, k, c]) for k in range(4) for c in range(2)) > crit


def test_flip_frequency():
    spec = PoseSpec(max_frames=8)
    arr = clip(0, frames=3)
    flipped = augment.flip_horizontal(arr, spec).points
    want = sum(
        not np.allclose(a.points, arr.points) for a in host(arr, spec, N, flip_prob=0.3)
    )  # fmt: skip

    def count(p):
        got, _ = _device(arr, spec, flip_prob=p)
        is_flip = np.abs(got[:, :3] - flipped).max(axis=(1, 2, 3)) < 1e-5
        is_same = np.abs(got[:, :3] - arr.points).max(axis=(1, 2, 3)) < 1e-6
        assert (is_flip ^ is_same).all()  # every row is one or the other
        return int(is_flip.sum())

    se = math.sqrt(2 * N * 0.3 * 0.7)
    assert abs(count(0.3) - want) < 4 * se, (count(0.3), want)
    assert abs(count(0.4) - want) > 4 * se  # power


def test_noise_distribution():
    spec = PoseSpec(max_frames=8)
    arr = clip(0, frames=4)
    std = 0.01
    want = np.stack([a.points - arr.points for a in host(arr, spec, N // 4, noise=True,
                                                          noise_std=std)])  # fmt: skip
    got, _ = _device(arr, spec, n=N // 4, noise=True, noise_std=std)
    got = got[:, :4] - arr.points
    observed = arr.observed  # hidden legs count as observed: they get noise too
    assert observed[:, layout("reduced_face").legs].all()
    assert not got[:, ~observed].any() and not want[:, ~observed].any()
    a, b = got[:, observed].ravel(), want[:, observed].ravel()
    rng = np.random.default_rng(0)
    a, b = rng.choice(a, 20000, replace=False), rng.choice(b, 20000, replace=False)
    crit = ks_critical(len(a), len(b))
    assert ks(a, b) < crit
    assert abs(a.std() / std - 1) < 4 * math.sqrt(1 / (2 * len(a)))
    assert ks(a * 1.1, b) > crit  # power


def test_frame_dropout_distribution():
    spec = PoseSpec(max_frames=32)
    arr = clip(0, frames=20)
    # Tag frame t by x = t at point 0, so the kept frames and their order show.
    points = arr.points.copy()
    points[:, 0] = [[t, 0, 0] for t in range(20)]
    observed = arr.observed.copy()
    observed[:, 0] = True
    arr = PoseArray(points, observed, arr.fps)
    want = [a.num_frames for a in host(arr, spec, N, frame_dropout_rate=0.3)]
    got, lengths = _device(arr, spec, frame_dropout_rate=0.3)
    assert lengths.min() >= 1
    for i in range(200):  # kept frames: an increasing subsequence, the rest padding
        kept = got[i, : lengths[i], 0, 0]
        assert (np.diff(kept) > 0).all() and set(kept) <= set(range(20))
        np.testing.assert_array_equal(got[i, : lengths[i], 1:], arr.points[kept.astype(int), 1:])
    crit = ks_critical(N, N)
    assert ks(lengths, want) < crit
    _, fewer = _device(arr, spec, frame_dropout_rate=0.35)
    assert ks(fewer, want) > crit  # power
    # At least one frame survives even when all are dropped.
    _, one = _device(arr, spec, n=64, frame_dropout_rate=1.0)
    assert (one == 1).all()


def test_resampled_frame_counts_are_drawn_like_numpy():
    """The host's frame-count draw (pipeline.device_frames) has the numpy augmentation's
    distribution: the speed ratio ~ N(1, temporal_std), applied under max_frames."""
    n = 4000
    spec = PoseSpec(components="dominant_hand", max_frames=256)
    settings = pipeline.InputSettings(spec=spec, augment=(("temporal", True),))
    for frames, fps in ((73, 25.0), (230, 30.0)):
        arr = PoseArray(np.zeros((frames, 21, 3), np.float32), np.ones((frames, 21), bool), fps)
        want = [a.num_frames for a in host(arr, spec, n, temporal=True)]
        t_in, got = pipeline.device_frames(frames, fps, 0, np.arange(n), settings, seed=1)
        got = np.where(got > 0, got, frames)
        assert ks(got, want) < ks_critical(n, n)
        assert (t_in == frames).all()  # resampled clips go whole, the others are <= 256
        wide = pipeline.InputSettings(spec=spec, augment=(("temporal", True),
                                                          ("temporal_std", 0.3)))  # fmt: skip
        _, other = pipeline.device_frames(frames, fps, 0, np.arange(n), wide, seed=1)
        assert ks(np.where(other > 0, other, frames), want) > ks_critical(n, n)  # power
    # Another epoch, another draw; the same key, the same draw.
    a = pipeline.device_frames(73, 25.0, 0, np.arange(50), settings, seed=1)[1]
    b = pipeline.device_frames(73, 25.0, 1, np.arange(50), settings, seed=1)[1]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, pipeline.device_frames(73, 25.0, 0, np.arange(50),
                                                            settings, seed=1)[1])  # fmt: skip


def test_whole_recipe_distribution():
    """All five together (the host draws the frame counts): per-clip statistics of the
    output have the numpy augmentation's distribution."""
    spec = PoseSpec(max_frames=64)
    arr = clip(2, frames=12)
    kwargs = dict(temporal=True, spatial=True, noise=True, flip_prob=0.2, frame_dropout_rate=0.1)
    settings = pipeline.InputSettings(spec=spec, augment=tuple(kwargs.items()))
    t_in, frames = pipeline.device_frames(12, 25.0, 0, np.arange(N), settings, seed=0)
    assert (t_in == 12).all()
    got, lengths = _device(arr, spec, aug_frames=frames, length=32, **kwargs)
    want = host(arr, spec, N, **kwargs)

    def summary(points, n):  # mean x and y of observed right-hand points, per clip
        hand = points[:n, 182:203, :2]
        seen = np.abs(hand).sum(-1) > 0
        return hand[seen].mean(0) if seen.any() else np.zeros(2)

    s_got = np.stack([summary(got[i], lengths[i]) for i in range(N)])
    s_want = np.stack([summary(a.points, a.num_frames) for a in want])
    crit = ks_critical(N, N)
    assert ks(lengths, [a.num_frames for a in want]) < crit
    assert ks(s_got[:, 0], s_want[:, 0]) < crit and ks(s_got[:, 1], s_want[:, 1]) < crit
