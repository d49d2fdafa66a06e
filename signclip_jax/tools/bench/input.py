"""`bench input`: host throughput of the input pipeline, per reader and per CPU core.

Readers: the .pose files, the packed ArrayRecord shards as `prepare` writes them and, when
the bench packs the examples itself, the same shards rewritten uncompressed. Measures:

  per-example work   one process doing a worker's whole per-example work with the
                     augmentation on the host (read, normalise, augment, tokenise), as before
  pipeline           the grain training iterator, augmentation on the host or on the device
                     (data.augment_on_device: the host reads, pads and draws the resampled
                     frame counts), in this process (workers 0, one read thread) and with
                     each --workers count

CPU time is what a core costs: this process's (all threads) plus its live worker processes'
(Linux /proc), so `per_core` = samples / CPU seconds holds on a busy machine too, while
samples/s (wall) depends on what else runs. `per_core_samples_per_s` (JSON) is each reader's
in-process rate with the augmentation on the device, and `cores_per_accelerator` the cores
that feed --step_rate samples/s from it. Without data, a synthetic dataset is generated in a
temporary folder and packed there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from signclip_jax import config as config_lib
from signclip_jax import files
from signclip_jax.data import packing, pipeline, sources, text
from signclip_jax.errors import UserError
from signclip_jax.tools.bench import plan
from signclip_jax.tools.bench.common import table

log = logging.getLogger(__name__)

PACKED = "packed shards"
UNCOMPRESSED = "packed shards (uncompressed)"


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


class Cycled:
    """`n` records that repeat `source`'s in order (source[i % len]): a dataset of realistic
    size from a few generated clips. grain's index shuffle costs ~300 us per element on a
    48-element dataset and ~5 us from a few thousand on, so a tiny one would measure that."""

    def __init__(self, source, n: int):
        self.source, self.n = source, int(n)
        self.skipped: list = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index % len(self.source)]

    def __repr__(self) -> str:
        return f"Cycled({self.source!r}, n={self.n})"


class DrawnLengths:
    """`source`'s records with each clip's frames resampled (nearest frame) to a length drawn
    from the Spreadthesign length model (plan.py: median 89, mean ~98 frames), so that short
    generated clips (40-90 frames) weigh like real ones. Record i's length is a function of
    (seed, i); the records carry their points (the `.pose` reader then pays the file read and
    this resampling, a few microseconds)."""

    POSE_KEYS = ("pose_path", "pose_bytes", "pose", "points", "observed", "fps", "features")

    def __init__(self, source, spec, *, seed: int = 0, max_frames: int = 256):
        self.source, self.spec, self.seed, self.max_frames = source, spec, seed, max_frames
        self.skipped = list(getattr(source, "skipped", []))

    def __len__(self) -> int:
        return len(self.source)

    def length(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, index])
        return int(plan.spreadthesign_lengths(rng, 1, self.max_frames)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        arr = pipeline.record_pose_array(record, self.spec)
        n = self.length(index)
        frames = (np.arange(n) * len(arr.points)) // n  # [n] nearest source frame
        meta = {k: v for k, v in record.items() if k not in self.POSE_KEYS}
        return {**meta, "id": str(record.get("id", index)), "points": arr.points[frames],
                "observed": arr.observed[frames], "fps": arr.fps}  # fmt: skip

    def __repr__(self) -> str:
        return f"DrawnLengths({self.source!r}, spreadthesign)"


def _children() -> dict[int, float] | None:
    """CPU seconds of each live child process (Linux /proc), None where unknown."""
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == me:  # ppid; utime and stime are fields 14 and 15 of stat
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_seconds(exclude: frozenset[int] = frozenset()) -> tuple[float, bool]:
    """CPU seconds of this process (all threads) plus its live child processes (grain's
    workers) but those in `exclude` (an earlier pipeline's, still shutting down), and whether
    the children could be counted (Linux /proc)."""
    children = _children()
    if children is None:
        return time.process_time(), False
    return time.process_time() + sum(v for k, v in children.items() if k not in exclude), True


def time_examples(source, data, tokenizer, n: int) -> dict[str, Any]:
    """One process doing a worker's per-example work (augmentation on the host) on n
    examples: examples/s."""
    settings = dataclasses.replace(pipeline.settings_from_config(data), augment_on_device=False)
    prepare = pipeline._Prepare(source, settings, tokenizer, seed=0, train=True)
    n = min(n, len(source))
    prepare(0, 0)  # warm-up: tokenizer cache, imports, shard open
    bad = 0
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        bad += "bad" in prepare(i, i)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "samples": n, "skipped": bad, "seconds": seconds, "cpu_seconds": cpu,
        "samples_per_s": n / seconds, "per_core": n / cpu, "per_worker": n / seconds,
    }  # fmt: skip


def time_pipeline(source, data, tokenizer, *, workers: int, batch_size: int, batches: int,
                  device: bool) -> dict[str, Any]:  # fmt: skip
    """The grain training iterator with `workers` processes (0: in this process, one read
    thread), augmentation on the device or the host: samples/s and samples per CPU second
    once every worker has delivered a batch."""
    data = data.copy_and_resolve_references()
    data.workers = workers
    data.augment_on_device = device
    if workers == 0:
        data.read_threads = 1
    before = frozenset(_children() or ())  # not this pipeline's
    it = pipeline.make_train_iterator(
        source, data, tokenizer=tokenizer, seed=0, batch_size_per_process=batch_size
    )
    try:
        started = time.perf_counter()
        for _ in range(workers + 1):  # each worker's start-up (imports, first reads) is
            next(it)  # reported separately: batches come from the workers in turn
        startup = time.perf_counter() - started
        cpu0, counted = cpu_seconds(before)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(before)[0] - cpu0
    finally:
        it.close()
    samples = batches * batch_size
    rate = samples / seconds
    return {
        "samples": samples,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_includes_workers": counted or workers == 0,
        "startup_s": startup,
        "samples_per_s": rate,
        "per_core": samples / cpu if cpu > 0 else None,
        "per_worker": rate / max(workers, 1),
    }


def uncompressed_copy(packed_dir: str, out: Path) -> str:
    """The packed folder's shards rewritten without compression (record for record)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    out.mkdir(parents=True, exist_ok=True)
    folder = Path(packed_dir)
    for name in sorted(p.name for p in folder.glob("data-*.array_record")):
        reader = ArrayRecordDataSource([str(folder / name)])
        writer = ArrayRecordWriter(str(out / name), "group_size:1,uncompressed")
        for i in range(len(reader)):
            writer.write(reader[i])
        writer.close()
    shutil.copy(folder / sources.PACKED_INDEX, out / sources.PACKED_INDEX)
    return str(out)


def cores_needed(step_rate: float, per_core: float) -> int:
    """CPU cores (or worker processes) that feed `step_rate` samples/s when one delivers
    `per_core` samples/s."""
    return math.ceil(step_rate / per_core)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures every reader, host- and device-augmented; the result dict."""
    if not args.step_rate > 0:
        raise UserError(f"--step_rate must be > 0 samples/s, got {args.step_rate:g}")
    if args.lengths and args.shards:
        raise UserError("--lengths changes the clips before they are packed: not with --shards")
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
        n = args.n
        distinct = min(n, len(pose_source))
        if n > len(pose_source):  # a few generated clips, read as n examples
            pose_source = Cycled(pose_source, n)
        if args.lengths == "spreadthesign":
            spec = settings.spec  # all frames: the drawn lengths go up to 256
            pose_source = DrawnLengths(pose_source, type(spec)(spec.components, spec.include_z, 0))
        mean_frames = None
        if isinstance(pose_source, DrawnLengths):
            mean_frames = float(np.mean([pose_source.length(i) for i in range(n)]))

        readers = {".pose files": pose_source}
        if args.shards:
            readers[PACKED] = sources.PackedSource(args.shards)
        else:  # pack the same n examples to compare like with like
            spec = settings.spec
            subset = files.FirstN(pose_source, n)
            packed_dir = str(tmp / "packed")
            packing.pack(subset, packed_dir, spec=type(spec)(spec.components, spec.include_z, 0),
                         dtype=args.dtype, shard_size=max(n // 4, 1))  # fmt: skip
            readers[PACKED] = sources.PackedSource(packed_dir)
            readers[UNCOMPRESSED] = sources.PackedSource(
                uncompressed_copy(packed_dir, tmp / "uncompressed")
            )

        if args.packed_only:
            del readers[".pose files"]
        rows = []
        for label, src in readers.items():
            if label != UNCOMPRESSED and not args.packed_only:
                r = time_examples(src, data, tokenizer, n)
                rows.append({"reader": label, "workers": 1, "what": "per-example work",
                             "augment": "host", **r})  # fmt: skip
                log.info("%s: %.1f examples/s", label, r["per_worker"])
        for workers in sorted({0, *args.workers}):
            for device in (True, False):
                if workers == 0 and not device:
                    continue  # the per-example rows measure that
                for label, src in readers.items():
                    r = time_pipeline(src, data, tokenizer, workers=workers, device=device,
                                      batch_size=args.batch_size, batches=args.batches)  # fmt: skip
                    rows.append({"reader": label, "workers": workers, "what": "pipeline",
                                 "augment": "device" if device else "host", **r})  # fmt: skip
    # How many worker processes (~CPU cores) keep one accelerator fed at --step_rate, from the
    # single-process per-example rate (the work a worker does, augmentation on the host).
    workers_needed = {
        r["reader"]: cores_needed(args.step_rate, r["per_worker"])
        for r in rows
        if r["what"] == "per-example work" and r["per_worker"] > 0
    }
    # Augmentation on the device: CPU cores per accelerator from the in-process pipeline.
    per_core = {
        r["reader"]: r["per_core"]
        for r in rows
        if r["what"] == "pipeline" and r["augment"] == "device" and r["workers"] == 0
    }
    cores = {k: cores_needed(args.step_rate, v) for k, v in per_core.items() if v}
    return {
        "mode": "input",
        "source": args.source,
        "examples": n,
        "distinct_examples": distinct,
        "lengths": args.lengths or "as stored",
        "mean_frames": mean_frames,
        "batch_size": args.batch_size,
        "step_rate": args.step_rate,
        "per_core_samples_per_s": per_core,
        "cores_per_accelerator": cores,
        "workers_per_accelerator": workers_needed,
        "augment": not args.no_augment,
        "augment_settings": dict(settings.augment),
        "dtype": args.dtype if not args.shards else "as packed",
        "pose_dtype": settings.pose_dtype,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": rows,
    }


def show(result: dict[str, Any]) -> None:
    """Prints the result as a table, then the cores-per-accelerator lines."""
    for row in result["results"]:
        row.setdefault("samples_per_s", row["per_worker"])
        row.setdefault("augment", "host")
    machine = result["machine"]
    load = machine.get("load_average")
    distinct = result.get("distinct_examples", result["examples"])
    cycling = f" cycling {distinct} clips" if distinct < result["examples"] else ""
    if result.get("mean_frames") is not None:
        cycling += f", {result['lengths']} lengths (mean {result['mean_frames']:.1f} frames)"
    print(
        f"input pipeline throughput ({result['examples']} examples{cycling}, "
        f"source {result['source']}, "
        f"augment={result['augment']}, {result['pose_dtype']} poses, {machine['cpus']} CPUs"
        + (f", load average {load[0]:.1f}" if load else "")
        + ")"
    )
    print(
        table(
            result["results"],
            [
                ("what", "measure", "s"),
                ("augment", "augment", "s"),
                ("reader", "reader", "s"),
                ("workers", "workers", "d"),
                ("samples", "samples", "d"),
                ("seconds", "seconds", ".2f"),
                ("cpu_seconds", "CPU s", ".2f"),
                ("samples_per_s", "samples/s", ".1f"),
                ("per_core", "samples/s/core", ".1f"),
            ],
        )
    )
    for reader, cores in result.get("cores_per_accelerator", {}).items():
        rate = result["per_core_samples_per_s"][reader]
        print(
            f"{reader}: {cores} CPU core(s) per accelerator to feed {result['step_rate']:g} "
            f"samples/s with the augmentation on the device ({rate:.1f} samples/s per core)"
        )
    for reader, workers in result["workers_per_accelerator"].items():
        print(
            f"{reader}: {workers} worker processes (CPU cores) per accelerator to feed "
            f"{result['step_rate']:g} samples/s with the augmentation on the host"
        )
    if load and machine["cpus"] and load[0] > machine["cpus"]:
        print(f"note: load average {load[0]:.1f} on {machine['cpus']} CPUs: other work shared "
              "the cores (samples/s suffers; samples/s/core counts CPU time)")  # fmt: skip
