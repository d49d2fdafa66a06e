"""Video -> pose, the library (signclip_jax/data/video.py). CLI: tests/tools/test_video.py.

Most tests replace the video environment's python with a fake (a script that answers the worker
protocol), so they run without MediaPipe. The `real_env` tests run the actual worker in the
video environment and skip when it is not installed (python -m signclip_jax.video --setup, or
SIGNCLIP_VIDEO_PYTHON).
"""

from __future__ import annotations

import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from pose_format import Pose

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import video
from signclip_jax.errors import DataError, UserError
from tests.helpers import touch


# ----------------------------------------------------------------------------- no MediaPipe
def test_video_python_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(video.ENV_VAR, raising=False)
    monkeypatch.setattr(video, "CHECKOUT_ROOT", tmp_path / "repo")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert video.video_python() is None

    def make(path: Path) -> Path:
        touch(path, b"#!/bin/sh\n").chmod(0o755)
        return path

    user = make(tmp_path / "data" / "signclip-jax" / "video-venv" / "bin" / "python")
    assert video.video_python() == str(user)
    checkout = make(tmp_path / "repo" / ".video-venv" / "bin" / "python")
    assert video.video_python() == str(checkout)  # the checkout's env wins
    explicit = make(tmp_path / "elsewhere" / "python")
    monkeypatch.setenv(video.ENV_VAR, str(explicit))
    assert video.video_python() == str(explicit)
    # An explicit setting that is wrong is not silently replaced by another environment.
    monkeypatch.setenv(video.ENV_VAR, str(tmp_path / "missing" / "python"))
    assert video.video_python() is None
    # An installed package (no checkout): the checkout's env is not looked for.
    monkeypatch.delenv(video.ENV_VAR)
    monkeypatch.setattr(video, "CHECKOUT_ROOT", None)
    assert video.video_python() == str(user)
    assert video.default_venv() == tmp_path / "data" / "signclip-jax" / "video-venv"
    monkeypatch.setattr(video, "CHECKOUT_ROOT", tmp_path / "repo")
    assert video.default_venv() == tmp_path / "repo" / ".video-venv"


def test_checkout_is_told_apart_from_an_installed_package(tmp_path):
    # This test runs from the checkout: the package sits beside the project's pyproject.toml.
    root = Path(video.__file__).resolve().parents[2]
    assert video.CHECKOUT_ROOT == root and (root / "pyproject.toml").is_file()
    # site-packages: no pyproject.toml beside the package.
    site = tmp_path / "site-packages" / "signclip_jax"
    site.mkdir(parents=True)
    assert video.checkout_root(site) is None
    # Another project's tree, or a broken pyproject.toml, is no checkout of this one.
    (site.parent / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert video.checkout_root(site) is None
    (site.parent / "pyproject.toml").write_text("[project\n")
    assert video.checkout_root(site) is None
    (site.parent / "pyproject.toml").write_text('[project]\nname = "signclip-jax"\n')
    assert video.checkout_root(site) == site.parent


def test_missing_env_is_a_user_error_naming_the_video(tmp_path, monkeypatch):
    monkeypatch.setenv(video.ENV_VAR, str(tmp_path / "no-such-python"))
    clip = touch(tmp_path / "hello.mp4")
    with pytest.raises(video.VideoEnvError, match=r"hello\.mp4.*SIGNCLIP_VIDEO_PYTHON.*--setup"):
        video.video_to_pose(clip)
    with pytest.raises(video.VideoEnvError, match=r"upload\.webm"):
        video.video_to_pose(b"\x00\x01", name="upload.webm")
    assert issubclass(video.VideoEnvError, UserError)
    monkeypatch.delenv(video.ENV_VAR)
    monkeypatch.setattr(video, "CHECKOUT_ROOT", tmp_path / "repo")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    with pytest.raises(video.VideoEnvError, match=r"hello\.mp4.*no video environment found"):
        video.video_to_pose(clip)


def test_missing_or_empty_video(tmp_path, fake_env):
    with pytest.raises(UserError, match=r"nothere\.mp4: video file not found"):
        video.video_to_pose(tmp_path / "nothere.mp4")
    with pytest.raises(UserError, match=r"<video bytes>: video is empty"):
        video.video_to_pose(b"")


def test_video_to_pose_returns_the_workers_pose(tmp_path, fake_env, fake_pose, monkeypatch):
    log = fake_env("ok")
    monkeypatch.setenv("PYTHONPATH", "/main/env/site-packages")
    clip = touch(tmp_path / "sign.mp4")
    out = video.video_to_pose(clip, refine_face_landmarks=True, model_complexity=0)
    assert out == fake_pose.read_bytes()
    features = pose_lib.load_features(out)
    assert features.shape == (12, 609) and np.isfinite(features).all()
    call = json.loads(log.read_text())
    assert call["worker"] == str(video.WORKER) and Path(call["worker"]).is_file()
    assert call["flags"] == ["--model_complexity=0", "--refine_face_landmarks"]
    assert call["pairs"][0] == str(clip)
    assert call["pythonpath"] is None  # the main env's packages do not leak into the worker


def test_video_bytes_keep_their_suffix(fake_env, fake_pose):
    log = fake_env("ok")
    assert video.video_to_pose(b"\x00video", name="upload.MOV") == fake_pose.read_bytes()
    src = json.loads(log.read_text())["pairs"][0]
    assert src.endswith(".mov") and not Path(src).exists()  # temporary input, removed


def test_bad_model_complexity(tmp_path, fake_env):
    with pytest.raises(UserError, match="model_complexity"):
        video.video_to_pose(touch(tmp_path / "a.mp4"), model_complexity=3)


def test_worker_failure_names_the_video(tmp_path, fake_env):
    fake_env("fail")
    with pytest.raises(UserError, match=r"broken\.mp4: cannot convert.*no frame could be decoded"):
        video.video_to_pose(touch(tmp_path / "broken.mp4"))


def test_worker_crash_names_the_video_and_keeps_old_output(tmp_path, fake_env):
    fake_env("crash")
    out = touch(tmp_path / "out" / "sign.pose", b"old pose")
    with pytest.raises(UserError, match=r"sign\.mp4: .*status 139.*Segmentation fault"):
        video.video_to_pose(touch(tmp_path / "sign.mp4"), out=out)
    assert out.read_bytes() == b"old pose"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sign.pose"]


def test_broken_env_is_an_env_error(tmp_path, fake_env):
    fake_env("broken")
    with pytest.raises(video.VideoEnvError, match=r"sign\.mp4: the video environment .* broken"):
        video.video_to_pose(touch(tmp_path / "sign.mp4"))


def test_real_worker_in_an_env_without_mediapipe(tmp_path, monkeypatch):
    """The actual worker script, run by this (main) python, which lacks cv2 and mediapipe."""
    monkeypatch.setenv(video.ENV_VAR, sys.executable)
    with pytest.raises(video.VideoEnvError, match=r"sign\.mp4: .* broken.*No module named"):
        video.video_to_pose(touch(tmp_path / "sign.mp4"))
    with pytest.raises(video.VideoEnvError, match="broken"):
        video.check_env(sys.executable)


def test_timeout_names_the_video_and_kills_the_worker(tmp_path, fake_env):
    fake_env("sleep")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"slow\.mp4: .*timed out after 0\.5 s"):
        video.video_to_pose(touch(tmp_path / "slow.mp4"), timeout=0.5)
    assert time.perf_counter() - start < 20


