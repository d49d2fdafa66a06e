"""Video -> pose (signclip_jax.video).

Most tests replace the video environment's python with a fake (a script that answers the worker
protocol), so they run without MediaPipe. The `real_env` tests run the actual worker in the
video environment and skip when it is not installed (python -m signclip_jax.video --setup, or
SIGNCLIP_VIDEO_PYTHON).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from pose_format import Pose

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import synthetic
from signclip_jax.errors import DataError, UserError
from signclip_jax.tools import video

FAKE_WORKER = r"""
import json, os, shutil, sys, time
PREFIX = "@@signclip-video "
worker, args = sys.argv[1], sys.argv[2:]
flags = [a for a in args if a.startswith("--")]
pairs = [a for a in args if not a.startswith("--")]
mode = os.environ["FAKE_VIDEO_MODE"]
with open(os.environ["FAKE_VIDEO_LOG"], "w") as f:
    json.dump({"worker": worker, "flags": flags, "pairs": pairs,
               "pythonpath": os.environ.get("PYTHONPATH")}, f)
if mode == "sleep":
    time.sleep(60)
if mode == "broken":
    sys.stderr.write("video environment incomplete: ModuleNotFoundError: No module named 'cv2'\n")
    sys.exit(3)
if mode == "crash":  # a partial file, then death without a result line
    with open(pairs[1], "wb") as f:
        f.write(b"partial")
    sys.stderr.write("Fatal Python error: Segmentation fault\n")
    sys.exit(139)
code = 0
for src, dst in zip(pairs[::2], pairs[1::2]):
    if mode == "ok" or (mode == "mixed" and "bad" not in os.path.basename(src)):
        shutil.copyfile(os.environ["FAKE_VIDEO_POSE"], dst)
        print(PREFIX + json.dumps({"input": src, "output": dst, "frames": 3, "fps": 25.0,
              "width": 64, "height": 48, "seconds": 0.1, "frames_per_second": 30.0,
              "hands": 1.0}))
    else:
        print(PREFIX + json.dumps({"input": src, "error": "no frame could be decoded"}))
        code = 1
sys.exit(code)
"""


@pytest.fixture
def fake_pose(tmp_path) -> Path:
    """A generated holistic .pose file (what the fake worker hands back)."""
    data, conf = synthetic.random_clip(3, min_frames=12, max_frames=12)
    path = tmp_path / "fake.pose"
    path.write_bytes(synthetic.pose_bytes(synthetic.holistic_header(), data, conf, fps=25.0))
    return path


@pytest.fixture
def fake_env(tmp_path, monkeypatch, fake_pose):
    """Points SIGNCLIP_VIDEO_PYTHON at a fake; returns set_mode(mode) -> path of its call log."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "fake.log"
    monkeypatch.setenv(video.ENV_VAR, str(python))
    monkeypatch.setenv("FAKE_VIDEO_LOG", str(log))
    monkeypatch.setenv("FAKE_VIDEO_POSE", str(fake_pose))

    def set_mode(mode: str) -> Path:
        monkeypatch.setenv("FAKE_VIDEO_MODE", mode)
        return log

    set_mode("ok")
    return set_mode


