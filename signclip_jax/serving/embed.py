r"""Embeds .pose files and texts with a trained model: `python -m signclip_jax.embed`.

  python -m signclip_jax.embed --workdir=runs/demo --poses clips/ 'more/**/*.pose' a.pose \
      --texts "<en> <ase> house" "<en> <ase> tree" --out=emb.npz

Whole files. --out=FILE.npz is written once (atomically) and holds
  pose_embeddings  [P, H] float32  one row per pose that could be read, in input order
  pose_files       [P] str        the file of each row
  text_embeddings  [T, H] float32  one row per text, in input order (--texts, then --texts_file)
  texts            [T] str
  failed_files     [F] str        inputs that could not be embedded (no row in pose_embeddings)
  failed_errors    [F] str        why, one message each
--out_dir=DIR [--name=MODEL] writes one DIR/<stem>-using-model-<MODEL>.npy per pose instead
(or as well): shape [H] float32, the layout pose-evaluation's metrics read (MODEL defaults to
the run folder's name).

Continuous signing. --window=W [--stride=S] cuts every pose into windows of W frames every S
frames (`64`, or seconds with a unit: `2s`, `500ms`); --segments=FILE takes the parts an ELAN
.eaf (--tier picks tiers), .srt/.vtt subtitle file or CSV (file,start,end in seconds, or
file,start_frame,end_frame) names. A subtitle or ELAN file belongs to the --poses file of the
same name (or to the only one). Each window or segment is embedded exactly as if its frames
were a .pose file of its own. --out=DIR is then a folder: rows-00000.npz, ... with
  embeddings [N, H] float32; files; start_frames, end_frames ([start, end)); start_seconds,
  end_seconds; fps; labels, tiers (segments); failed_files, failed_start_frames,
  failed_end_frames, failed_errors
plus job.json and progress.json: run the same command again after an interruption and it
continues after the last finished shard (nothing finished is recomputed). Texts go to
DIR/texts.npz. `signclip_jax.serving.clips.load_rows(DIR)` reads the shards as one table.

Rows are exactly what the model's towers give; --normalize scales each to unit length.
--long_poses: a pose (or window) longer than the model's max_frames keeps its first max_frames
frames (`truncate`, the default and the original's behaviour) or is embedded as the mean of
overlapping max_frames windows (`window`).

Texts are used as given: write the prompt the model was trained with ("<en> <ase> house").
--poses takes files, directories (every *.pose directly inside, sorted by name) and glob
patterns (sorted; `**` recurses), expanded in the order given. Video files (.mp4, .mov, .webm,
.avi, .mkv) go through `signclip_jax.video.video_to_pose` when the optional video environment
is installed. A file (or window) that cannot be read is reported on stderr (one line each) and
skipped; the others are still embedded and written, and the exit code is then 1. Exit code 2:
a usage error (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from signclip_jax import cli, files
from signclip_jax.data import segments as seg_lib
from signclip_jax.errors import UserError
from signclip_jax.serving import clips
from signclip_jax.serving.clips import embed_files, expand_poses

EXIT_SOME_FAILED = 1
TEXTS_FILE = "texts.npz"


# ---------------------------------------------------------------------------------- inputs
def read_texts_file(path: str | os.PathLike) -> list[str]:
    """One text per line (UTF-8, a BOM is dropped); blank lines are skipped; line ends and
    surrounding whitespace are stripped."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--texts_file {path}: cannot read ({e.strerror or e})") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--texts_file {path}: not UTF-8 text ({e})") from None
    return [line.strip() for line in content.splitlines() if line.strip()]


