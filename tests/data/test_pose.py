"""Pose preprocessing: golden values on the real recording, the same checks on generated files.

The oracle is the original's own pipeline run with pose-format (select components, normalise,
hide legs, nan_to_num, reference section 3.1); our numpy implementation must match it bit for bit.
"""

import hashlib
import io

import numpy as np
import pytest
from pose_format import Pose
from pose_format.utils.generic import pose_normalization_info, reduce_holistic

from signclip_jax.data.pose import (
    COMPONENT_SETS,
    FACE_CONTOUR,
    DataError,
    PoseSpec,
    layout,
    load_features,
    pad_frames,
    pose_to_array,
    read_pose,
    to_features,
)
from signclip_jax.data.synthetic import holistic_header, pose_bytes, random_clip, select_layout
from signclip_jax.errors import UserError
from tests.data.malformed import write_malformed_poses

HOUSE = "spreadthesign-ase-house.pose"
HOLISTIC_FILES = [HOUSE, "colin-1-HOUSE.pose", "colin-SAD.pose"]
REDUCED = "pose-format-mediapipe.pose"
FOUR = ["POSE_LANDMARKS", "FACE_LANDMARKS", "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS"]


def reference_features(data: bytes) -> np.ndarray:
    """The original `reduced_face` path, run with pose-format itself."""
    pose = Pose.read(data)
    pose = pose.get_components(FOUR, {"FACE_LANDMARKS": [str(i) for i in FACE_CONTOUR]})
    pose = pose.normalize(pose_normalization_info(pose.header))
    legs = list(range(25, 33))
    pose.body.data[:, :, legs, :] = 0
    pose.body.confidence[:, :, legs] = 0
    feats = np.nan_to_num(pose.body.data)[:, 0]
    return np.asarray(feats).reshape(feats.shape[0], -1).astype(np.float32)


def generated(seed=0, face_points=468, world=True, keep_face=None, hand_gap=True) -> bytes:
    """A generated holistic .pose file (optionally with an interior right-hand gap)."""
    data, conf = random_clip(seed, face_points=face_points)
    if hand_gap:
        right = slice(33 + face_points + 21, 33 + face_points + 42)
        data[10:13, :, right], conf[10:13, :, right] = 0, 0
    keep = face_points if keep_face is None else keep_face
    data, conf = select_layout(
        data, conf, face_points=face_points, keep_face=keep, world_landmarks=world
    )
    return pose_bytes(holistic_header(keep, world), data, conf, fps=25.0)


def shoulder_distance(feats: np.ndarray) -> float:
    pts = feats.reshape(len(feats), -1, 3)
    return float(np.linalg.norm(pts[:, 11] - pts[:, 12], axis=-1).mean())


# --- golden values on the real recording ---------------------------------------------------


@pytest.mark.shared_data
def test_golden_house(shared_pose):
    feats = load_features(shared_pose(HOUSE))
    assert feats.shape == (73, 609) and feats.dtype == np.float32
    assert hashlib.md5(feats.tobytes()).hexdigest() == "e672b202825fa4d2fedbdf36f65289cf"
    np.testing.assert_allclose(feats.sum(dtype=np.float64), -4776.686, atol=2e-3)
    np.testing.assert_allclose(np.abs(feats).sum(dtype=np.float64), 9460.633, atol=2e-3)
    np.testing.assert_allclose((feats.astype(np.float64) ** 2).sum(), 5783.586, atol=2e-3)
    first = [-0.003546, -0.607213, -0.006044, 0.071845, -0.700190, -0.005597, 0.106136,
             -0.698320, -0.005601]  # fmt: skip
    np.testing.assert_allclose(feats[0, :9], first, atol=1e-6)
    np.testing.assert_allclose(shoulder_distance(feats), 1.0, atol=1e-6)
    assert not feats[:, 75:99].any()  # legs
    assert int((~feats[:, 546:609].any(axis=1)).sum()) == 37  # frames without right hand
    assert int((~feats[:, 483:546].any(axis=1)).sum()) == 46  # without left hand


@pytest.mark.shared_data
@pytest.mark.parametrize("name", HOLISTIC_FILES)
def test_matches_pose_format_pipeline_on_real_files(shared_pose, name):
    data = shared_pose(name).read_bytes()
    np.testing.assert_array_equal(load_features(data), reference_features(data))


@pytest.mark.parametrize("seed", range(4))
def test_matches_pose_format_pipeline_on_generated_files(seed):
    data = generated(seed)
    feats = load_features(data)
    assert feats.shape[1] == 609 and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, reference_features(data))
    np.testing.assert_allclose(shoulder_distance(feats), 1.0, atol=1e-6)
    assert not feats[:, 75:99].any()
    assert not feats[10:13, 546:609].any()  # the missing right hand is 0


