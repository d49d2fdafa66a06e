"""Video files -> `.pose` files (MediaPipe Holistic), through a separate video environment.

MediaPipe's legacy Holistic graph ships inside the mediapipe 0.10.21 wheel but needs numpy<2
and protobuf<5, which the main environment (numpy 2) cannot have. So it lives in its own
virtualenv (requirements-video.txt, package data beside this module) and this module, which
imports nothing from it, runs `video_worker.py` there as a subprocess: the video goes in as a
file, the `.pose` comes back as a file. The result is pose-format's standard holistic layout
(POSE_LANDMARKS 33, FACE_LANDMARKS 468 or 478, LEFT/RIGHT_HAND_LANDMARKS 21 each,
POSE_WORLD_LANDMARKS 33), which `signclip_jax.data.pose.load_features` reads into [T, 609]
features, T = the video's frames.

Set-up (once, about 1.1 GB, a minute or two):  python -m signclip_jax.video --setup
Use:  video_to_pose("a.mp4") -> bytes of the .pose file; the command line
      (python -m signclip_jax.video a.mp4 --out=a.pose) is signclip_jax/tools/video.py.

The video environment's python is, in this order: $SIGNCLIP_VIDEO_PYTHON; `.video-venv/` in the
repository checkout, when the package runs from one; `signclip-jax/video-venv/` in the user data
folder ($XDG_DATA_HOME or ~/.local/share). Every failure (no environment, undecodable video,
worker crash, timeout) raises a UserError that names the video.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signclip_jax import files
from signclip_jax.errors import UserError

ENV_VAR = "SIGNCLIP_VIDEO_PYTHON"
PROJECT = "signclip-jax"  # [project] name in pyproject.toml
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # signclip_jax/
REQUIREMENTS = Path(__file__).resolve().with_name("requirements-video.txt")  # package data
WORKER = Path(__file__).resolve().with_name("video_worker.py")
RESULT_PREFIX = "@@signclip-video "  # must match video_worker.RESULT_PREFIX
_EXIT_ENV = 3  # video_worker.EXIT_ENV: the environment lacks a package
DEFAULT_TIMEOUT = 600.0  # seconds per video; CPU Holistic runs at roughly 5-15 frames/s
MODEL_COMPLEXITIES = (0, 1, 2)  # only 1 ships in the wheel; 0 and 2 are downloaded on first use
_STDERR_TAIL = 1500  # characters of the worker's stderr quoted in an error


class VideoEnvError(UserError):
    """The video environment is missing or its python cannot run (as opposed to a bad video)."""


def checkout_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source checkout the package runs from (editable install or the repository itself),
    or None for an installed package: a checkout's package folder sits beside the project's
    own pyproject.toml, a site-packages folder has none."""
    try:
        meta = tomllib.loads((package_dir.parent / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return package_dir.parent if meta.get("project", {}).get("name") == PROJECT else None


CHECKOUT_ROOT = checkout_root()


def _user_venv() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "signclip-jax" / "video-venv"


def default_venv() -> Path:
    """Where --setup creates the environment: `.video-venv/` in a checkout, else the user folder."""
    return CHECKOUT_ROOT / ".video-venv" if CHECKOUT_ROOT is not None else _user_venv()


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _candidates() -> list[tuple[str, Path]]:
    if os.environ.get(ENV_VAR):  # an explicit choice is never silently replaced by another
        return [(f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser())]
    found = [("user", _venv_python(_user_venv()))]
    if CHECKOUT_ROOT is not None:
        found.insert(0, ("checkout", _venv_python(CHECKOUT_ROOT / ".video-venv")))
    return found


def video_python() -> str | None:
    """Path of the video environment's python, or None when it is not installed."""
    for _, path in _candidates():
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _missing_env_message(name: str) -> str:
    looked = ", ".join(f"{path}" for _, path in _candidates())
    if os.environ.get(ENV_VAR):
        where = f"{ENV_VAR}={os.environ[ENV_VAR]} is not an executable file"
    else:
        where = f"no video environment found (looked for {looked})"
    return (
        f"{name}: cannot turn a video into a pose: {where}. Install it with"
        " `python -m signclip_jax.video --setup` (MediaPipe in its own virtualenv, about"
        f" 1.1 GB), or set {ENV_VAR} to a python that has requirements-video.txt installed."
    )


def require_python(name: str) -> str:
    python = video_python()
    if python is None:
        raise VideoEnvError(_missing_env_message(name))
    return python


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(key, None)  # the main environment's packages (numpy 2) must not leak in
    env.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ INFO/WARNING lines
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    tail = "\n".join(lines[-8:])
    return tail[-_STDERR_TAIL:]


def run_worker(
    jobs: Sequence[tuple[str, str, str]],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    model_complexity: int = 1,
    refine_face_landmarks: bool = False,
) -> list[dict[str, Any]]:
    """Runs one worker process over (name, video path, .pose path) jobs.

    Returns one record per job, in order: the worker's stats (frames, fps, width, height,
    seconds, frames_per_second, hands, detected) with "name", or {"name", "error"} where that
    video failed. `timeout` is per video (the process gets timeout * len(jobs)).
    Raises VideoEnvError when the environment is missing or cannot start.
    """
    if model_complexity not in MODEL_COMPLEXITIES:
        raise UserError(
            f"model_complexity must be one of {MODEL_COMPLEXITIES}, got {model_complexity}"
        )
    if not jobs:
        return []
    names = [name for name, _, _ in jobs]
    python = require_python(names[0] if len(names) == 1 else ", ".join(names))
    cmd = [python, str(WORKER), f"--model_complexity={model_complexity}"]
    if refine_face_landmarks:
        cmd.append("--refine_face_landmarks")
    for _, src, dst in jobs:
        cmd += [src, dst]
    limit = None if timeout is None else float(timeout) * len(jobs)
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=limit,
            env=_worker_env(),
        )
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        stderr, code = None, None
        why = f"video -> pose timed out after {limit:g} s" + (
            f" ({timeout:g} s per video)" if len(jobs) > 1 else ""
        )
    except OSError as e:  # not executable, wrong architecture, vanished
        raise VideoEnvError(
            f"{names[0]}: cannot run the video environment's python {python}: {e}"
        ) from None

    # The worker prints one record per job, in job order, after the job's file is complete.
    reported = []
    for line in (stdout or "").splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                reported.append(json.loads(line[len(RESULT_PREFIX) :]))
            except json.JSONDecodeError:
                continue
    if code is not None:
        why = f"the video worker exited with status {code} without a result"
        if stderr and stderr.strip():
            why += f": {_tail(stderr)}"
    if code == _EXIT_ENV:
        raise VideoEnvError(
            f"{names[0]}: the video environment {python} is broken ({_tail(stderr or '')});"
            " reinstall it with `python -m signclip_jax.video --setup`"
        )
    out = []
    for i, (name, src, _) in enumerate(jobs):
        record = reported[i] if i < len(reported) else None
        if not isinstance(record, dict) or record.get("input") != src:
            record = {"error": why}
        record = {k: v for k, v in record.items() if k not in ("input", "output")}
        out.append({"name": name, **record})
    return out


def _video_error(name: str, record: dict[str, Any]) -> UserError:
    return UserError(f"{name}: cannot convert the video to a pose: {record['error']}")


def video_to_pose(
    video: str | os.PathLike | bytes,
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    model_complexity: int = 1,
    refine_face_landmarks: bool = False,
) -> bytes:
    """A video (path or the file's bytes) -> the bytes of its `.pose` file (MediaPipe Holistic).

    out: also write the .pose there (atomically). name: how errors call the video (default:
    the path, or "<video bytes>"). timeout: seconds before the worker is killed (None: no
    limit). model_complexity: Holistic's pose model (1 ships with mediapipe; 0 and 2 are
    downloaded on first use, so they need network access once). refine_face_landmarks: the
    478-point face mesh (with irises) instead of 468.
    Raises VideoEnvError (a UserError) when the video environment is missing, UserError when
    the video cannot be decoded or converted in time.
    """
    if isinstance(video, bytes | bytearray | memoryview):
        name = name or "<video bytes>"
        data: bytes | None = bytes(video)
        if not data:
            raise UserError(f"{name}: video is empty (0 bytes)")
        path = None
    else:
        path = Path(os.fspath(video))
        name = name or str(path)
        data = None
        if not path.is_file():
            raise UserError(f"{name}: video file not found")
    require_python(name)  # fail fast, before writing temporary files
    with tempfile.TemporaryDirectory(prefix="signclip-video-") as tmp:
        if data is not None:
            suffix = Path(name).suffix.lower() if files.is_video(name) else ".video"
            path = Path(tmp) / f"input{suffix}"
            path.write_bytes(data)
        pose_path = Path(tmp) / "output.pose"
        (record,) = run_worker(
            [(name, str(path), str(pose_path))],
            timeout=timeout,
            model_complexity=model_complexity,
            refine_face_landmarks=refine_face_landmarks,
        )
        if "error" in record:
            raise _video_error(name, record)
        result = pose_path.read_bytes()
    if out is not None:
        files.write_bytes_atomic(out, result)
    return result


def convert_videos(
    videos: Sequence[str | os.PathLike],
    outputs: Sequence[str | os.PathLike],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    model_complexity: int = 1,
    refine_face_landmarks: bool = False,
) -> list[dict[str, Any]]:
    """Converts each video to the matching output path with ONE worker process.

    Each output is written atomically (a temporary file beside it, then a rename), so a
    failure never leaves a partial .pose. Returns one record per video (see `run_worker`);
    failed videos have "error" and no file. Raises VideoEnvError when there is no environment.
    """
    if len(videos) != len(outputs):
        raise ValueError("videos and outputs differ in length")
    if not videos:
        return []
    require_python(str(videos[0]))
    outputs = [Path(o) for o in outputs]
    records: list[dict[str, Any] | None] = [None] * len(videos)
    jobs, tmp_dirs = [], []
    try:
        for i, (video, dst) in enumerate(zip(videos, outputs)):
            name = os.fspath(video)
            if not Path(name).is_file():
                records[i] = {"name": name, "error": "video file not found"}
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            # The worker writes inside the destination folder, so the final rename is atomic.
            tmp = tempfile.mkdtemp(dir=dst.parent, prefix=".signclip-video-")
            tmp_dirs.append(tmp)
            jobs.append((i, (name, name, str(Path(tmp) / "out.pose"))))
        done = run_worker(
            [job for _, job in jobs],
            timeout=timeout,
            model_complexity=model_complexity,
            refine_face_landmarks=refine_face_landmarks,
        )
        for (i, (_, _, tmp_pose)), record in zip(jobs, done):
            if "error" not in record:
                if Path(tmp_pose).is_file() and Path(tmp_pose).stat().st_size > 0:
                    os.replace(tmp_pose, outputs[i])
                    record["output"] = str(outputs[i])
                else:
                    record = {"name": record["name"], "error": "the worker wrote no .pose file"}
            records[i] = record
    finally:
        for tmp in tmp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)
    return [r for r in records if r is not None]