def segment_units(
    segment_paths: Sequence[str], pose_files: Sequence[str], tiers: Sequence[str]
) -> tuple[list[clips.Unit], list[tuple[str, str]]]:
    """--segments files -> units (a recording and its segments), grouped by recording in the
    order they first appear, and (where, why) of annotations that were skipped.

    CSV rows name their recording. An ELAN or subtitle file belongs to the --poses file with
    its stem (or the stem of a media file an ELAN file names), or to the only --poses file
    when one segment file and one pose are given."""
    by_file: dict[str, list[seg_lib.Segment]] = {}
    skipped: list[tuple[str, str]] = []
    if tiers and not any(p.lower().endswith(".eaf") for p in segment_paths):
        raise UserError("--tier picks ELAN tiers; no --segments file is an ELAN .eaf file")
    stems: dict[str, list[str]] = {}
    for p in pose_files:
        stems.setdefault(Path(p).stem, []).append(p)
    for path in segment_paths:
        is_eaf = path.lower().endswith(".eaf")
        found = seg_lib.read_segments(path, tiers=tiers if is_eaf and tiers else None)
        skipped.extend(found.skipped)
        if found.has_files:
            for seg in found.segments:
                by_file.setdefault(str(seg.file), []).append(seg)
            continue
        names = [Path(path).stem, *(Path(m.split("://")[-1]).stem for m in found.media)]
        matches = sorted({p for n in names for p in stems.get(n, [])})
        if not matches and len(pose_files) == 1 and len(segment_paths) == 1:
            matches = list(pose_files)
        if len(matches) != 1:
            why = "several --poses files match" if matches else "no --poses file matches"
            raise UserError(
                f"--segments {path}: {why}; its recording is the --poses file named"
                f" {Path(path).stem}.pose"
                + (f" (or {', '.join(n + '.pose' for n in names[1:])})" if names[1:] else "")
            )
        by_file.setdefault(matches[0], []).extend(found.segments)
    return [clips.Unit(f, segs) for f, segs in by_file.items()], skipped


