"""`bench input`: input-pipeline throughput, .pose files against packed ArrayRecord shards.

First one process doing a worker's whole per-example work (read, normalise, augment,
tokenise) on n examples, then the grain training iterator with N worker processes. Without
data, a synthetic dataset is generated in a temporary folder and packed there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

from signclip_jax import config as config_lib
from signclip_jax import files
from signclip_jax.data import packing, pipeline, sources, text
from signclip_jax.errors import UserError
from signclip_jax.tools.bench.common import table

log = logging.getLogger(__name__)


def input_config(args: argparse.Namespace, synthetic_dir: str | None) -> ml_collections.ConfigDict:
    """The data section measured: the --config file's (or the original recipe's augmentation),
    then the source flags."""
    if args.config:
        full = config_lib.load_config_file(args.config)
        data = ml_collections.ConfigDict(full.data.to_dict())
        data.pose_dtype = pipeline.settings_from_config(full).pose_dtype  # resolve "auto"
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
    if args.pose_dtype != "auto":
        data.pose_dtype = args.pose_dtype
    data.max_bad_fraction = 1.0  # measuring speed, not policing data
    return data


def time_examples(source, data, tokenizer, n: int) -> dict[str, Any]:
    """One process doing a worker's per-example work on n examples: examples/s."""
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures both readers, one process and then each --workers count; the result dict."""
    if not args.step_rate > 0:
        raise UserError(f"--step_rate must be > 0 samples/s, got {args.step_rate:g}")
    with contextlib.ExitStack() as stack:
        tmp = None
        if args.source == "synthetic" or not args.shards:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scj-bench-")))
        synthetic_dir = str(tmp / "synthetic") if args.source == "synthetic" else None
        data = input_config(args, synthetic_dir)
        if args.source == "synthetic":
            data.synthetic_signs = args.signs
            data.synthetic_signers = args.signers
        settings = pipeline.settings_from_config(data)
        pose_source = sources.make_source(data, split="all" if args.source == "synthetic" else None)
        if len(pose_source) == 0:
            raise UserError(f"{pose_source!r} has no examples to measure")
        tokenizer = text.load_tokenizer(args.text_model)
        n = min(args.n, len(pose_source))

        if args.shards:
            packed_dir = args.shards
        else:  # pack the first n examples to compare like with like
            spec = settings.spec
            subset = files.FirstN(pose_source, n)
            packed_dir = str(tmp / "packed")
            packing.pack(subset, packed_dir, spec=type(spec)(spec.components, spec.include_z, 0),
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
    # How many worker processes (~CPU cores) keep one accelerator fed at --step_rate, from the
    # single-process per-example rate (the work a worker does).
    workers_needed = {
        r["reader"]: math.ceil(args.step_rate / r["per_worker"])
        for r in rows
        if r["what"] == "per-example work" and r["per_worker"] > 0
    }
    return {
        "mode": "input",
        "source": args.source,
        "examples": n,
        "step_rate": args.step_rate,
        "workers_per_accelerator": workers_needed,
        "augment": not args.no_augment,
        "dtype": args.dtype if not args.shards else "as packed",
        "pose_dtype": settings.pose_dtype,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": rows,
    }


def show(result: dict[str, Any]) -> None:
    """Prints the result as a table, then the workers-per-accelerator lines."""
    for row in result["results"]:
        row.setdefault("samples_per_s", row["per_worker"])
    print(
        f"input pipeline throughput ({result['examples']} examples, source {result['source']}, "
        f"augment={result['augment']}, {result['pose_dtype']} poses, "
        f"{result['machine']['cpus']} CPUs)"
    )
    print(
        table(
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
    for reader, workers in result["workers_per_accelerator"].items():
        print(
            f"{reader}: {workers} worker processes (CPU cores) per accelerator to feed "
            f"{result['step_rate']:g} samples/s"
        )