def setup_video_env(
    venv: str | os.PathLike | None = None,
    *,
    requirements: str | os.PathLike | None = None,
    base_python: str | None = None,
) -> str:
    """Creates the video virtualenv and pip-installs requirements-video.txt into it.

    venv: default `default_venv()`. base_python: the interpreter to build it from (default
    this one; mediapipe 0.10.21 has wheels for CPython 3.9-3.12). Returns the env's python.
    pip's output goes to the terminal. Reruns are harmless (pip keeps what is installed).
    """
    venv = Path(venv) if venv else default_venv()
    requirements = Path(requirements) if requirements else REQUIREMENTS
    if not requirements.is_file():
        raise UserError(
            f"{requirements}: requirements file not found (it ships in the signclip_jax"
            " package as data/requirements-video.txt; pass --requirements=PATH)"
        )
    base = base_python or sys.executable
    if base_python is None and not (3, 9) <= sys.version_info[:2] <= (3, 12):
        raise UserError(
            f"python {sys.version.split()[0]} has no mediapipe 0.10.21 wheels; pass"
            " --base_python=PATH of a CPython 3.9-3.12"
        )
    python = _venv_python(venv)
    steps = []
    if not python.is_file():
        steps.append([base, "-m", "venv", str(venv)])
    steps.append([str(python), "-m", "pip", "install", "-r", str(requirements)])
    for cmd in steps:
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        try:
            code = subprocess.run(cmd, env=_worker_env()).returncode
        except OSError as e:
            raise UserError(f"cannot run {cmd[0]}: {e}") from None
        if code:
            raise UserError(f"video environment set-up failed: `{' '.join(cmd)}` exited {code}")
    info = check_env(str(python))
    print(f"video environment ready: {python}\n  {json.dumps(info)}", file=sys.stderr)
    if video_python() != str(python):
        print(f"  (not a default location: export {ENV_VAR}={python})", file=sys.stderr)
    return str(python)


def check_env(python: str | None = None, *, timeout: float = 120.0) -> dict[str, Any]:
    """Runs the worker's --check in the video env: versions and shipped pose models."""
    python = python or require_python("video environment check")
    try:
        proc = subprocess.run(
            [python, str(WORKER), "--check"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_worker_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VideoEnvError(f"video environment {python} does not run: {e}") from None
    for line in proc.stdout.splitlines():
        if proc.returncode == 0 and line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise VideoEnvError(
        f"video environment {python} is broken (exit {proc.returncode}): {_tail(proc.stderr)}"
    )
