r"""Embeds .pose files and texts with a trained model: `python -m signclip_jax.embed`.

  python -m signclip_jax.embed --workdir=runs/demo --poses clips/ 'more/**/*.pose' a.pose \
      --texts "<en> <ase> house" "<en> <ase> tree" --out=emb.npz

Writes one .npz (atomically: a temporary file beside it, then os.replace) holding
  pose_embeddings  [P, H] float32  one row per pose that could be read, in input order
  pose_files       [P] str        the file of each row
  text_embeddings  [T, H] float32  one row per text, in input order (--texts, then --texts_file)
  texts            [T] str
  failed_files     [F] str        inputs that could not be embedded (no row in pose_embeddings)
  failed_errors    [F] str        why, one message each
The rows are exactly what the model's towers give (no normalisation unless the model has it).
Texts are used as given: write the prompt the model was trained with ("<en> <ase> house").

--poses takes files, directories (every *.pose directly inside, sorted by name) and glob
patterns (sorted; `**` recurses), expanded in the order given. Video files (.mp4, .mov, .webm,
.avi, .mkv) go through `signclip_jax.video.video_to_pose` when the optional video environment
is installed. A file that cannot be read is reported on stderr (one line each) and skipped;
the others are still embedded and written, and the exit code is then 1. Exit code 2: a usage
error (nothing written).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from signclip_jax import cli, files
from signclip_jax.errors import UserError
from signclip_jax.serving.video_input import video_to_pose_bytes

POSE_SUFFIX = ".pose"
EXIT_SOME_FAILED = 1


# ---------------------------------------------------------------------------------- inputs
def expand_poses(specs: Sequence[str]) -> list[str]:
    """--poses arguments -> files, in the order given.

    A directory gives its *.pose files (not recursive), sorted; a glob pattern its matches,
    sorted (`**` recurses); anything else is taken as a file name as is (a missing file fails
    later, on its own). A directory without .pose files or a pattern without matches is a
    UserError: it is almost always a typo.
    """
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).iterdir() if p.suffix == POSE_SUFFIX and p.is_file()
            )
            if not found:
                raise UserError(f"--poses {spec}: directory holds no {POSE_SUFFIX} files")
            files.extend(found)
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"--poses {spec}: the pattern matches no files")
            files.extend(found)
        else:
            files.append(spec)
    return files


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


def pose_features(embedder: Any, path: str) -> np.ndarray:
    """One input file -> [min(T, max_frames), D] features (DataError/UserError if unusable)."""
    if files.is_video(path):
        return embedder.pose_features(video_to_pose_bytes(path, name=path), name=path)
    return embedder.pose_features(path, name=path)


# ---------------------------------------------------------------------------------- embedding
def _read_ahead(
    read: Callable[[str], np.ndarray], files: Sequence[str], chunk: int, threads: int
) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Chunks of (file, features or None, error or None); the next chunk is read by a thread
    pool while the caller embeds the current one, so memory holds at most two chunks."""

    def safe(path: str) -> tuple[str, np.ndarray | None, str | None]:
        try:
            return path, read(path), None
        except UserError as e:
            return path, None, str(e)
        except Exception as e:  # one odd file must not lose the others
            return path, None, f"{path}: {type(e).__name__}: {e}"

    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        starts = range(0, len(files), chunk)
        pending = None
        for start in starts:
            current = pending or [pool.submit(safe, f) for f in files[start : start + chunk]]
            nxt = start + chunk
            pending = [pool.submit(safe, f) for f in files[nxt : nxt + chunk]] or None
            yield [f.result() for f in current]


def embed_files(
    embedder: Any,
    files: Sequence[str],
    *,
    chunk: int = 512,
    read_threads: int = 4,
    on_error: Callable[[str, str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embeds pose files in chunks; returns ([P, H] float32 of the good files in input order,
    the good files, [(file, error)] of the others). `on_error(file, message)` is called as
    failures happen, `progress(n)` after each chunk."""
    rows: list[np.ndarray] = []
    good: list[str] = []
    failed: list[tuple[str, str]] = []
    for part in _read_ahead(lambda p: pose_features(embedder, p), files, chunk, read_threads):
        ok = [(f, x) for f, x, err in part if err is None]
        for f, _, err in part:
            if err is not None:
                failed.append((f, err))
                if on_error:
                    on_error(f, err)
        if ok:
            rows.append(embedder.embed_features([x for _, x in ok]))
            good.extend(f for f, _ in ok)
        if progress:
            progress(len(part))
    emb = np.concatenate(rows) if rows else np.zeros((0, embedder.hidden_size), np.float32)
    return emb.astype(np.float32, copy=False), good, failed


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
    p.add_argument("--out", required=True, help="output .npz")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name (e.g. {out}/emb.npz)")
    # Before any work: the npz is written only after every input is embedded.
    files.check_writable_dir(os.path.dirname(args.out) or ".", f"--out {args.out}")
    pose_files = expand_poses(args.poses)
    texts = list(args.texts)
    for path in args.texts_file:
        texts.extend(read_texts_file(path))
    if not pose_files and not texts:
        raise UserError("nothing to embed: give --poses and/or --texts / --texts_file")

    # JAX only now (run and the embedder import it): --help and usage errors stay instant.
    from signclip_jax import run as run_lib
    from signclip_jax.serving import embedder as embedder_lib

    run = run_lib.load_run(args.workdir, args.checkpoint, which=args.which, dtype=args.dtype)
    embedder = embedder_lib.Embedder(run, batch_size=args.batch_size)
    print(
        f"embedding {len(pose_files)} pose file(s) and {len(texts)} text(s) with {run.step_dir}",
        file=sys.stderr,
    )

    bar = tqdm(
        total=len(pose_files),
        unit="pose",
        file=sys.stderr,
        disable=args.quiet or len(pose_files) < 64,
    )

    def report(path: str, message: str) -> None:
        bar.write(f"failed: {message if path in message else f'{path}: {message}'}", sys.stderr)

    with bar:
        pose_emb, good, failed = embed_files(
            embedder,
            pose_files,
            chunk=max(8 * args.batch_size, 256),
            read_threads=args.read_threads,
            on_error=report,
            progress=bar.update,
        )
    text_emb = embedder.embed_texts(texts).astype(np.float32, copy=False)

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
        f"wrote {args.out}: pose_embeddings {pose_emb.shape}, text_embeddings {text_emb.shape}"
        + (f"; {len(failed)} of {len(pose_files)} pose file(s) failed" if failed else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else 0


__all__ = ["embed_files", "expand_poses", "main", "read_texts_file"]