def test_bytes_and_path_agree(tmp_path):
    data = generated(1)
    path = tmp_path / "clip.pose"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_features(path), load_features(data))
    np.testing.assert_array_equal(load_features(str(path)), load_features(data))


# --- layouts --------------------------------------------------------------------------------


def test_layout_variants_give_identical_features():
    base = load_features(generated(2, face_points=478, world=True, keep_face=468))
    for keep, world in [(478, True), (478, False), (468, False)]:
        other = load_features(generated(2, face_points=478, world=world, keep_face=keep))
        np.testing.assert_array_equal(other, base)


def test_points_matched_by_name_not_position():
    """Components in another order and the face points shuffled: same features."""
    data = generated(3)
    pose = Pose.read(data)
    names = [c.name for c in pose.header.components]
    shuffled = pose.get_components(
        names[::-1],
        {"FACE_LANDMARKS": [str(i) for i in np.random.default_rng(0).permutation(468)]},
    )
    buffer = io.BytesIO()
    shuffled.write(buffer)
    np.testing.assert_array_equal(load_features(buffer.getvalue()), load_features(data))


def _reduced_bytes(data: bytes) -> bytes:
    buffer = io.BytesIO()
    reduce_holistic(Pose.read(data)).write(buffer)
    return buffer.getvalue()


def _check_reduced(source, name, frames):
    with pytest.raises(DataError) as err:
        load_features(source, name=name)
    message = str(err.value)
    assert name in message and "POSE_LANDMARKS" in message and "25 of the 33" in message
    assert "NOSE" in message
    assert "FACE_LANDMARKS" not in message.split("The file has")[0]  # the face is fine
    hands = load_features(source, PoseSpec("hands"), name=name)
    assert hands.shape == (frames, 126) and np.isfinite(hands).all()
    return hands


@pytest.mark.shared_data
def test_reduced_layout_real(shared_pose):
    path = shared_pose(REDUCED)
    hands = _check_reduced(path, str(path), 170)
    # pose-format's reduced file stores pixel values under confidence 0: they must read as 0.
    pose = read_pose(path)
    conf = pose.body.confidence[:, 0, -42:]
    assert (np.abs(pose.body.data.data[:, 0, -42:][conf == 0]) > 1).any()
    assert not hands.reshape(170, 42, 3)[conf == 0].any()


def test_reduced_layout_generated():
    data = generated(4)
    reduced = _reduced_bytes(data)
    assert [len(c.points) for c in Pose.read(reduced).header.components] == [8, 128, 21, 21]
    frames = len(load_features(data))
    hands = _check_reduced(reduced, "reduced.pose", frames)
    # Same shoulders, so the hands match the full file's hand features.
    np.testing.assert_array_equal(hands, load_features(data, PoseSpec("hands")))


def test_missing_landmarks_are_zero_whatever_the_file_stores():
    data, conf = random_clip(5)
    right = slice(33 + 468 + 21, 33 + 468 + 42)
    conf[:5, :, right] = 0
    data[:5, :, right] = 123.0  # junk under confidence 0
    feats = load_features(pose_bytes(holistic_header(), data, conf, 25.0))
    assert not feats[:5, 546:609].any()
    data[:5, :, right] = 0  # as MediaPipe writes it: identical to the original
    clean = pose_bytes(holistic_header(), data, conf, 25.0)
    np.testing.assert_array_equal(feats, reference_features(clean))


def test_nan_landmarks_count_as_missing():
    data, conf = random_clip(6)
    left = slice(33 + 468, 33 + 468 + 21)
    data_nan = data.copy()
    data_nan[7, :, left] = np.nan
    conf_missing = conf.copy()
    conf_missing[7, :, left] = 0
    data_missing = data.copy()
    data_missing[7, :, left] = 0
    with_nan = load_features(pose_bytes(holistic_header(), data_nan, conf, 25.0))
    missing = load_features(pose_bytes(holistic_header(), data_missing, conf_missing, 25.0))
    np.testing.assert_array_equal(with_nan, missing)
    assert np.isfinite(with_nan).all()


# --- component sets and shapes -------------------------------------------------------------


def test_spec_dims():
    assert PoseSpec().num_points == 203 and PoseSpec().feature_dim == 609
    assert PoseSpec("holistic").num_points == 543
    assert PoseSpec("hands").feature_dim == 126
    assert PoseSpec("dominant_hand").feature_dim == 63
    assert PoseSpec(include_z=False).feature_dim == 406
    assert set(COMPONENT_SETS) >= {"reduced_face", "holistic", "hands", "dominant_hand"}
    with pytest.raises(UserError, match="unknown pose components"):
        PoseSpec("faces")
    with pytest.raises(UserError):
        PoseSpec(max_frames=-1)


