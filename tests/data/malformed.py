"""A corpus of malformed `.pose` files for tests (a helper, not a test module).

`write_malformed_poses(directory)` writes one file per problem and returns {path: kind}. Every
path must make `signclip_jax.data.pose.load_features` (default spec) raise `DataError` naming the
file. The "missing" path is not written. Kinds:

  unreadable    bytes that are not a .pose file
  truncated     a valid header with the body cut short
  empty         0 bytes
  zero_frames   a valid header and a body with no frames
  all_missing   every landmark marked missing (confidence 0), so the shoulders never appear
  no_shoulders  hands and face observed, the shoulders never
  only_hands    only LEFT/RIGHT_HAND_LANDMARKS components
  non_holistic  an OpenPose-style header (no MediaPipe components)
  nan           all coordinates NaN (confidence 1)
  missing       a path with no file

`hostile_poses()` returns {name: bytes} of files whose headers declare far more than their bytes
hold (issue 17): pose-format decodes a body with the sizes its header declares, and a format
v0.0 frame without a person costs 2 bytes yet decodes as a frame of float64 zeros, so a
~150 KB file can ask for gigabytes. Every one must be refused by `read_pose` with a DataError
before pose-format allocates (tests/data/test_hostile_pose.py measures peak RSS).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions

from signclip_jax.data.pose import BODY_POINTS
from signclip_jax.data.synthetic import holistic_header, pose_bytes


def _pose_bytes(header: PoseHeader, data: np.ndarray, conf: np.ndarray) -> bytes:
    return pose_bytes(header, data.astype(np.float32), conf.astype(np.float32), fps=25.0)


def _random_clip(rng: np.random.Generator, frames: int, points: int):
    data = rng.uniform(50, 400, (frames, 1, points, 3))
    data[..., 2] = rng.normal(0, 0.1, (frames, 1, points))
    return data, np.ones((frames, 1, points))


def write_malformed_poses(directory: Path) -> dict[Path, str]:
    """Writes the malformed corpus into `directory`; returns {path: kind}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = holistic_header()
    n = header.total_points()
    files: dict[str, tuple[bytes | None, str]] = {}

    files["unreadable.pose"] = (b"this is not a pose file\x00\xff" * 7, "unreadable")
    good = _pose_bytes(header, *_random_clip(rng, 12, n))
    files["truncated.pose"] = (good[: len(good) // 2], "truncated")
    files["empty.pose"] = (b"", "empty")
    files["zero_frames.pose"] = (
        _pose_bytes(header, np.zeros((0, 1, n, 3)), np.zeros((0, 1, n))),
        "zero_frames",
    )
    data, _ = _random_clip(rng, 10, n)
    files["all_missing.pose"] = (_pose_bytes(header, data * 0, np.zeros((10, 1, n))), "all_missing")
    data, conf = _random_clip(rng, 10, n)
    for name in ("LEFT_SHOULDER", "RIGHT_SHOULDER"):
        i = BODY_POINTS.index(name)
        data[:, :, i], conf[:, :, i] = 0, 0
    files["no_shoulders.pose"] = (_pose_bytes(header, data, conf), "no_shoulders")

    hands = PoseHeader(
        0.2,
        PoseHeaderDimensions(640, 480),
        [c for c in header.components if c.name.endswith("HAND_LANDMARKS")],
    )
    files["only_hands.pose"] = (_pose_bytes(hands, *_random_clip(rng, 8, 42)), "only_hands")
    openpose_points = ["Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow"]
    openpose = PoseHeader(
        0.2,
        PoseHeaderDimensions(640, 480),
        [PoseHeaderComponent("pose_keypoints_2d", openpose_points, [(0, 1)], [(255, 0, 0)], "XYC")],
    )
    data, conf = _random_clip(rng, 8, len(openpose_points))
    files["non_holistic.pose"] = (_pose_bytes(openpose, data[..., :2], conf), "non_holistic")
    files["nan.pose"] = (
        _pose_bytes(header, np.full((9, 1, n, 3), np.nan), np.ones((9, 1, n))),
        "nan",
    )
    files["missing.pose"] = (None, "missing")

    out = {}
    for name, (content, kind) in files.items():
        path = directory / name
        if content is not None:
            path.write_bytes(content)
        out[path] = kind
    return out


# ---------------------------------------------------------------- hostile headers (issue 17)
def header_bytes(header: PoseHeader | None = None, version: float | None = None) -> bytes:
    """The bytes of a header (default: a MediaPipe Holistic one, 576 points), optionally with
    another format version written over the first 4 bytes."""
    buf = io.BytesIO()
    (header or holistic_header()).write(buf)
    data = buf.getvalue()
    return data if version is None else struct.pack("<f", version) + data[4:]


def points_header(points: int, version: float = 0.0, limbs: int = 0) -> bytes:
    """A header of one XYZC component with `points` unnamed points (2 bytes each)."""
    out = struct.pack("<f", version) + struct.pack("<HHH", 640, 480, 0) + struct.pack("<H", 1)
    out += struct.pack("<H", 4) + b"BODY" + struct.pack("<H", 4) + b"XYZC"
    out += struct.pack("<HHH", points, limbs, 0) + b"\0\0" * points + b"\0\0\0\0" * limbs
    return out


def empty_frames(frames: int) -> bytes:
    """A v0.0 body: fps 25, `frames` frames, each "0 people" (2 bytes)."""
    return struct.pack("<HH", 25, frames) + b"\0\0" * frames


def amplification(header: bytes | None = None, frames: int = 65_535) -> bytes:
    """The issue's reproduction: a real header marked v0.0, then 65,535 frames of 0 people."""
    return (header or header_bytes(version=0.0)) + empty_frames(frames)


def hostile_poses() -> dict[str, bytes]:
    """name -> bytes of every amplification case (each about 0.1-0.3 MB)."""
    many_limbs = b"".join(points_header(1, 0.2, 65_535)[12:] for _ in range(5))
    return {
        # 65,535 frames x 576 points of float64 zeros: about 3 GB
        "v00_65535_empty_frames": amplification(),
        # 65,535 points x 65,535 frames: about 128 GB (points limit)
        "v00_65535_points": amplification(points_header(65_535)),
        # under the frame and point limits, over the memory limit: 4,000 points x 16,000 frames
        "v00_alloc": amplification(points_header(4_000), 16_000),
        # v0.2 declaring 4 billion frames in a 20 KB file (frame limit, then byte length)
        "v02_frames": header_bytes(version=0.2) + struct.pack("<fIH", 25.0, 2**32 - 1, 1),
        # v0.2 declaring 65,535 people in a few bytes (cannot fit the byte length)
        "v02_people": header_bytes() + struct.pack("<fIH", 25.0, 10, 65_535) + b"\0" * 4000,
        # v0.1: zero people: pose-format would divide by 0
        "v01_no_people": header_bytes(version=0.1) + struct.pack("<HHH", 25, 10, 0),
        # a 1.3 MB header of limbs (header limit)
        "huge_header": struct.pack("<f", 0.2) + struct.pack("<HHHH", 640, 480, 0, 5) + many_limbs,
        # a v0.0 frame claiming 65,535 people in 2 bytes
        "v00_people": header_bytes(version=0.0) + struct.pack("<HHH", 25, 1, 65_535),
        # an unknown format version
        "v09": header_bytes(version=0.9) + struct.pack("<fIH", 25.0, 1, 1),
    }