def _touch(path: Path, data: bytes = b"not really a video") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- no MediaPipe
def test_video_python_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(video.ENV_VAR, raising=False)
    monkeypatch.setattr(video, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert video.video_python() is None

    def make(path: Path) -> Path:
        _touch(path, b"#!/bin/sh\n").chmod(0o755)
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


def test_missing_env_is_a_user_error_naming_the_video(tmp_path, monkeypatch):
    monkeypatch.setenv(video.ENV_VAR, str(tmp_path / "no-such-python"))
    clip = _touch(tmp_path / "hello.mp4")
    with pytest.raises(video.VideoEnvError, match=r"hello\.mp4.*SIGNCLIP_VIDEO_PYTHON.*--setup"):
        video.video_to_pose(clip)
    with pytest.raises(video.VideoEnvError, match=r"upload\.webm"):
        video.video_to_pose(b"\x00\x01", name="upload.webm")
    assert issubclass(video.VideoEnvError, UserError)
    monkeypatch.delenv(video.ENV_VAR)
    monkeypatch.setattr(video, "REPO_ROOT", tmp_path / "repo")
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
    clip = _touch(tmp_path / "sign.mp4")
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
        video.video_to_pose(_touch(tmp_path / "a.mp4"), model_complexity=3)


def test_worker_failure_names_the_video(tmp_path, fake_env):
    fake_env("fail")
    with pytest.raises(UserError, match=r"broken\.mp4: cannot convert.*no frame could be decoded"):
        video.video_to_pose(_touch(tmp_path / "broken.mp4"))


def test_worker_crash_names_the_video_and_keeps_old_output(tmp_path, fake_env):
    fake_env("crash")
    out = _touch(tmp_path / "out" / "sign.pose", b"old pose")
    with pytest.raises(UserError, match=r"sign\.mp4: .*status 139.*Segmentation fault"):
        video.video_to_pose(_touch(tmp_path / "sign.mp4"), out=out)
    assert out.read_bytes() == b"old pose"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sign.pose"]


def test_broken_env_is_an_env_error(tmp_path, fake_env):
    fake_env("broken")
    with pytest.raises(video.VideoEnvError, match=r"sign\.mp4: the video environment .* broken"):
        video.video_to_pose(_touch(tmp_path / "sign.mp4"))


def test_real_worker_in_an_env_without_mediapipe(tmp_path, monkeypatch):
    """The actual worker script, run by this (main) python, which lacks cv2 and mediapipe."""
    monkeypatch.setenv(video.ENV_VAR, sys.executable)
    with pytest.raises(video.VideoEnvError, match=r"sign\.mp4: .* broken.*No module named"):
        video.video_to_pose(_touch(tmp_path / "sign.mp4"))
    with pytest.raises(video.VideoEnvError, match="broken"):
        video.check_env(sys.executable)


def test_timeout_names_the_video_and_kills_the_worker(tmp_path, fake_env):
    fake_env("sleep")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"slow\.mp4: .*timed out after 0\.5 s"):
        video.video_to_pose(_touch(tmp_path / "slow.mp4"), timeout=0.5)
    assert time.perf_counter() - start < 20


def test_out_is_written_atomically(tmp_path, fake_env, fake_pose):
    out = _touch(tmp_path / "out" / "sign.pose", b"old pose")
    data = video.video_to_pose(_touch(tmp_path / "sign.mp4"), out=out)
    assert out.read_bytes() == data == fake_pose.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sign.pose"]


def test_cli_out_dir_converts_what_it_can(tmp_path, fake_env, fake_pose, capsys):
    fake_env("mixed")
    good = _touch(tmp_path / "in" / "good.mp4")
    bad = _touch(tmp_path / "in" / "bad.mov")
    missing = tmp_path / "in" / "gone.mp4"
    old = _touch(tmp_path / "out" / "bad.pose", b"old")
    code = video.main([str(good), str(bad), str(missing), f"--out_dir={tmp_path / 'out'}"])
    assert code == 1
    assert (tmp_path / "out" / "good.pose").read_bytes() == fake_pose.read_bytes()
    assert old.read_bytes() == b"old"  # a failed conversion does not touch an existing file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad.pose", "good.pose"]
    err = capsys.readouterr().err
    assert f"{bad}: no frame could be decoded" in err
    assert f"{missing}: video file not found" in err
    fake_env("ok")
    assert video.main([str(good), f"--out={tmp_path / 'one.pose'}"]) == 0
    assert (tmp_path / "one.pose").read_bytes() == fake_pose.read_bytes()
    assert "good.mp4 -> " in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, fake_env):
    a, b = _touch(tmp_path / "a.mp4"), _touch(tmp_path / "x" / "a.mp4")
    with pytest.raises(UserError, match="exactly one of --out"):
        video.main([str(a)])
    with pytest.raises(UserError, match="--out takes one video"):
        video.main([str(a), str(b), "--out=x.pose"])
    with pytest.raises(UserError, match="both be written"):
        video.main([str(a), str(b), f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match="no video given"):
        video.main([])


def test_cli_exit_code_and_message(tmp_path, monkeypatch):
    """`python -m signclip_jax.video` without an environment: one line on stderr, exit 2."""
    env = {**os.environ, video.ENV_VAR: str(tmp_path / "none")}
    proc = subprocess.run(
        [sys.executable, "-m", "signclip_jax.video", "a.mp4", "--out=a.pose"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(video.__file__).parents[2],
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: a.mp4: cannot turn a video into a pose")
    assert "Traceback" not in proc.stderr


def test_setup_needs_a_requirements_file(tmp_path):
    with pytest.raises(UserError, match="requirements file not found"):
        video.setup_video_env(tmp_path / "venv", requirements=tmp_path / "none.txt")
    assert not (tmp_path / "venv").exists()


def test_requirements_pin_the_video_stack():
    """requirements-video.txt pins mediapipe with the legacy Holistic graph and numpy<2."""
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
    import av

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
    clip = _touch(tmp_path / "fake.mp4", b"this is not an mp4 file\n" * 50)
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
