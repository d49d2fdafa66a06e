r"""Throughput benchmarks: `python -m signclip_jax.bench MODE ...`; prints a table, --out JSON.

Modes (subcommands; each registers itself in MODES):
  input   input-pipeline throughput: examples/s of one worker reading .pose files and packed
          ArrayRecord shards (the full per-example work: read, normalise, augment, tokenise),
          then the grain pipeline end to end with N worker processes.

  python -m signclip_jax.bench input                       # synthetic data in a temp folder
  python -m signclip_jax.bench input --source=spreadthesign --csv=ST.csv --pose_dir=poses \
      --shards=packed/train --n=2000 --workers=0,4,8 --out=bench_input.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from signclip_jax.errors import UserError, run_cli

log = logging.getLogger("signclip_jax.bench")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# input


def _input_config(args: argparse.Namespace, synthetic_dir: str | None):
    import ml_collections

    if args.config:
        from signclip_jax.prepare import load_config_file

        data = ml_collections.ConfigDict(load_config_file(args.config).data.to_dict())
    else:
        data = ml_collections.ConfigDict()
        data.augment = ml_collections.ConfigDict({"temporal": True})  # the original recipe
    for key, value in {
        "source": args.source,
        "csv_path": args.csv,
        "pose_dir": args.pose_dir,
        "manifest": args.manifest,
        "synthetic_dir": synthetic_dir,
    }.items():
        if value is not None:
            data[key] = value
    if args.no_augment:
        data.augment = ml_collections.ConfigDict()
    data.max_bad_fraction = 1.0  # measuring speed, not policing data
    return data


def time_examples(source, data, tokenizer, n: int) -> dict[str, Any]:
    """One process doing a worker's per-example work on n examples: examples/s."""
    from signclip_jax.data import pipeline

    settings = pipeline.settings_from_config(data)
    prepare = pipeline._Prepare(source, settings, tokenizer, seed=0, train=True)
    n = min(n, len(source))
    prepare(0, 0)  # warm-up: tokenizer cache, imports, shard open
    bad = 0
    start = time.perf_counter()
    for i in range(n):
        bad += "bad" in prepare(i, i)
    seconds = time.perf_counter() - start
    return {"samples": n, "skipped": bad, "seconds": seconds, "per_worker": n / seconds}


def time_pipeline(source, data, tokenizer, *, workers: int, batch_size: int, batches: int):
    """The grain training iterator with `workers` processes: examples/s after the first batch."""
    from signclip_jax.data import pipeline

    data = data.copy_and_resolve_references()
    data.workers = workers
    it = pipeline.make_train_iterator(
        source, data, tokenizer=tokenizer, seed=0, batch_size_per_process=batch_size
    )
    try:
        started = time.perf_counter()
        next(it)  # start-up (worker processes, first reads) is reported separately
        startup = time.perf_counter() - started
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    samples = batches * batch_size
    rate = samples / seconds
    return {
        "samples": samples,
        "seconds": seconds,
        "startup_s": startup,
        "samples_per_s": rate,
        "per_worker": rate / max(workers, 1),
    }