def _checkpoint_flags(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(workdir, checkpoint) named by the flags of cli.add_checkpoint_args; a --model REF
    (where cli has it) through signclip_jax.models."""
    if getattr(args, "model", None):
        from signclip_jax import models

        return models.checkpoint_args(args)
    return args.workdir, args.checkpoint


def _str_array(values: Sequence[str]) -> np.ndarray:
    # Fixed-width unicode, not object: np.load needs no allow_pickle.
    return np.array(list(values), dtype=str) if values else np.zeros((0,), dtype="<U1")


# ---------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_checkpoint_args(p)
    p.add_argument(
        "--poses",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE|DIR|GLOB",
        help=".pose files, folders of them, glob patterns (quote them)",
    )
    p.add_argument(
        "--texts",
        nargs="+",
        action="extend",
        default=[],
        metavar="TEXT",
        help="texts to embed, as given (write the prompt: '<en> <ase> house')",
    )
    p.add_argument(
        "--texts_file",
        action="append",
        default=[],
        metavar="FILE",
        help="UTF-8 file, one text per line (blank lines skipped); after --texts",
    )
    p.add_argument("--out", help="output .npz (whole files) or folder (--window / --segments)")
    p.add_argument("--out_dir", help="folder for one <stem>-using-model-<MODEL>.npy per pose")
    p.add_argument("--name", help="MODEL in the --out_dir file names (default: the run's folder)")
    p.add_argument("--normalize", action="store_true", help="unit-length rows (default: raw)")
    p.add_argument(
        "--long_poses",
        default="truncate",
        choices=clips.LONG_POSES,
        help="a pose longer than max_frames: keep its first max_frames frames (truncate, "
        "default) or average overlapping max_frames windows (window)",
    )
    p.add_argument("--window", help="cut each pose into windows of W frames (64) or seconds (2s)")
    p.add_argument("--stride", help="start a window every S frames or seconds (default: W)")
    p.add_argument(
        "--segments",
        action="append",
        default=[],
        metavar="FILE",
        help="segments to embed: ELAN .eaf, .srt, .vtt, or CSV file,start,end (seconds)",
    )
    p.add_argument("--tier", action="append", default=[], help="ELAN tier to read (default all)")
    p.add_argument(
        "--shard_rows",
        type=int,
        default=4096,
        help="rows per shard of --window / --segments output (default 4096)",
    )
    p.add_argument("--batch_size", type=int, default=64, help="rows per model call (default 64)")
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype, e.g. bfloat16 (default: as trained); params stay fp32",
    )
    p.add_argument(
        "--read_threads",
        type=int,
        default=4,
        help="threads reading .pose files ahead of the model (default 4)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> bool:
    """Usage errors, before any work. Returns whether rows (windows / segments) are asked."""
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.shard_rows < 1:
        raise UserError(f"--shard_rows must be >= 1, got {args.shard_rows}")
    rows = bool(args.window or args.segments)
    if args.window and args.segments:
        raise UserError("--window and --segments are two ways to cut poses; give one")
    if args.stride and not args.window:
        raise UserError("--stride needs --window")
    if args.tier and not args.segments:
        raise UserError("--tier needs --segments (an ELAN .eaf file)")
    if args.name is not None and not args.out_dir:
        raise UserError("--name names the --out_dir files; give --out_dir")
    if args.name is not None:
        clips.check_model_name(args.name)
    if rows:
        if args.out_dir:
            raise UserError("--out_dir writes one file per pose; --window / --segments write"
                            " rows to the --out folder")  # fmt: skip
        if not args.out:
            raise UserError("--window / --segments write a folder of shards: give --out=DIR")
        if Path(args.out).is_file():
            raise UserError(f"--out {args.out} is a file; with --window / --segments it is a"
                            " folder")  # fmt: skip
        files.check_writable_dir(args.out, f"--out {args.out}")
        return True
    if not args.out and not args.out_dir:
        raise UserError("give --out=FILE.npz and/or --out_dir=DIR")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; give a file name (e.g. {out}/emb.npz)")
        # Before any work: the npz is written only after every input is embedded.
        files.check_writable_dir(os.path.dirname(args.out) or ".", f"--out {args.out}")
    if args.out_dir:
        files.check_writable_dir(args.out_dir, f"--out_dir {args.out_dir}")
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows_mode = _check_args(args)
    window = seg_lib.parse_length(args.window, "--window") if args.window else None
    stride = seg_lib.parse_length(args.stride, "--stride") if args.stride else None
    pose_files = expand_poses(args.poses)
    texts = list(args.texts)
    for path in args.texts_file:
        texts.extend(read_texts_file(path))
    units: list[clips.Unit] = []
    if args.segments:
        units, skipped = segment_units(args.segments, pose_files, args.tier)
        for where, why in skipped[:5]:
            print(f"skipped {where}: {why}", file=sys.stderr)
        if len(skipped) > 5:
            print(f"skipped {len(skipped) - 5} more annotation(s)", file=sys.stderr)
    elif window:
        units = [clips.Unit(f) for f in pose_files]
    if rows_mode and not units:
        raise UserError("nothing to embed: give --poses to cut into windows")
    if not rows_mode and not pose_files and not texts:
        raise UserError("nothing to embed: give --poses and/or --texts / --texts_file")
    if args.out_dir:
        clips.clip_file_names(pose_files, "MODEL")  # two poses with one name: refused now

    # JAX only now (run and the embedder import it): --help and usage errors stay instant.
    from signclip_jax import run as run_lib
    from signclip_jax.serving import embedder as embedder_lib

    workdir, checkpoint = _checkpoint_flags(args)
    run = run_lib.load_run(workdir, checkpoint, which=args.which, dtype=args.dtype)
    embedder = embedder_lib.Embedder(run, batch_size=args.batch_size)
    text_emb = embedder.embed_texts(texts).astype(np.float32, copy=False)
    text_emb = clips.normalize_rows(text_emb) if args.normalize else text_emb
    if not rows_mode:
        return _embed_files(args, run, embedder, pose_files, texts, text_emb)
    if texts:
        target = Path(args.out) / TEXTS_FILE
        files.write_npz_atomic(target, {"text_embeddings": text_emb, "texts": _str_array(texts)})
        print(f"wrote {target}: text_embeddings {text_emb.shape}", file=sys.stderr)
    return _embed_rows(args, run, embedder, units, window, stride)


def _embed_files(
    args: argparse.Namespace,
    run: Any,
    embedder: Any,
    pose_files: list[str],
    texts: list[str],
    text_emb: np.ndarray,
) -> int:
    print(
        f"embedding {len(pose_files)} pose file(s) with {run.step_dir}",
        file=sys.stderr,
    )
    progress = clips.Progress(
        len(pose_files), desc="embed", unit="pose", quiet=args.quiet or len(pose_files) < 64
    )

    try:
        pose_emb, good, failed = embed_files(
            embedder,
            pose_files,
            chunk=max(8 * args.batch_size, 256),
            read_threads=args.read_threads,
            long_poses=args.long_poses,
            normalize=args.normalize,
            on_error=progress.failed,
            progress=lambda n: progress.update(n, rows=n),
        )
    finally:
        progress.close()
    if args.out_dir:
        name = args.name or run.workdir.name
        clips.check_model_name(name)
        clips.write_clip_files(args.out_dir, clips.clip_file_names(good, name), pose_emb)
        print(
            f"wrote {len(good)} file(s) <stem>-using-model-{name}.npy to {args.out_dir}",
            file=sys.stderr,
        )
    if args.out:
        files.write_npz_atomic(
            args.out,
            {
                "pose_embeddings": pose_emb,
                "pose_files": _str_array(good),
                "text_embeddings": text_emb,
                "texts": _str_array(texts),
                "failed_files": _str_array([f for f, _ in failed]),
                "failed_errors": _str_array([e for _, e in failed]),
            },
        )
        print(
            f"wrote {args.out}: pose_embeddings {pose_emb.shape}, text_embeddings"
            f" {text_emb.shape}"
            + (f"; {len(failed)} of {len(pose_files)} pose file(s) failed" if failed else ""),
            file=sys.stderr,
        )
    elif failed:
        print(f"{len(failed)} of {len(pose_files)} pose file(s) failed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def _embed_rows(
    args: argparse.Namespace,
    run: Any,
    embedder: Any,
    units: list[clips.Unit],
    window: seg_lib.Length | None,
    stride: seg_lib.Length | None,
) -> int:
    job = clips.RowJob(
        units=units,
        out_dir=args.out,
        window=window,
        stride=stride or window,
        long_poses=args.long_poses,
        normalize=args.normalize,
        shard_rows=args.shard_rows,
        chunk=max(8 * args.batch_size, 256),
        describe={"model": str(run.step_dir), "dtype": args.dtype},
    )
    cut = (f"windows of {window} every {stride or window}" if window
           else f"{sum(len(u.segments or ()) for u in units)} segment(s)")  # fmt: skip
    print(f"embedding {len(units)} recording(s), {cut}, with {run.step_dir} into {args.out}",
          file=sys.stderr)  # fmt: skip
    progress = clips.Progress(sum(max(s, 0) for s in job.sizes()), desc="embed",
                              quiet=args.quiet)  # fmt: skip

    def report(row: clips.Row, message: str) -> None:
        where = f" frames {row.start}-{row.end}" if row.start >= 0 else ""
        text = message if row.file in message else f"{row.file}{where}: {message}"
        progress.write(f"failed: {text}")

    try:
        state = clips.run_rows(embedder, job, progress=progress, on_error=report)
    finally:
        progress.close()
    print(
        f"wrote {state['shards']} shard(s) to {args.out}: {state['rows']} rows"
        + (f"; {state['failed']} failed" if state["failed"] else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if state["failed"] else 0


__all__ = ["embed_files", "expand_poses", "main", "read_texts_file", "segment_units"]
