"""`python -m signclip_jax.video`: videos -> `.pose` files, and --setup / --check of the video
environment. The conversion itself is signclip_jax/data/video.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signclip_jax import cli
from signclip_jax.data.video import (
    DEFAULT_TIMEOUT,
    MODEL_COMPLEXITIES,
    check_env,
    convert_videos,
    require_python,
    setup_video_env,
)
from signclip_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.video",
        description=(
            "Convert videos to .pose files (MediaPipe Holistic, pose-format's holistic layout)"
            " in the optional video environment; --setup installs that environment."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="VIDEO", help="video files")
    p.add_argument("--out_dir", help="write DIR/<video name>.pose for every input")
    p.add_argument("--out", help="output .pose path (one input only)")
    p.add_argument(
        "--model_complexity",
        type=int,
        choices=MODEL_COMPLEXITIES,
        default=1,
        help="Holistic pose model (only 1 ships with mediapipe; 0 and 2 are downloaded)",
    )
    p.add_argument(
        "--refine_face_landmarks",
        action="store_true",
        help="478-point face mesh with irises (default 468)",
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per video")
    p.add_argument("--setup", action="store_true", help="create the video environment and exit")
    p.add_argument(
        "--venv",
        help="folder for --setup (default: .video-venv in a checkout, else the user data folder)",
    )
    p.add_argument("--requirements", help="requirements file for --setup")
    p.add_argument("--base_python", help="interpreter --setup builds the venv from")
    p.add_argument("--check", action="store_true", help="print the video environment and exit")
    return p


def _outputs(args: argparse.Namespace) -> list[Path]:
    if bool(args.out) == bool(args.out_dir):
        raise UserError("give exactly one of --out (one video) and --out_dir")
    if args.out:
        if len(args.inputs) != 1:
            raise UserError(f"--out takes one video, got {len(args.inputs)}; use --out_dir")
        return [Path(args.out)]
    outs = [Path(args.out_dir) / (Path(v).stem + ".pose") for v in args.inputs]
    seen: dict[Path, str] = {}
    for video, out in zip(args.inputs, outs):
        if out in seen:
            raise UserError(f"{video} and {seen[out]} would both be written to {out}")
        seen[out] = video
    return outs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setup:
        setup_video_env(args.venv, requirements=args.requirements, base_python=args.base_python)
        return 0
    if args.check:
        print(json.dumps({"executable": require_python("video environment"), **check_env()}))
        return 0
    if not args.inputs:
        raise UserError("no video given (python -m signclip_jax.video VIDEO... --out_dir=DIR)")
    outputs = _outputs(args)
    records = convert_videos(
        args.inputs,
        outputs,
        timeout=args.timeout,
        model_complexity=args.model_complexity,
        refine_face_landmarks=args.refine_face_landmarks,
    )
    failed = 0
    for r in records:
        if "error" in r:
            failed += 1
            print(f"error: {r['name']}: {r['error']}", file=sys.stderr)
        else:
            print(
                f"{r['name']} -> {r['output']}: {r['frames']} frames, {r['fps']:.2f} fps,"
                f" {r['width']}x{r['height']}, hands in {r['hands']:.0%} of frames;"
                f" {r['seconds']:.1f} s ({r['frames_per_second']} frames/s)"
            )
    return 1 if failed else 0