def bench_input(args: argparse.Namespace) -> dict[str, Any]:
    from signclip_jax.data import sources, text
    from signclip_jax.prepare import pack

    with contextlib.ExitStack() as stack:
        tmp = None
        if args.source == "synthetic" or not args.shards:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scj-bench-")))
        synthetic_dir = str(tmp / "synthetic") if args.source == "synthetic" else None
        data = _input_config(args, synthetic_dir)
        if args.source == "synthetic":
            data.synthetic_signs = args.signs
            data.synthetic_signers = args.signers
        pose_source = sources.make_source(data, split="all" if args.source == "synthetic" else None)
        if len(pose_source) == 0:
            raise UserError(f"{pose_source!r} has no examples to measure")
        tokenizer = text.load_tokenizer(args.text_model)
        n = min(args.n, len(pose_source))

        if args.shards:
            packed_dir = args.shards
        else:  # pack the first n examples to compare like with like
            from signclip_jax.data import pipeline

            spec = pipeline.settings_from_config(data).spec
            subset = _Subset(pose_source, n)
            packed_dir = str(tmp / "packed")
            pack(subset, packed_dir, spec=type(spec)(spec.components, spec.include_z, 0),
                 dtype=args.dtype, shard_size=max(n // 4, 1))  # fmt: skip
        packed = sources.PackedSource(packed_dir)

        rows = []
        for label, src in ((".pose files", pose_source), ("packed shards", packed)):
            r = time_examples(src, data, tokenizer, n)
            rows.append({"reader": label, "workers": 1, "what": "per-example work", **r})
            log.info("%s: %.1f examples/s", label, r["per_worker"])
        for workers in args.workers:
            for label, src in ((".pose files", pose_source), ("packed shards", packed)):
                r = time_pipeline(
                    src, data, tokenizer, workers=workers, batch_size=args.batch_size,
                    batches=args.batches,
                )  # fmt: skip
                rows.append({"reader": label, "workers": workers, "what": "grain pipeline", **r})
    return {
        "mode": "input",
        "source": args.source,
        "examples": n,
        "augment": not args.no_augment,
        "dtype": args.dtype if not args.shards else "as packed",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": rows,
    }


class _Subset:
    """The first n records of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n
        self.skipped = list(getattr(source, "skipped", []))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.source[i]

    def __repr__(self) -> str:
        return f"first {self.n} of {self.source!r}"


def print_input(result: dict[str, Any]) -> None:
    for row in result["results"]:
        row.setdefault("samples_per_s", row["per_worker"])
    print(
        f"input pipeline throughput ({result['examples']} examples, source {result['source']}, "
        f"augment={result['augment']}, {result['machine']['cpus']} CPUs)"
    )
    print(
        _table(
            result["results"],
            [
                ("what", "measure", "s"),
                ("reader", "reader", "s"),
                ("workers", "workers", "d"),
                ("samples", "samples", "d"),
                ("seconds", "seconds", ".2f"),
                ("samples_per_s", "samples/s", ".1f"),
                ("per_worker", "samples/s/worker", ".1f"),
            ],
        )
    )


def _add_input(sub) -> None:
    p = sub.add_parser(
        "input",
        help="input-pipeline throughput (.pose files vs packed shards, grain workers)",
        description="Examples/s of the input pipeline. Without data, a synthetic dataset is "
        "generated in a temporary folder and packed there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source", default="synthetic", choices=("synthetic", "spreadthesign", "manifest")
    )
    p.add_argument("--config", help="training config (CONFIG.py[:arg]) for data.* settings")
    p.add_argument("--csv", help="Spreadthesign metadata CSV")
    p.add_argument("--pose_dir", help="folder of .pose files")
    p.add_argument("--manifest", help="manifest CSV/JSONL")
    p.add_argument("--shards", help="packed folder to read (default: pack the measured examples)")
    p.add_argument("--n", type=int, default=200, help="examples timed per reader")
    p.add_argument("--signs", type=int, default=8, help="synthetic: number of signs")
    p.add_argument("--signers", type=int, default=6, help="synthetic: signers per sign")
    p.add_argument(
        "--workers", default="0,2", help="comma-separated grain worker counts ('' = none)"
    )
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="batches timed per pipeline run")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--no_augment", action="store_true", help="skip temporal augmentation")
    p.add_argument("--text_model", default="minilm", help="tokenizer (folder, hub name, minilm)")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(run=bench_input, show=print_input)


# name -> function adding the subcommand's parser. A new mode (e.g. `train`: step throughput)
# adds itself here with set_defaults(run=..., show=...).
MODES: dict[str, Callable[[Any], None]] = {"input": _add_input}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m signclip_jax.bench",
        description="Throughput benchmarks; prints a table and optionally writes JSON.",
    )
    sub = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    for add in MODES.values():
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if hasattr(args, "workers") and isinstance(args.workers, str):
        try:
            args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
        except ValueError:
            raise UserError(
                f"--workers must be comma-separated integers, got {args.workers!r}"
            ) from None
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    result = args.run(args)
    args.show(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_cli(main)
