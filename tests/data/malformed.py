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
"""

from __future__ import annotations

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
