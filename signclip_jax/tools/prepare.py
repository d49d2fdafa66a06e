r"""Packs a data source into ArrayRecord shards: `python -m signclip_jax.prepare --out=DIR ...`.

Each record holds one example's normalised pose (points [T, P, 3] at full length as float16 or
float32, the observed mask as bits, fps) plus its caption and metadata, so that training reads
one small record instead of parsing a .pose file, and augmentation still sees the whole clip.
Read the result with data.source='packed', data.shards=DIR.

  python -m signclip_jax.prepare --source=spreadthesign --csv=SperadTheSign.csv \
      --pose_dir=poses --split=train --out=packed/train --workers=8
  python -m signclip_jax.prepare --config=configs/spreadthesign.py --split=test --out=packed/test

DIR gets data-NNNNN.array_record shards, index.json (shard list, counts, pose spec, dtype;
written last) and skipped.txt (one "name<TAB>reason" line per example that could not be
used). A shard is written under a temporary name and renamed when complete, and index.json
only appears once every shard is complete, so an interrupted run never leaves a folder that
reads as finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from signclip_jax import cli
from signclip_jax import config as config_lib
from signclip_jax.errors import DataError, UserError

log = logging.getLogger("signclip_jax.prepare")

SOURCES = ("spreadthesign", "manifest", "tfds", "sld", "synthetic")


def _data_config(args: argparse.Namespace):
    import ml_collections

    if args.config:
        config = config_lib.load_config_file(args.config)
        data = ml_collections.ConfigDict(config.data.to_dict())
    else:
        data = ml_collections.ConfigDict()
        data.source = "spreadthesign"
    overrides = {
        "source": args.source,
        "csv_path": args.csv,
        "pose_dir": args.pose_dir,
        "manifest": args.manifest,
        "tfds_name": args.tfds_name,
        "data_dir": args.data_dir,
        "split_dir": args.split_dir,
        "synthetic_dir": args.synthetic_dir,
        "pose_components": args.components,
        "pose_header": args.pose_header,
    }
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    if args.languages is not None:
        data.languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    if data.get("source") == "packed":
        raise UserError("--source=packed: the data is packed already")
    return data


class _PackOne:
    """Source index -> (encoded record or None, name, reason). Runs in worker processes."""

    def __init__(self, source, spec, dtype: str):
        self.source, self.spec, self.dtype = source, spec, dtype

    def __call__(self, index: int) -> tuple[int, bytes | None, str, str]:
        from signclip_jax.data import pipeline, sources

        name = f"example {index}"
        try:
            record = self.source[index]
            name = pipeline.record_name(record)
            arr = pipeline.record_pose_array(record, self.spec)
            meta = {
                k: record.get(k, d)
                for k, d in (
                    ("id", str(index)),
                    ("text", ""),
                    ("sign_language", ""),
                    ("spoken_language", ""),
                    ("label", -1),
                    ("signer", ""),
                )
            }
            meta["name"] = name
            meta["source_index"] = index
            data = sources.encode_packed(arr.points, arr.observed, arr.fps, meta, self.dtype)
            return index, data, name, ""
        except UserError as e:
            return index, None, name, str(e)
        except Exception as e:  # a file that trips a library in an unforeseen way
            return index, None, name, f"{type(e).__name__}: {e}"


class _ShardWriter:
    """Writes data-NNNNN.array_record shards of `shard_size` records, each atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, data: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"data-{len(self.shards):05d}.array_record"
            self._tmp = self.out / (name + ".tmp")
            self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
            self._count = 0
        self._writer.write(data)
        self._count += 1
        if self._count >= self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "num_records": self._count})
        self._writer, self._tmp = None, None

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._writer = None


def _clear_output(out: Path, overwrite: bool) -> None:
    from signclip_jax.data.sources import PACKED_INDEX

    existing = [p for p in out.glob("data-*.array_record*")] + [
        p for p in (out / PACKED_INDEX, out / "skipped.txt") if p.exists()
    ]
    if existing and not overwrite:
        raise UserError(
            f"{out} already holds packed data ({existing[0].name}, ...); pass --overwrite to "
            "replace it or choose another --out"
        )
    for p in existing:
        p.unlink()