def test_out_is_written_atomically(tmp_path, fake_env, fake_pose):
    out = touch(tmp_path / "out" / "sign.pose", b"old pose")
    data = video.video_to_pose(touch(tmp_path / "sign.mp4"), out=out)
    assert out.read_bytes() == data == fake_pose.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sign.pose"]


def test_setup_needs_a_requirements_file(tmp_path):
    with pytest.raises(UserError, match="requirements file not found"):
        video.setup_video_env(tmp_path / "venv", requirements=tmp_path / "none.txt")
    assert not (tmp_path / "venv").exists()


def test_requirements_pin_the_video_stack():
    """requirements-video.txt (package data, so an installed package finds it too) pins
    mediapipe with the legacy Holistic graph and numpy<2."""
    assert video.REQUIREMENTS == Path(video.__file__).resolve().with_name("requirements-video.txt")
    text = video.REQUIREMENTS.read_text()
    pins = dict(
        line.split("==", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert pins["mediapipe"] == "0.10.21"
    assert pins["numpy"].startswith("1.")
    assert pins["pose-format"] == "0.15.0"
    assert "opencv-contrib-python" in pins and "protobuf" in pins


# ------------------------------------------------------------------------- the video env
def _real_python() -> str:
    python = video.video_python()
    if python is None:
        pytest.skip(
            "video environment not installed (python -m signclip_jax.video --setup, or set"
            f" {video.ENV_VAR}); video -> pose tests with MediaPipe skipped"
        )
    return python


def _write_test_video(path: Path, frames: int, fps: int, size: tuple[int, int]) -> Path:
    """A small generated MPEG-4 video (a moving bar, no person) written with PyAV."""
    import av  # PyAV (pose-format's, not pinned here): only the real-env tests need it

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 240, np.uint8)
            img[:, (7 * i) % width : (7 * i) % width + 12] = (200, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decoded_frames(path: Path) -> tuple[int, float, int, int]:
    """Frame count, fps, width, height as PyAV (in this env, not the worker's) decodes them."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
        return n, float(stream.average_rate), stream.width, stream.height


def _components(pose: Pose) -> list[tuple[str, int, str]]:
    return [(c.name, len(c.points), c.format) for c in pose.header.components]


def _holistic(face: int) -> list[tuple[str, int, str]]:
    return [
        ("POSE_LANDMARKS", 33, "XYZC"),
        ("FACE_LANDMARKS", face, "XYZC"),
        ("LEFT_HAND_LANDMARKS", 21, "XYZC"),
        ("RIGHT_HAND_LANDMARKS", 21, "XYZC"),
        ("POSE_WORLD_LANDMARKS", 33, "XYZC"),
    ]


def test_real_env_check():
    info = video.check_env(_real_python())
    assert info["mediapipe"] == "0.10.21" and info["numpy"].startswith("1.")
    assert "pose_landmark_full.tflite" in info["pose_models"]


@pytest.mark.parametrize("refine", [False, True])
def test_real_generated_video(tmp_path, refine):
    """A generated video: one frame of pose per video frame, the standard holistic layout."""
    _real_python()
    clip = _write_test_video(tmp_path / "bar.mp4", frames=9, fps=25, size=(96, 64))
    n, fps, width, height = _decoded_frames(clip)
    out = tmp_path / "bar.pose"
    data = video.video_to_pose(clip, out=out, refine_face_landmarks=refine)
    assert out.read_bytes() == data
    pose = Pose.read(data)
    assert _components(pose) == _holistic(478 if refine else 468)
    by_name = {c.name: c.points for c in pose.header.components}
    assert tuple(by_name["POSE_LANDMARKS"]) == pose_lib.BODY_POINTS
    assert tuple(by_name["RIGHT_HAND_LANDMARKS"]) == pose_lib.HAND_POINTS
    assert tuple(by_name["POSE_WORLD_LANDMARKS"]) == pose_lib.BODY_POINTS
    assert pose.body.data.shape == (n, 1, 576 + (10 if refine else 0), 3) and n == 9
    assert pose.body.fps == pytest.approx(fps) and fps == 25
    assert (pose.header.dimensions.width, pose.header.dimensions.height) == (width, height)
    # Nobody in the picture: nothing detected, and our reader says so instead of inventing data.
    assert not np.asarray(pose.body.confidence).any()
    with pytest.raises(DataError, match="no landmark is observed"):
        pose_lib.load_features(data, name="bar.pose")


def test_real_undecodable_video(tmp_path):
    _real_python()
    clip = touch(tmp_path / "fake.mp4", b"this is not an mp4 file\n" * 50)
    with pytest.raises(UserError, match=r"fake\.mp4: cannot convert.*(open|decode)"):
        video.video_to_pose(clip)


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_sign_videos(tmp_path, shared_data):
    """Both real sign videos -> .pose -> [T, 609] features, T = the video's frame count."""
    _real_python()
    clips = sorted((shared_data / "videos").glob("*.mp4"))
    if not clips:
        pytest.skip(f"no videos in {shared_data / 'videos'}")
    outs = [tmp_path / f"{c.stem}.pose" for c in clips]
    start = time.perf_counter()
    records = video.convert_videos(clips, outs)
    wall = time.perf_counter() - start
    for clip, out, record in zip(clips, outs, records):
        assert "error" not in record, record
        n, fps, width, height = _decoded_frames(clip)
        pose = Pose.read(out.read_bytes())
        assert _components(pose) == _holistic(468)
        assert pose.body.fps == pytest.approx(fps, rel=1e-6)
        assert (pose.header.dimensions.width, pose.header.dimensions.height) == (width, height)
        features = pose_lib.load_features(out, pose_lib.PoseSpec(max_frames=0))
        assert features.shape == (n, 609) and record["frames"] == n
        assert np.isfinite(features).all() and np.abs(features).max() > 0.1
        conf = np.asarray(pose.body.confidence)[:, 0]
        body = conf[:, :33] > 0
        hands = (conf[:, 33 + 468 : 33 + 468 + 42] > 0).any(axis=1)
        assert body.any(axis=1).all(), f"{clip.name}: body missed in some frames"
        assert hands.mean() >= 0.8, f"{clip.name}: hands in only {hands.mean():.0%} of frames"
        # Landmarks lie inside the picture (pixel coordinates of this video).
        xy = np.asarray(pose.body.data)[:, 0, :33, :2][body]
        assert (xy[:, 0] > -0.1 * width).all() and (xy[:, 0] < 1.1 * width).all()
        print(
            f"{clip.name}: {n} frames {width}x{height}, {record['seconds']:.2f} s in Holistic"
            f" ({record['frames_per_second']} frames/s wall, {record.get('cpu_seconds')} s CPU),"
            f" hands {hands.mean():.0%}"
        )
    print(f"both videos incl. worker start-up: {wall:.1f} s")
    # Deterministic, and independent of what the worker converted before (fresh graph each):
    # the last video again, alone and passed as bytes, gives the identical file.
    again = video.video_to_pose(clips[-1].read_bytes(), name=clips[-1].name)
    assert again == outs[-1].read_bytes()
