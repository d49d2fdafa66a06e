"""Video files -> `.pose` files with MediaPipe Holistic. Runs in the VIDEO virtualenv.

This script is not imported by signclip_jax: `signclip_jax.video` runs it by file path with the
video environment's python (requirements-video.txt: mediapipe 0.10.21, numpy<2, OpenCV,
pose-format), because the legacy Holistic graph needs numpy<2 and protobuf<5, which the main
environment cannot have. It must therefore import nothing from signclip_jax.

  python video_worker.py [--model_complexity=1] [--refine_face_landmarks] IN OUT [IN OUT ...]
  python video_worker.py --check

Each IN is decoded with OpenCV (display rotation applied, BGR -> RGB), every frame goes
through one fresh Holistic graph (static_image_mode=False, i.e. tracking, as pose-format's
`video_to_pose` does) and pose-format's `load_holistic` writes the standard holistic layout
to OUT: POSE_LANDMARKS 33, FACE_LANDMARKS 468 (478 with --refine_face_landmarks),
LEFT_HAND_LANDMARKS 21, RIGHT_HAND_LANDMARKS 21, POSE_WORLD_LANDMARKS 33; XYZC, one person,
pixel x/y, fps and size of the video.

Protocol: one line per video on stdout, `RESULT_PREFIX` + JSON ({"input", "output", "frames",
"fps", "width", "height", "seconds", "hands", ...} or {"input", "error"}); other output
(MediaPipe's logging) goes to stderr. Exit status: 0 all converted, 1 some failed, 2 bad usage,
3 the environment lacks a package (nothing was tried).
"""

from __future__ import annotations

import os
import sys

# `python path/to/video_worker.py` puts the script's folder (signclip_jax/data/) first on
# sys.path; its modules (pose.py, text.py, ...) must not shadow what the video env imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

# The video stack (cv2, mediapipe, numpy<2, pose_format) is imported where it is used:
# `_require_packages` turns a missing one into exit status EXIT_ENV before any video is tried.

RESULT_PREFIX = "@@signclip-video "
EXIT_ENV = 3  # a package of requirements-video.txt is missing or broken
DEFAULT_FPS = 30.0  # used only when the container states no usable frame rate
_POSE_MODELS = {0: "pose_landmark_lite.tflite", 1: "pose_landmark_full.tflite",
                2: "pose_landmark_heavy.tflite"}  # fmt: skip


class VideoError(Exception):
    """A video that cannot be converted; the message says why."""