def pack(
    source,
    out: str | os.PathLike,
    *,
    spec,
    dtype: str = "float16",
    shard_size: int = 2000,
    workers: int = 0,
    overwrite: bool = False,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Packs every record of `source` into `out`; returns the index dict (also index.json)."""
    from signclip_jax.data.sources import PACKED_FORMAT, PACKED_INDEX, PACKED_VERSION

    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype must be float16 or float32, got {dtype!r}")
    if shard_size <= 0:
        raise UserError(f"--shard_size must be > 0, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, overwrite)
    n = len(source)
    skipped: list[tuple[str, str]] = list(getattr(source, "skipped", []) or [])
    writer = _ShardWriter(out, shard_size)
    fn = _PackOne(source, spec, dtype)
    start = time.time()
    written = 0
    pool = None
    try:
        if workers > 0:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(fn, range(n), chunksize=8)
        else:
            results = map(fn, range(n))
        for done, (_, data, name, reason) in enumerate(results, 1):
            if data is None:
                reason = reason.removeprefix(f"{name}: ")
                skipped.append((name, reason))
                if len(skipped) <= 20:
                    log.warning("skipping %s: %s", name, reason)
            else:
                writer.write(data)
                written += 1
            if done % 1000 == 0 or done == n:
                rate = done / max(time.time() - start, 1e-9)
                log.info("%d/%d examples (%.0f/s), %d skipped", done, n, rate, len(skipped))
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    with open(out / "skipped.txt", "w", encoding="utf-8") as f:
        for name, reason in skipped:
            f.write(f"{name}\t{' '.join(reason.split())}\n")
    if written == 0:
        raise DataError(
            f"no usable examples: all {len(skipped)} were skipped (see {out / 'skipped.txt'};"
            f" first: {skipped[0][1] if skipped else 'source is empty'})"
        )
    index = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "num_records": written,
        "shards": writer.shards,
        "dtype": dtype,
        "pose_spec": {
            "components": spec.components,
            "num_points": spec.num_points,
            "include_z": spec.include_z,
        },
        "skipped": len(skipped),
        "skipped_file": "skipped.txt",
        "source": description or {"repr": repr(source)},
        "seconds": round(time.time() - start, 3),
    }
    tmp = out / (PACKED_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False))
    os.replace(tmp, out / PACKED_INDEX)
    return index


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.prepare",
        description=(
            "Pack a data source (Spreadthesign CSV + poses, manifest, tfds, synthetic) into "
            "ArrayRecord shards that data.source='packed' reads. Unusable examples are "
            "skipped and listed in OUT/skipped.txt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (one split per folder)")
    p.add_argument(
        "--config", help="training config file (CONFIG.py[:arg]); its data.* settings are used"
    )
    p.add_argument("--source", choices=SOURCES, help="data source (overrides the config's)")
    p.add_argument("--csv", help="Spreadthesign metadata CSV (data.csv_path)")
    p.add_argument("--pose_dir", help="folder of .pose files (data.pose_dir)")
    p.add_argument("--manifest", help="manifest CSV or JSONL (data.manifest)")
    p.add_argument("--tfds_name", help="tfds dataset name or builder folder (data.tfds_name)")
    p.add_argument("--data_dir", help="tfds data_dir (data.data_dir)")
    p.add_argument("--pose_header", help=".pose/.poseheader giving the layout of tfds pose arrays")
    p.add_argument("--synthetic_dir", help="folder of the synthetic dataset (data.synthetic_dir)")
    p.add_argument("--split", default="train", help="train, val, test or all")
    p.add_argument("--split_dir", help="folder with {train,val,test}.txt row ids")
    p.add_argument(
        "--languages", help="comma-separated spoken languages to keep (default en; '' keeps all)"
    )
    p.add_argument("--components", help="pose components (data.pose_components)")
    p.add_argument("--shard_size", type=int, default=2000, help="records per shard")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in-process)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of the points (float32 is bit-exact)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace packed data in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from signclip_jax.data import pipeline, sources

    data = _data_config(args)
    spec = pipeline.settings_from_config(data).spec
    spec = type(spec)(components=spec.components, include_z=spec.include_z, max_frames=0)
    source = sources.make_source(data, split=args.split)
    log.info("packing %s into %s", source, args.out)
    index = pack(
        source,
        args.out,
        spec=spec,
        dtype=args.dtype,
        shard_size=args.shard_size,
        workers=args.workers,
        overwrite=args.overwrite,
        description={
            "source": str(data.get("source")),
            "split": sources.normalize_split(args.split),
            "repr": repr(source),
        },
    )
    print(
        f"packed {index['num_records']} examples into {len(index['shards'])} shard(s) in "
        f"{args.out} ({index['dtype']}); skipped {index['skipped']} "
        f"(listed in {Path(args.out) / 'skipped.txt'})"
    )
    return 0

