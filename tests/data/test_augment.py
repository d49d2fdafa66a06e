"""Augmentation: checked against pose-format's own operations, on the real and generated files."""

import dataclasses

import numpy as np
import pytest
from pose_format import Pose
from pose_format.numpy import NumPyPoseBody
from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
from pose_format.utils.generic import pose_normalization_info

from signclip_jax.data.augment import (
    augment,
    flip_horizontal,
    frame_dropout,
    gaussian_noise,
    spatial_transform,
    temporal_resample,
)
from signclip_jax.data.pose import (
    BODY_POINTS,
    FACE_CONTOUR,
    FACE_MIRROR,
    PoseArray,
    PoseSpec,
    layout,
    pose_to_array,
    read_pose,
    to_features,
)
from signclip_jax.data.synthetic import holistic_header, pose_bytes, random_clip

HOUSE = "spreadthesign-ase-house.pose"
FOUR = ["POSE_LANDMARKS", "FACE_LANDMARKS", "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS"]
LEGS = list(range(25, 33))

# Section 4 of the reference, as data: source point placed in each slot after a flip.
FLIP_BODY = [0, 4, 5, 6, 1, 2, 3, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 18, 17, 20, 19, 22, 21,
             24, 23, 26, 25, 28, 27, 30, 29, 32, 31]  # fmt: skip
FLIP_FACE = [
    0, 249, 10, 13, 14, 17, 251, 263, 267, 269, 270, 276, 282, 283, 284, 285, 288, 291, 293, 295,
    296, 297, 300, 308, 310, 311, 312, 314, 317, 318, 321, 323, 324, 332, 334, 336, 338, 356, 361,
    362, 365, 373, 374, 375, 377, 378, 379, 152, 380, 381, 382, 384, 385, 386, 387, 388, 389, 390,
    397, 398, 400, 402, 405, 409, 415, 454, 466, 7, 21, 33, 37, 39, 40, 46, 52, 53, 54, 55, 58, 61,
    63, 65, 66, 67, 70, 78, 80, 81, 82, 84, 87, 88, 91, 93, 95, 103, 105, 107, 109, 127, 132, 133,
    136, 144, 145, 146, 148, 149, 150, 153, 154, 155, 157, 158, 159, 160, 161, 162, 163, 172, 173,
    176, 178, 181, 185, 191, 234, 246,
]  # fmt: skip


def original_pose(data: bytes) -> Pose:
    """The original's normalised, legs-hidden reduced_face pose (pose-format)."""
    pose = Pose.read(data)
    pose = pose.get_components(FOUR, {"FACE_LANDMARKS": [str(i) for i in FACE_CONTOUR]})
    pose = pose.normalize(pose_normalization_info(pose.header))
    pose.body.data[:, :, LEGS, :] = 0
    pose.body.confidence[:, :, LEGS] = 0
    return pose


def generated(seed=0, gap=True, fps=25.0) -> bytes:
    data, conf = random_clip(seed)
    if gap:  # interior gaps in both hands, different lengths
        data[8:11, :, 501 + 21 : 543], conf[8:11, :, 501 + 21 : 543] = 0, 0
        data[20:21, :, 501:522], conf[20:21, :, 501:522] = 0, 0
    return pose_bytes(holistic_header(), data, conf, fps)


def array(data: bytes, spec: PoseSpec | None = None) -> PoseArray:
    return pose_to_array(read_pose(data), spec or PoseSpec())


def assert_same(a: PoseArray, b: PoseArray, atol=0.0):
    np.testing.assert_allclose(a.points, b.points, atol=atol, rtol=0)
    np.testing.assert_array_equal(a.observed, b.observed)
    assert a.fps == b.fps


# --- temporal resampling ----------------------------------------------------------------------


def _check_against_interpolate(data: bytes, ratio: float):
    arr = array(data)
    pose = original_pose(data)
    new_fps = round(pose.body.fps * ratio)
    want = pose.interpolate(new_fps, kind="linear")
    got = temporal_resample(arr, ratio, max_frames=256)
    assert got.fps == new_fps
    assert got.points.shape == (want.body.data.shape[0], 203, 3)
    np.testing.assert_allclose(got.points, np.nan_to_num(want.body.data)[:, 0], atol=1e-6)
    not_legs = ~layout("reduced_face").legs
    np.testing.assert_array_equal(
        got.observed[:, not_legs], (want.body.confidence[:, 0] > 0)[:, not_legs]
    )
    return arr, got