def _emit(record: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def _check_model(model_complexity: int) -> None:
    """The wheel ships only the `full` pose model; the others are downloaded on first use."""
    import mediapipe

    path = os.path.join(
        os.path.dirname(mediapipe.__file__),
        "modules",
        "pose_landmark",
        _POSE_MODELS[model_complexity],
    )
    if not os.path.exists(path) and model_complexity != 1:
        # MediaPipe fetches it from storage.googleapis.com inside Holistic(); say so if that fails.
        try:
            from mediapipe.python.solutions import download_utils

            download_utils.download_oss_model(
                f"mediapipe/modules/pose_landmark/{_POSE_MODELS[model_complexity]}"
            )
        except Exception as e:
            raise VideoError(
                f"model_complexity={model_complexity} needs {_POSE_MODELS[model_complexity]}, which"
                f" the mediapipe wheel does not ship and the download failed ({e});"
                " use model_complexity=1 (shipped) or run once with network access"
            ) from None


def _frames(capture, first):
    """First frame, then the rest of the capture, as contiguous RGB uint8 [H, W, 3] arrays."""
    import cv2

    frame = first
    while frame is not None:
        yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        ok, frame = capture.read()
        if not ok:
            frame = None


def convert(src: str, dst: str, *, model_complexity: int, refine_face_landmarks: bool) -> dict:
    """Decodes `src`, runs Holistic on every frame, writes the .pose to `dst`; returns stats."""
    import cv2
    import numpy as np
    from pose_format.utils.holistic import load_holistic

    if not os.path.isfile(src):
        raise VideoError("video file not found")
    capture = cv2.VideoCapture(src)
    try:
        if not capture.isOpened():
            raise VideoError("OpenCV cannot open it as a video (unknown container or codec)")
        capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)  # phone videos: apply the rotation tag
        ok, first = capture.read()
        if not ok or first is None:
            raise VideoError("no frame could be decoded (not a video, or an empty/corrupt one)")
        height, width = first.shape[:2]
        fps = capture.get(cv2.CAP_PROP_FPS)
        warnings = []
        if not (math.isfinite(fps) and 0 < fps < 1000):
            warnings.append(f"frame rate unknown ({fps}); assumed {DEFAULT_FPS}")
            fps = DEFAULT_FPS
        config = {
            "static_image_mode": False,
            "model_complexity": model_complexity,
            "refine_face_landmarks": refine_face_landmarks,
        }
        start, cpu_start = time.perf_counter(), time.process_time()
        # A generator keeps one decoded frame in memory at a time; reuse=False gives every
        # video a fresh graph, so a file's result does not depend on what ran before it.
        pose = load_holistic(
            _frames(capture, first),
            fps=float(fps),
            width=int(width),
            height=int(height),
            additional_holistic_config=config,
            pose_workers=1,
            reuse=False,
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start  # all threads; wall time varies with load
    finally:
        capture.release()

    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pose.write(f)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    # Per-frame detection rates, from the confidences load_holistic wrote (0 = not detected).
    conf = np.asarray(pose.body.confidence)[:, 0]  # [T, points]
    seen, start = {}, 0
    for component in pose.header.components:
        end = start + len(component.points)
        seen[component.name] = (conf[:, start:end] > 0).any(axis=1)  # [T] bool
        start = end
    no_hand = np.zeros(conf.shape[0], dtype=bool)
    hands = seen.get("LEFT_HAND_LANDMARKS", no_hand) | seen.get("RIGHT_HAND_LANDMARKS", no_hand)
    frames = int(conf.shape[0])
    return {
        "frames": frames,
        "fps": float(fps),
        "width": int(width),
        "height": int(height),
        "points": int(pose.header.total_points()),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "frames_per_second": round(frames / seconds, 2) if seconds > 0 else None,
        "hands": float(hands.mean()),
        "detected": {name: float(v.mean()) for name, v in seen.items()},
        "warnings": warnings,
    }


def check() -> dict:
    """Versions and the shipped Holistic model files, to verify the environment."""
    import cv2
    import mediapipe
    import numpy
    from pose_format.utils.holistic import load_holistic  # noqa: F401  (needs mp.solutions)

    modules = os.path.join(os.path.dirname(mediapipe.__file__), "modules")
    return {
        "python": sys.version.split()[0],
        "mediapipe": mediapipe.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "pose_format": version("pose-format"),
        "pose_models": sorted(
            m
            for m in _POSE_MODELS.values()
            if os.path.exists(os.path.join(modules, "pose_landmark", m))
        ),
    }


def _require_packages() -> None:
    """Imports what the conversion needs; a failure is the environment's, not a video's."""
    try:
        import cv2  # noqa: F401
        import mediapipe  # noqa: F401
        import numpy  # noqa: F401
        from pose_format.utils.holistic import load_holistic  # noqa: F401
    except Exception as e:
        sys.stderr.write(
            f"video environment incomplete ({sys.executable}): {type(e).__name__}: {e}\n"
        )
        sys.exit(EXIT_ENV)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pairs", nargs="*", metavar="IN OUT", help="video file, then .pose file")
    p.add_argument("--model_complexity", type=int, choices=(0, 1, 2), default=1)
    p.add_argument("--refine_face_landmarks", action="store_true")
    p.add_argument("--check", action="store_true", help="print the environment and exit")
    args = p.parse_args(argv)
    _require_packages()
    if args.check:
        _emit(check())
        return 0
    if not args.pairs or len(args.pairs) % 2:
        p.error("expected INPUT OUTPUT pairs")
    try:
        _check_model(args.model_complexity)
    except VideoError as e:
        for src in args.pairs[::2]:
            _emit({"input": src, "error": str(e)})
        return 1
    failed = 0
    for src, dst in zip(args.pairs[::2], args.pairs[1::2]):
        try:
            stats = convert(
                src,
                dst,
                model_complexity=args.model_complexity,
                refine_face_landmarks=args.refine_face_landmarks,
            )
            _emit({"input": src, "output": dst, **stats})
        except VideoError as e:
            failed += 1
            _emit({"input": src, "error": str(e)})
        except Exception as e:  # MediaPipe / OpenCV / pose-format failures: report, go on
            failed += 1
            _emit({"input": src, "error": f"{type(e).__name__}: {e}"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