def _component_sets_agree(data: bytes):
    full = load_features(data, PoseSpec(max_frames=0))
    t = len(full)
    holistic = load_features(data, PoseSpec("holistic", max_frames=0))
    assert holistic.shape == (t, 1629)
    hol = holistic.reshape(t, 543, 3)
    red = full.reshape(t, 203, 3)
    np.testing.assert_array_equal(hol[:, :33], red[:, :33])
    np.testing.assert_array_equal(hol[:, 33 + np.array(FACE_CONTOUR)], red[:, 33:161])
    np.testing.assert_array_equal(hol[:, 501:], red[:, 161:])
    # Hand-only sets are normalised by the full pose's shoulders: same numbers as reduced_face.
    np.testing.assert_array_equal(load_features(data, PoseSpec("hands")), full[:, 483:])
    np.testing.assert_array_equal(load_features(data, PoseSpec("dominant_hand")), full[:, 546:])
    no_z = load_features(data, PoseSpec(include_z=False))
    np.testing.assert_array_equal(no_z, red[:, :, :2].reshape(t, -1))
    # Truncation keeps the first frames; normalisation still uses the whole clip.
    np.testing.assert_array_equal(load_features(data, PoseSpec(max_frames=20)), full[:20])


@pytest.mark.shared_data
def test_component_sets_real(shared_pose):
    _component_sets_agree(shared_pose(HOUSE).read_bytes())


def test_component_sets_generated():
    _component_sets_agree(generated(7))


def test_pose_array_observed_and_legs():
    data, conf = random_clip(8)
    pose = Pose.read(pose_bytes(holistic_header(), data, conf, 30.0))
    arr = pose_to_array(pose, PoseSpec())
    assert arr.points.shape == (len(data), 203, 3) and arr.points.dtype == np.float32
    assert arr.observed.shape == (len(data), 203) and arr.fps == 30.0
    legs = layout("reduced_face").legs
    assert legs.sum() == 8 and arr.observed[:, legs].all() and not arr.points[:, legs].any()
    right_hand = conf[:, 0, 33 + 468 + 21]
    np.testing.assert_array_equal(arr.observed[:, 182], right_hand > 0)
    assert not arr.points[~arr.observed].any()
    np.testing.assert_array_equal(to_features(arr, PoseSpec()), load_features(pose_bytes(
        holistic_header(), data, conf, 30.0)))  # fmt: skip


def test_pad_frames():
    feats = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    padded, mask = pad_frames(feats, 6)
    assert padded.shape == (6, 3) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:4], feats)
    assert not padded[4:].any()
    np.testing.assert_array_equal(mask, [True] * 4 + [False] * 2)
    cut, mask = pad_frames(feats, 2)
    np.testing.assert_array_equal(cut, feats[:2])
    assert mask.all() and mask.shape == (2,)
    empty, mask = pad_frames(np.zeros((0, 3), np.float32), 3)
    assert empty.shape == (3, 3) and not mask.any()


# --- bad files ----------------------------------------------------------------------------


@pytest.mark.parametrize("components", ["reduced_face", "hands", "holistic", "dominant_hand"])
def test_malformed_files_raise_data_error(tmp_path, components):
    corpus = write_malformed_poses(tmp_path)
    assert set(corpus.values()) >= {
        "unreadable", "truncated", "empty", "zero_frames", "all_missing", "only_hands",
        "non_holistic", "nan", "missing",
    }  # fmt: skip
    for path, kind in corpus.items():
        with pytest.raises(DataError) as err:
            load_features(path, PoseSpec(components))
        assert str(path) in str(err.value), kind
        assert "Traceback" not in str(err.value)


def test_malformed_messages_say_what_is_wrong(tmp_path):
    expected = {
        "empty": "empty",
        "zero_frames": "no frames",
        "all_missing": "all confidences are 0",
        "no_shoulders": "shoulders",
        "only_hands": "POSE_LANDMARKS is absent",
        "non_holistic": "POSE_LANDMARKS is absent",
        "nan": "NaN",
        "missing": "not found",
        "truncated": "truncated or corrupt",
        "unreadable": "not a readable",
    }
    for path, kind in write_malformed_poses(tmp_path).items():
        with pytest.raises(DataError, match=expected[kind]):
            load_features(path)


def test_hands_without_shoulders_in_file(tmp_path):
    path = next(p for p, k in write_malformed_poses(tmp_path).items() if k == "only_hands")
    with pytest.raises(DataError, match="shoulder normalisation"):
        load_features(path, PoseSpec("hands"))


def test_custom_name_in_errors():
    with pytest.raises(DataError, match="clip-42"):
        load_features(b"garbage bytes", name="clip-42")
