"""Synthetic dataset: real .pose files, Spreadthesign CSV, learnable signs, determinism, speed."""

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from pose_format import Pose

from signclip_jax.data.pose import BODY_POINTS, HAND_POINTS, PoseSpec, load_features
from signclip_jax.data.synthetic import holistic_header, write_synthetic_dataset

NUM_SIGNS, SIGNERS = 8, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    csv_path = write_synthetic_dataset(out, num_signs=NUM_SIGNS, signers=SIGNERS, seed=0)
    elapsed = time.perf_counter() - start
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return out, csv_path, rows, elapsed


def test_header_layout():
    header = holistic_header()
    comps = {c.name: c for c in header.components}
    assert [c.name for c in header.components] == [
        "POSE_LANDMARKS", "FACE_LANDMARKS", "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS",
        "POSE_WORLD_LANDMARKS",
    ]  # fmt: skip
    assert comps["POSE_LANDMARKS"].points == list(BODY_POINTS)
    assert comps["FACE_LANDMARKS"].points == [str(i) for i in range(468)]
    assert comps["RIGHT_HAND_LANDMARKS"].points == list(HAND_POINTS)
    assert all(c.format == "XYZC" for c in header.components)
    assert header.total_points() == 576
    refined = holistic_header(face_points=478, world_landmarks=False)
    assert [len(c.points) for c in refined.components] == [33, 478, 21, 21]
    with pytest.raises(ValueError):
        holistic_header(face_points=100)


def test_csv_layout(dataset):
    out, _, rows, _ = dataset
    assert list(rows[0]) == ["pose", "videoLanguage", "language", "text"]
    english = [r for r in rows if r["language"] == "en"]
    assert len(english) == NUM_SIGNS * SIGNERS
    assert {r["language"] for r in rows} == {"en", "de"}  # something for a language filter
    assert len({r["videoLanguage"] for r in rows}) >= 2
    texts = {r["text"] for r in english}
    assert len(texts) == NUM_SIGNS
    for text in texts:  # one word per sign: every signer signs it
        assert len({r["pose"] for r in english if r["text"] == text}) == SIGNERS
    files = sorted(p.name for p in (out / "poses").glob("*.pose"))
    assert files == sorted(r["pose"] for r in english)


def test_files_read_back(dataset):
    out, _, rows, _ = dataset
    for row in rows[::5]:
        path = out / "poses" / row["pose"]
        pose = Pose.read(path.read_bytes())
        assert pose.header.total_points() == 576 and pose.body.fps == 25.0
        feats = load_features(path)
        assert 40 <= feats.shape[0] <= 90 and feats.shape[1] == 609
        pts = feats.reshape(len(feats), 203, 3)
        dist = np.linalg.norm(pts[:, 11] - pts[:, 12], axis=-1).mean()
        np.testing.assert_allclose(dist, 1.0, atol=1e-5)  # shoulder normalisation holds
        assert not pts[:, 25:33].any()


def test_signs_are_separable_across_signers(dataset):
    """Nearest centroid on per-clip mean features, leaving signers out (chance is 1/8)."""
    out, _, rows, _ = dataset
    english = [r for r in rows if r["language"] == "en"]
    x = np.stack([load_features(out / "poses" / r["pose"]).mean(axis=0) for r in english])
    y = np.array([r["text"] for r in english])
    signer = np.array([int(r["pose"].split("-")[2]) for r in english])
    labels = np.unique(y)
    correct = 0
    for held in range(SIGNERS):
        train, test = signer != held, signer == held
        centroids = np.stack([x[train & (y == label)].mean(axis=0) for label in labels])
        dist = ((x[test][:, None] - centroids[None]) ** 2).sum(-1)
        correct += (labels[dist.argmin(1)] == y[test]).sum()
    assert correct / len(y) >= 0.9
    # ...and the signer alone does not give the sign away.
    shuffled = np.random.default_rng(0).permutation(y)
    centroids = np.stack([x[shuffled == label].mean(axis=0) for label in labels])
    chance = (labels[((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)] == y).mean()
    assert chance < 0.6


def test_same_seed_same_bytes(dataset, tmp_path):
    out, csv_path, _, _ = dataset
    again = write_synthetic_dataset(tmp_path / "a", num_signs=NUM_SIGNS, signers=SIGNERS, seed=0)
    assert again.read_bytes() == csv_path.read_bytes()
    for path in sorted((out / "poses").glob("*.pose"))[::7]:
        assert (tmp_path / "a" / "poses" / path.name).read_bytes() == path.read_bytes()
    other = write_synthetic_dataset(tmp_path / "b", num_signs=2, signers=1, seed=1)
    first = sorted((tmp_path / "b" / "poses").glob("*.pose"))[0]
    assert first.read_bytes() != (tmp_path / "a" / "poses" / first.name).read_bytes()
    assert other.exists()


def test_layout_options(tmp_path):
    csv_path = write_synthetic_dataset(
        tmp_path, num_signs=2, signers=2, seed=3, face_points=478, world_landmarks=False,
        min_frames=20, max_frames=30, fps=30.0,
    )  # fmt: skip
    paths = sorted((tmp_path / "poses").glob("*.pose"))
    assert len(paths) == 4 and csv_path.exists()
    pose = Pose.read(paths[0].read_bytes())
    assert [len(c.points) for c in pose.header.components] == [33, 478, 21, 21]
    assert pose.body.fps == 30.0 and 20 <= len(pose.body.data) <= 30
    assert load_features(paths[0], PoseSpec("holistic")).shape[1] == 1629


def test_generation_is_fast(dataset):
    *_, elapsed = dataset
    assert elapsed < 0.1 * NUM_SIGNS * SIGNERS  # < 0.1 s per file here (~0.005 s measured)


@pytest.mark.slow
def test_generation_500_files_under_10s(tmp_path):
    start = time.perf_counter()
    write_synthetic_dataset(tmp_path, num_signs=20, signers=25, seed=0)
    elapsed = time.perf_counter() - start
    assert len(list(Path(tmp_path, "poses").glob("*.pose"))) == 500
    assert elapsed < 10