@pytest.mark.shared_data
@pytest.mark.parametrize("ratio,frames", [(0.8, 58), (1.0, 73), (1.2, 88), (1.37, 99)])
def test_temporal_matches_pose_format_real(shared_pose, ratio, frames):
    arr, got = _check_against_interpolate(shared_pose(HOUSE).read_bytes(), ratio)
    assert got.num_frames == frames
    if ratio == 1.0:  # the interior right-hand gap at frame 24 is filled
        changed = to_features(got, PoseSpec()) != to_features(arr, PoseSpec())
        assert changed.sum() == 693
        assert changed[24, 546:].all() and got.observed[24, 182:].all()
        assert not got.points[:14, 182:].any() and not got.points[51:, 182:].any()


@pytest.mark.parametrize("ratio", [0.63, 0.8, 1.0, 1.2, 1.37, 1.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_temporal_matches_pose_format_generated(ratio, seed):
    arr, got = _check_against_interpolate(generated(seed), ratio)
    assert got.num_frames == round(arr.num_frames * round(25 * ratio) / 25)
    if ratio == 1.0:  # every point is observed from its first to its last observation
        seen = arr.observed
        first = np.argmax(seen, axis=0)
        last = len(seen) - 1 - np.argmax(seen[::-1], axis=0)
        frames = np.arange(len(seen))[:, None]
        span = (frames >= first) & (frames <= last) & seen.any(axis=0)
        np.testing.assert_array_equal(got.observed, span | layout("reduced_face").legs)
        assert (span & ~seen).sum() >= 3 * 21  # the right-hand gap at least was filled


@pytest.mark.parametrize("seed", range(6))
def test_temporal_matches_pose_format_on_random_patterns(seed):
    """Points never seen, seen once (first/last/interior frame), twice, with gaps."""
    rng = np.random.default_rng(seed)
    t, p = int(rng.integers(2, 30)), 40
    density = rng.choice([0.0, 0.05, 0.3, 0.8, 1.0], p)
    observed = rng.random((t, p)) < density
    observed[0, 0] = observed[-1, 1] = observed[t // 2, 2] = True  # single observations
    observed[1:, 0] = observed[:-1, 1] = False
    observed[: t // 2, 2] = observed[t // 2 + 1 :, 2] = False
    points = np.where(observed[..., None], rng.normal(size=(t, p, 3)), 0).astype(np.float32)
    arr = PoseArray(points=points, observed=observed, fps=float(rng.choice([10, 24, 25, 30])))
    component = PoseHeaderComponent("P", [str(i) for i in range(p)], [], [], "XYZC")
    header = PoseHeader(0.2, PoseHeaderDimensions(1, 1), [component])
    pose = Pose(header, NumPyPoseBody(arr.fps, points[:, None], observed[:, None] * 1.0))
    for ratio in (0.5, 0.9, 1.0, 1.37, 2.2):
        new_fps = round(arr.fps * ratio)
        if round(t * new_fps / arr.fps) < 2:
            continue
        want = pose.interpolate(new_fps, kind="linear")
        got = temporal_resample(arr, ratio, max_frames=0)
        np.testing.assert_allclose(got.points, np.ma.filled(want.body.data, 0)[:, 0], atol=1e-6)
        np.testing.assert_array_equal(got.observed, want.body.confidence[:, 0] > 0)


def test_temporal_identity_at_ratio_one_without_gaps():
    arr = array(generated(2, gap=False))
    arr = dataclasses.replace(arr, observed=np.ones_like(arr.observed))  # no gaps at all
    got = temporal_resample(arr, 1.0, 256)
    assert_same(got, arr, atol=1e-6)


def test_temporal_not_applied():
    arr = array(generated(3))
    t = arr.num_frames
    assert temporal_resample(arr, 1.2, max_frames=int(t * 1.2)) is arr  # strict: T*r < max
    assert temporal_resample(arr, 1.2, max_frames=int(t * 1.2) + 1) is not arr
    assert temporal_resample(arr, 5.0, max_frames=0).num_frames == t * 5  # 0 = no limit
    one = dataclasses.replace(arr, points=arr.points[:1], observed=arr.observed[:1])
    assert temporal_resample(one, 1.3, 256) is one
    assert temporal_resample(arr, 0.01, 256) is arr  # would leave < 2 frames


# --- flip ---------------------------------------------------------------------------------


def test_flip_permutation_is_section_4():
    lay = layout("reduced_face")
    np.testing.assert_array_equal(lay.flip_source[:33], FLIP_BODY)
    slots = {f: 33 + i for i, f in enumerate(FACE_CONTOUR)}
    np.testing.assert_array_equal(lay.flip_source[33:161], [slots[f] for f in FLIP_FACE])
    np.testing.assert_array_equal(lay.flip_source[161:182], np.arange(182, 203))
    np.testing.assert_array_equal(lay.flip_source[182:], np.arange(161, 182))
    names = [BODY_POINTS[i] for i in lay.flip_source[:33]]
    assert names[:4] == ["NOSE", "RIGHT_EYE_INNER", "RIGHT_EYE", "RIGHT_EYE_OUTER"]


def test_face_mirror_is_consistent():
    assert (FACE_MIRROR[FACE_MIRROR] == np.arange(468)).all()  # an involution
    assert set(np.flatnonzero(FACE_MIRROR == np.arange(468))) >= {0, 10, 13, 14, 17, 152}
    # The 468-point mirror restricted to the contour is the section-4 list.
    np.testing.assert_array_equal(FACE_MIRROR[list(FACE_CONTOUR)], FLIP_FACE)
    hol = layout("holistic")
    np.testing.assert_array_equal(hol.flip_source[33:501], 33 + FACE_MIRROR)


@pytest.mark.shared_data
def test_face_mirror_preserves_the_real_mesh(shared_pose):
    """The mirror maps MediaPipe's face tessellation (the real header's limbs) onto itself."""
    face = next(c for c in read_pose(shared_pose(HOUSE)).header.components
                if c.name == "FACE_LANDMARKS")  # fmt: skip
    edges = {tuple(sorted(e)) for e in face.limbs}
    mapped = {tuple(sorted((FACE_MIRROR[a], FACE_MIRROR[b]))) for a, b in edges}
    assert len(edges & mapped) / len(edges) > 0.99
    shuffled = np.random.default_rng(0).permutation(468)
    wrong = {tuple(sorted((shuffled[a], shuffled[b]))) for a, b in edges}
    assert len(edges & wrong) / len(edges) < 0.05


def _check_flip_matches_original(data: bytes):
    arr = array(data)
    pose = original_pose(data).flip(0)
    lay = layout("reduced_face")
    names = [p for _, p in lay.points]
    flip_pose = pose.get_components(
        ["POSE_LANDMARKS", "FACE_LANDMARKS", "RIGHT_HAND_LANDMARKS", "LEFT_HAND_LANDMARKS"],
        {"POSE_LANDMARKS": [names[i] for i in FLIP_BODY],
         "FACE_LANDMARKS": [str(i) for i in FLIP_FACE]},
    )  # fmt: skip
    flip_pose = flip_pose.normalize(pose_normalization_info(flip_pose.header))
    want = np.nan_to_num(flip_pose.body.data)[:, 0]
    got = flip_horizontal(arr, PoseSpec())
    not_legs = ~lay.legs  # the original's re-normalisation nudges its legs by ~1e-8
    np.testing.assert_allclose(got.points[:, not_legs], want[:, not_legs], atol=2e-6)
    assert not got.points[:, lay.legs].any()
    np.testing.assert_array_equal(got.observed[:, 161:182], arr.observed[:, 182:])


@pytest.mark.shared_data
def test_flip_matches_original_real(shared_pose):
    _check_flip_matches_original(shared_pose(HOUSE).read_bytes())


def test_flip_matches_original_generated():
    _check_flip_matches_original(generated(4))


@pytest.mark.parametrize("components", ["reduced_face", "holistic", "hands", "dominant_hand"])
def test_flip_twice_is_identity(components):
    spec = PoseSpec(components)
    arr = array(generated(5), spec)
    once = flip_horizontal(arr, spec)
    assert once.points.shape == arr.points.shape
    assert not np.allclose(once.points, arr.points, atol=1e-3)
    assert_same(flip_horizontal(once, spec), arr, atol=1e-5)


def test_flip_mirrors_hands():
    spec = PoseSpec("hands")
    arr = array(generated(6), spec)
    got = flip_horizontal(arr, spec)
    want = arr.points[:, list(range(21, 42)) + list(range(21))] * np.float32([-1, 1, 1])
    np.testing.assert_array_equal(got.points, want)
    dom = flip_horizontal(array(generated(6), PoseSpec("dominant_hand")), PoseSpec("dominant_hand"))
    np.testing.assert_array_equal(dom.points, arr.points[:, 21:] * np.float32([-1, 1, 1]))


# --- spatial, noise, frame dropout ----------------------------------------------------------


class LegacyRandom:
    """Duck-typed rng drawing from np.random's global state, as pose-format's augment2d does."""

    def normal(self, loc, scale):
        return np.random.normal(loc=loc, scale=scale, size=1)[0]  # noqa: NPY002


def _check_spatial_matches_augment2d(data: bytes):
    arr = array(data)
    pose = original_pose(data)
    np.random.seed(7)  # noqa: NPY002  (pose-format draws from the global state)
    want = np.ma.filled(pose.augment2d().body.data, 0)[:, 0]
    np.random.seed(7)  # noqa: NPY002
    got = spatial_transform(arr, LegacyRandom(), std=0.2)
    np.testing.assert_allclose(got.points, want, atol=1e-5)
    np.testing.assert_array_equal(got.points[..., 2], arr.points[..., 2])
    assert not got.points[~arr.observed].any()


@pytest.mark.shared_data
def test_spatial_matches_augment2d_real(shared_pose):
    _check_spatial_matches_augment2d(shared_pose(HOUSE).read_bytes())


def test_spatial_matches_augment2d_generated():
    _check_spatial_matches_augment2d(generated(7))


def test_noise():
    arr = array(generated(8))
    got = gaussian_noise(arr, np.random.default_rng(0), std=0.01)
    delta = got.points - arr.points
    assert not delta[~arr.observed].any()  # missing points stay 0
    assert delta[:, layout("reduced_face").legs].any()  # legs are observed zeros: noisy
    np.testing.assert_allclose(delta[arr.observed].std(), 0.01, rtol=0.05)
    again = gaussian_noise(arr, np.random.default_rng(0), std=0.01)
    np.testing.assert_array_equal(again.points, got.points)


def test_frame_dropout():
    arr = array(generated(9))
    t = arr.num_frames
    assert frame_dropout(arr, np.random.default_rng(0), 0.0) is arr
    half = frame_dropout(arr, np.random.default_rng(0), 0.5)
    assert 0 < half.num_frames < t and half.points.shape[1:] == arr.points.shape[1:]
    rows = [np.flatnonzero((arr.points == p).all(axis=(1, 2)))[0] for p in half.points]
    assert rows == sorted(rows)  # kept frames, in order
    assert frame_dropout(arr, np.random.default_rng(0), 1.0).num_frames == 1
    again = frame_dropout(arr, np.random.default_rng(0), 0.5)
    np.testing.assert_array_equal(again.points, half.points)


# --- augment --------------------------------------------------------------------------------


def test_augment_everything_off_is_identity():
    arr = array(generated(10))
    assert_same(augment(arr, PoseSpec(), np.random.default_rng(0)), arr)


ALL_ON = dict(temporal=True, spatial=True, noise=True, flip_prob=0.5, frame_dropout_rate=0.1)


@pytest.mark.parametrize("components", ["reduced_face", "hands"])
def test_augment_deterministic_per_seed(components):
    spec = PoseSpec(components)
    arr = array(generated(11), spec)
    outs = [augment(arr, spec, np.random.default_rng(s), **ALL_ON) for s in (1, 1, 2)]
    assert_same(outs[0], outs[1])
    assert outs[0].points.shape[1:] == (spec.num_points, 3)
    assert outs[0].points.dtype == np.float32 and outs[0].observed.dtype == bool
    assert outs[0].points.shape != outs[2].points.shape or not np.array_equal(
        outs[0].points, outs[2].points
    )
    feats = to_features(outs[0], spec)
    assert feats.shape == (outs[0].num_frames, spec.feature_dim) and np.isfinite(feats).all()
    np.testing.assert_array_equal(arr.points, array(generated(11), spec).points)  # input intact


def test_augment_temporal_respects_max_frames():
    arr = array(generated(12))
    spec = PoseSpec(max_frames=arr.num_frames)  # any ratio >= 1 is refused, < 1 applied
    lengths = {augment(arr, spec, np.random.default_rng(s), temporal=True).num_frames
               for s in range(20)}  # fmt: skip
    assert max(lengths) == arr.num_frames and min(lengths) < arr.num_frames


def test_augment_no_leg_noise_after_resampling():
    """As in the original: interpolation masks the hidden legs, so noise skips them."""
    arr = array(generated(13))
    legs = layout("reduced_face").legs
    for seed in range(5):
        out = augment(arr, PoseSpec(), np.random.default_rng(seed), temporal=True, noise=True)
        if out.num_frames != arr.num_frames or out.fps != arr.fps:
            assert not out.points[:, legs].any() and out.observed[:, legs].all()
    out = augment(arr, PoseSpec(), np.random.default_rng(0), noise=True)
    assert out.points[:, legs].any()
