r"""Throughput benchmarks: `python -m signclip_jax.bench MODE ...`; prints a table, --out JSON.

Modes (subcommands; each registers itself in MODES):
  input   input-pipeline throughput: examples/s of one worker reading .pose files and packed
          ArrayRecord shards (the full per-example work: read, normalise, augment, tokenise),
          then the grain pipeline end to end with N worker processes.

  python -m signclip_jax.bench input                       # synthetic data in a temp folder
  python -m signclip_jax.bench input --source=spreadthesign --csv=ST.csv --pose_dir=poses \
      --shards=packed/train --n=2000 --workers=0,4,8 --out=bench_input.json

  train   train-step throughput of a randomly initialised model on random batches of a given
          shape: compile time, samples/s, step ms, TFLOP/s and MFU from an analytic FLOP count,
          peak memory; `--twin` measures the PyTorch twin on the same shapes.

  python -m signclip_jax.bench train --bert=tiny --batch_size=8 --frames=32 --steps=2
  python -m signclip_jax.bench train --config=configs/spreadthesign.py --bert=bert-base-cased \
      --batch_size=448 --dtype=bfloat16 --attention=cudnn --twin --out=bench_train.json

  lengths padding and analytic FLOPs per clip of length buckets and length-grouping windows on
          the Spreadthesign length model (no model runs): what bucketing can save at most.

  python -m signclip_jax.bench lengths --bert=bert-base-cased --buckets=none \
      --buckets=62,94,126,158,190,222 --windows=1,8,32
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signclip_jax import cli, files
from signclip_jax import config as config_lib
from signclip_jax.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from signclip_jax.model.signclip import SignCLIPConfig

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not None, False or an empty list)."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# input


def _input_config(args: argparse.Namespace, synthetic_dir: str | None):
    import ml_collections

    if args.config:
        from signclip_jax.data import pipeline
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
    if not args.step_rate > 0:
        raise UserError(f"--step_rate must be > 0 samples/s, got {args.step_rate:g}")
    from signclip_jax.data import pipeline, sources, text
    from signclip_jax.tools.prepare import pack

    with contextlib.ExitStack() as stack:
        tmp = None
        if args.source == "synthetic" or not args.shards:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scj-bench-")))
        synthetic_dir = str(tmp / "synthetic") if args.source == "synthetic" else None
        data = _input_config(args, synthetic_dir)
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


def print_input(result: dict[str, Any]) -> None:
    for row in result["results"]:
        row.setdefault("samples_per_s", row["per_worker"])
    print(
        f"input pipeline throughput ({result['examples']} examples, source {result['source']}, "
        f"augment={result['augment']}, {result['pose_dtype']} poses, "
        f"{result['machine']['cpus']} CPUs)"
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
    for reader, workers in result["workers_per_accelerator"].items():
        print(
            f"{reader}: {workers} worker processes (CPU cores) per accelerator to feed "
            f"{result['step_rate']:g} samples/s"
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
    p.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"),
        help="dtype of the packed shards' points",
    )  # fmt: skip
    p.add_argument(
        "--pose_dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the batches' poses (data.pose_dtype; auto: the config's 16-bit "
        "model.dtype, else float32)",
    )  # fmt: skip
    p.add_argument("--no_augment", action="store_true", help="skip temporal augmentation")
    p.add_argument("--text_model", default="minilm", help="tokenizer (folder, hub name, minilm)")
    p.add_argument(
        "--step_rate", type=float, default=2000.0,
        help="samples/s one accelerator consumes (default: the H100 target of BENCHMARKS.md), "
        "for the workers-per-accelerator line",
    )  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(run=bench_input, show=print_input)


# ---------------------------------------------------------------------------------------------
# train

# Dense peak TFLOP/s of one device: (device-kind substring, 16-bit, float32). The float32
# column is what a float32 matmul runs at by default: TF32 tensor cores on Ampere and later
# GPUs (XLA's default precision; the twin enables TF32 to match), one bf16 pass on TPUs.
# Matched in order, first hit wins (device kinds: "NVIDIA H100 80GB HBM3", "TPU v5 lite", ...).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 494.7),  # H200 SXM; also matches GH200 (an H100-class GPU, same rates)
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7),  # H100 SXM
    ("A100", 312.0, 156.0),
    ("TPU v6 lite", 918.0, 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),  # v5e
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5", 459.0, 459.0),  # v5p reports "TPU v5" (or "TPU v5p")
    ("TPU v4", 275.0, 275.0),
)

# Spreadthesign English poses (reference section 6.4): 453,261 clips, mean 97.8 frames,
# median 89, truncated to 256. Modelled as a log-normal with that median and mean:
# mu = ln 89, sigma = sqrt(2 ln(97.8 / 89)) = 0.434; rounded, clipped to [1, max_frames].
ST_MEDIAN_FRAMES = 89.0
ST_MEAN_FRAMES = 97.8

# Captions "<en> <ase> {text}": the two tags are 7 word pieces ("<", "en", ">", "<", "as",
# "##e", ">"), the text 1 + Poisson(1.5) (single words and short phrases), plus [CLS], [SEP].
PROMPT_TAG_PIECES = 7
TEXT_EXTRA_PIECES_MEAN = 1.5

# `--bert` shortcuts. "tiny" is a random BERT for smoke tests (MiniLM's vocabulary, so the
# bundled tokenizer's [CLS]/[SEP] ids fit); the others are real architectures, no download.
BERT_SHORTCUTS = ("tiny", "minilm", "bert-base-cased", "bert-base-uncased")

# Model keys a config file may lack but `--config.KEY=` may set (model.model_config reads them).
OPTIONAL_KEYS = (
    "model.bert", "model.hidden_dropout", "model.attention_dropout", "model.cls_token_id",
    "model.sep_token_id", "model.max_frames",
)  # fmt: skip



def forward_flops_per_sample(
    model_config: SignCLIPConfig, frames: int, text_len: int
) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one example's forward pass, by part.

    model_config: a SignCLIPConfig. frames: padded pose length L (every padded frame is
    computed); the video BERT sees L + 2 tokens ([CLS], frames, [SEP]). text_len: padded
    caption length S. Per BERT layer and token of a T-token sequence: 2 (4 H^2 + 2 H I) for the
    Q, K, V, output and feed-forward projections, plus 4 T H for the attention scores and
    the probability-weighted values (all heads). Embedding lookups, LayerNorm, GELU, softmax
    and the pooling are not matmuls; the loss (4 B H per example) is negligible and left out.
    """
    bert = model_config.bert
    h, inter = bert.hidden_size, bert.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)

    def tower(tokens: int, layers: int) -> tuple[int, int]:
        return layers * tokens * per_token_layer, layers * 4 * tokens * tokens * h

    video_dense, video_attention = tower(frames + 2, model_config.video_layers)
    text_dense, text_attention = tower(text_len, bert.num_hidden_layers)
    return {
        "frame_mlp": 2 * frames * (model_config.pose_dim * h + h * h),
        "video_dense": video_dense,
        "video_attention": video_attention,
        "text_dense": text_dense,
        "text_attention": text_attention,
        "projection": 2 * 2 * h * h if model_config.projection != "none" else 0,
    }


def train_flops_per_sample(model_config: SignCLIPConfig, frames: int, text_len: int) -> int:
    """Model FLOPs of one training example: 3 x the forward matmul FLOPs (the backward pass
    costs two forwards: gradients w.r.t. activations and w.r.t. weights). Re-computation
    (GradCache's extra forward with microbatches > 1, remat) is not counted: MFU convention.

    bert-base-cased, 12 video layers, 256 frames, 63 text tokens: 173.0 GFLOP.
    """
    return 3 * sum(forward_flops_per_sample(model_config, frames, text_len).values())


def spreadthesign_lengths(rng: np.random.Generator, n: int, max_frames: int = 256) -> np.ndarray:
    """n pose lengths [n] int from the Spreadthesign distribution (log-normal, see above)."""
    import numpy as np

    sigma = np.sqrt(2 * np.log(ST_MEAN_FRAMES / ST_MEDIAN_FRAMES))
    raw = rng.lognormal(np.log(ST_MEDIAN_FRAMES), sigma, size=n)
    return np.clip(np.rint(raw), 1, max_frames).astype(np.int32)


def caption_lengths(rng: np.random.Generator, n: int, text_len: int) -> np.ndarray:
    """n valid caption lengths [n] int ([CLS] .. [SEP]), clipped to text_len."""
    import numpy as np

    pieces = 2 + PROMPT_TAG_PIECES + 1 + rng.poisson(TEXT_EXTRA_PIECES_MEAN, size=n)
    return np.minimum(pieces, text_len).astype(np.int32)


@dataclasses.dataclass
class BatchPlan:
    """The shapes of the timed steps: row lengths, padded length and caption lengths."""

    lengths: np.ndarray  # [steps, B] int: real frames per row
    padded: np.ndarray  # [steps] int: the frame axis of each step's batch
    text_lengths: np.ndarray  # [steps, B] int: valid caption tokens per row
    text_len: int  # S, the caption axis

    @property
    def steps(self) -> int:
        return len(self.padded)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[1])

    def masks(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(pose_mask [B, L_step], text_mask [B, S]) bool."""
        import numpy as np

        frames = np.arange(int(self.padded[step]))[None]
        tokens = np.arange(self.text_len)[None]
        return (
            frames < self.lengths[step][:, None],
            tokens < self.text_lengths[step][:, None],
        )

    def summary(self) -> dict[str, Any]:
        useful = float(self.lengths.sum()) / float(self.padded.sum() * self.batch_size)
        return {
            "mean_pose_frames": float(self.lengths.mean()),
            "mean_padded_frames": float(self.padded.mean()),
            "useful_frame_fraction": useful,
            "padded_lengths": [int(x) for x in self.padded],
            "text_len": self.text_len,
            "mean_caption_tokens": float(self.text_lengths.mean()),
        }


def plan_batches(
    *,
    steps: int,
    batch_size: int,
    max_frames: int,
    text_len: int,
    frames: int | None = None,
    buckets: tuple[int, ...] = (),
    sort_by_length: bool = False,
    seed: int = 0,
) -> BatchPlan:
    """Row lengths of `steps` batches of `batch_size`.

    frames given: every batch is padded to `frames` (rows hold up to `frames` real frames).
    Else each batch is padded to the smallest of `buckets` + (max_frames,) that fits its
    longest row (data.length_buckets, as the input pipeline does). sort_by_length: the
    steps x batch_size rows are sorted by length before they are cut into batches (what a
    length-bucketing sampler does), then the batches are shuffled.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    cap = frames if frames is not None else max_frames
    lengths = spreadthesign_lengths(rng, steps * batch_size, cap)
    if sort_by_length:
        lengths = np.sort(lengths)
    lengths = lengths.reshape(steps, batch_size)
    if sort_by_length:
        lengths = lengths[rng.permutation(steps)]
    if frames is not None:
        padded = np.full(steps, frames, np.int32)
    else:
        allowed = (*sorted({b for b in buckets if 0 < b < max_frames}), max_frames)
        padded = np.array([min(a for a in allowed if a >= row.max()) for row in lengths], np.int32)
    texts = caption_lengths(rng, steps * batch_size, text_len).reshape(steps, batch_size)
    return BatchPlan(lengths=lengths, padded=padded, text_lengths=texts, text_len=text_len)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of one device of this kind for `dtype` matmuls; None if unknown."""
    for pattern, half, single in PEAK_TFLOPS:
        if pattern.lower() in device_kind.lower():
            return single if dtype == "float32" else half
    return None


def train_config(args: argparse.Namespace):
    """The training config the benchmark runs: the file, then --bert, then --config.* and
    --set overrides, then the dedicated flags (batch size, dtype, attention, remat, ...)."""
    # No --config: the original recipe (configs/spreadthesign.py without an argument).
    config = config_lib.load_config_file(args.config) if args.config else config_lib.base_config()
    if args.bert:
        from signclip_jax.model.bert import PRESETS, TINY_BERT, BertConfig

        if args.bert == "tiny":
            bert, text_model = dict(TINY_BERT), "minilm"
            # MiniLM's [CLS]/[SEP] ids, set here so that no tokenizer is loaded.
            config.model.cls_token_id, config.model.sep_token_id = 101, 102
        elif args.bert == "minilm":
            bert, text_model = BertConfig.from_hf("minilm").to_dict(), "minilm"
        else:
            bert, text_model = PRESETS[args.bert].to_dict(), args.bert
        config.model.bert = bert
        config.model.text_model = text_model
        # The video tower takes the first layers of this BERT: at most all of them.
        config.model.video_layers = min(config.model.video_layers, bert["num_hidden_layers"])
    config = config_lib.apply_overrides(
        config, [f"{key}={raw}" for key, raw in args.overrides], new_keys=OPTIONAL_KEYS
    )
    flags = {
        "batch_size": args.batch_size,
        "microbatches": args.microbatches,
        "model.dtype": args.dtype,
        "model.attention": args.attention,
        "model.remat": True if args.remat else None,
        "seed": args.seed,
    }
    for key, value in flags.items():
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (config[section] if section else config)[leaf] = value
    config.model.pretrained = False  # random init: a benchmark needs no weights
    return config


def _check_counts(args: argparse.Namespace) -> None:
    minimum = {"steps": 1, "repeats": 1, "warmup": 0, "batch_size": 1, "microbatches": 1,
               "frames": 1, "devices": 1, "twin_threads": 1}  # fmt: skip
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")
    if args.sort_by_length and not args.lengths:
        raise UserError("--sort_by_length needs --lengths=spreadthesign")


def _max_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _timing(repeat_s: list[float], steps: int, batch_size: int, step_flops: float,
            peak: float | None) -> dict[str, Any]:  # fmt: skip
    """samples/s, step ms, TFLOP/s and MFU from the per-repeat wall times."""
    import statistics

    median = statistics.median(repeat_s)
    tflops = step_flops * steps / median / 1e12
    return {
        "repeat_s": repeat_s,
        "step_ms": 1000 * median / steps,
        "samples_per_s": batch_size * steps / median,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
    }


class _JaxBench:
    """The JAX side: mesh and checks first (cheap, before the twin runs), then the timing."""

    def __init__(self, config, mcfg, plan: BatchPlan, args: argparse.Namespace):
        import jax

        from signclip_jax.train import sharding

        jax.config.update("jax_threefry_partitionable", True)  # as train.py
        if jax.process_count() > 1:
            raise UserError("bench train runs in one process (the mesh spans its local devices)")
        devices = jax.local_devices()
        if args.devices is not None:
            if args.devices > len(devices):
                raise UserError(f"--devices={args.devices}: only {len(devices)} devices")
            devices = devices[: args.devices]
        if mcfg.attention == "cudnn" and devices[0].platform != "gpu":
            raise UserError(
                f"--attention=cudnn needs a GPU (devices here: {devices[0].platform}); "
                "use xla or auto"
            )
        self.mesh = sharding.make_mesh(
            tuple(config.mesh.shape), tuple(config.mesh.axes), devices=devices
        )
        self.batch_axes = tuple(a for a in config.mesh.axes if a in ("data", "fsdp"))
        shards = sharding.num_batch_shards(self.mesh, self.batch_axes)
        if plan.batch_size % (shards * config.microbatches):
            raise UserError(
                f"batch_size {plan.batch_size} must divide evenly over {shards} batch shards x "
                f"{config.microbatches} microbatches"
            )
        self.config, self.mcfg, self.plan, self.args = config, mcfg, plan, args
        self.devices = devices

    def _batches(self) -> list[dict[str, Any]]:
        """One device batch per step; the random poses are made on the devices, one array
        per padded length (only the masks differ between steps of the same length)."""
        import jax
        import numpy as np

        from signclip_jax.data import pipeline
        from signclip_jax.train import sharding

        plan, mcfg = self.plan, self.mcfg
        shard = sharding.batch_sharding(self.mesh, self.batch_axes)
        key = jax.random.key(self.config.seed)
        poses = {}
        dtype = pipeline.numpy_dtype(pipeline.settings_from_config(self.config).pose_dtype)
        for i, length in enumerate(sorted({int(x) for x in plan.padded})):
            shape = (plan.batch_size, length, mcfg.pose_dim)
            make = jax.jit(lambda k, s=shape: jax.random.normal(k, s, dtype), out_shardings=shard)
            poses[length] = make(jax.random.fold_in(key, i))
        rng = np.random.default_rng(self.config.seed)
        vocab = mcfg.bert.vocab_size
        batches = []
        for step in range(plan.steps):
            pose_mask, text_mask = plan.masks(step)
            ids = rng.integers(min(1000, vocab // 2), vocab, size=text_mask.shape).astype(np.int32)
            rows = np.arange(plan.batch_size)
            ids[:, 0] = mcfg.cls_token_id
            ids[rows, plan.text_lengths[step] - 1] = mcfg.sep_token_id
            ids[~text_mask] = 0
            host = {"pose_mask": pose_mask, "text_ids": ids, "text_mask": text_mask}
            batch = sharding.shard_batch(host, self.mesh, self.batch_axes)
            batch["pose"] = poses[int(plan.padded[step])]
            batches.append(batch)
        return batches

    def run(self) -> dict[str, Any]:
        import jax
        from flax import nnx

        from signclip_jax.model import signclip as signclip_model
        from signclip_jax.train import step as train_step_lib

        config, mcfg, plan, args = self.config, self.mcfg, self.plan, self.args
        model = signclip_model.SignCLIP(mcfg, rngs=nnx.Rngs(config.seed, dropout=config.seed + 1))
        params = signclip_model.count_params(model)
        dtype = signclip_model.DTYPES[mcfg.dtype]
        attention = signclip_model._attention_impl(mcfg.attention, dtype)  # what "auto" chose
        if mcfg.bert.attention_probs_dropout_prob > 0:
            # Training with attention dropout runs the explicit softmax (bert.BertSelfAttention).
            attention = f"explicit (attention dropout {mcfg.bert.attention_probs_dropout_prob})"
        total = args.warmup + args.steps * args.repeats
        fns = train_step_lib.make_train_step(config, model, self.mesh, self.batch_axes, total)
        del model  # its arrays now live (donated) in fns.state
        batches = self._batches()
        options = {"xla_backend_optimization_level": 0} if args.fast_compile else None

        # Ahead-of-time compile, one executable per padded length; the timed loop calls them.
        compiled, compile_s, xla = {}, {}, {}
        for i, length in enumerate(int(x) for x in plan.padded):
            if length in compiled:
                continue
            start = time.perf_counter()
            compiled[length] = fns.step.lower(fns.state, batches[i]).compile(options)
            compile_s[length] = time.perf_counter() - start
            xla[length] = _xla_estimates(compiled[length])

        state = fns.state
        metrics = None

        def steps(n: int):
            nonlocal state, metrics
            for j in range(n):
                i = j % plan.steps
                state, metrics = compiled[int(plan.padded[i])](state, batches[i])
            jax.block_until_ready((state, metrics))

        try:
            steps(args.warmup)
            repeat_s = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                steps(plan.steps)
                repeat_s.append(time.perf_counter() - start)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e):
                raise UserError(
                    f"out of device memory at batch {plan.batch_size}: lower --batch_size, or "
                    "use --microbatches / --remat"
                ) from None
            raise
        loss = float(metrics["loss"])
        memory, measure = _jax_peak_memory(self.devices)  # before profiling can add to it
        profile = None
        if args.profile:
            with jax.profiler.trace(args.profile):
                steps(2)
            profile = summarize_trace(args.profile, steps=2)
        step_flops = _step_flops(mcfg, plan)
        kind = self.devices[0].device_kind
        peak = peak_tflops(kind, mcfg.dtype)
        return {
            "impl": "jax",
            "device": kind,
            "devices": len(self.devices),
            "compile_s": sum(compile_s.values()),
            "compile_s_by_length": {str(k): v for k, v in compile_s.items()},
            **_timing(
                repeat_s,
                plan.steps,
                plan.batch_size,
                step_flops,
                peak * len(self.devices) if peak else None,
            ),
            "peak_memory_bytes": memory,
            "memory_measure": measure,
            "loss": loss,
            "attention": attention,
            "pose_dtype": str(batches[0]["pose"].dtype),  # data.pose_dtype, as training feeds
            "params": params,
            "xla": {str(k): v for k, v in xla.items()},
            "peak_tflops_per_device": peak,
            "profile": profile,
        }


# Kernel-name patterns -> what the time is spent on (first match wins).
TRACE_CATEGORIES = (
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("attention (cuDNN)", ("cudnn", "sdpa", "flash")),
    ("random bits (dropout)", ("xor", "threefry", "philox", "rng")),
    ("copies", ("memcpy", "memset", "copy")),
)


def summarize_trace(trace_dir: str, steps: int, top_kernels: int = 20) -> dict[str, Any] | None:
    """Device time per step by kernel category, from the newest `*.trace.json.gz` under
    `trace_dir` (what `jax.profiler.trace` writes). None when the trace has no device
    timeline (CPU). "other fusions" holds XLA's elementwise and reduction kernels.
    `top_kernels`: how many of the costliest kernels (by name, with ms and launches per step)
    to list."""
    import gzip

    traces = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        return None
    with gzip.open(traces[-1]) as f:
        events = json.load(f).get("traceEvents", [])
    devices = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    ms: dict[str, float] = {}
    kernels: dict[str, list] = {}  # name -> [ms per step, launches per step]
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in devices:
            continue
        name = str(e.get("name", ""))
        low = name.lower()
        kind = next((k for k, pats in TRACE_CATEGORIES if any(p in low for p in pats)), None)
        kind = kind or "other fusions"
        dur = float(e.get("dur", 0)) / 1e3 / steps
        ms[kind] = ms.get(kind, 0.0) + dur
        entry = kernels.setdefault(name, [0.0, 0.0])
        entry[0] += dur
        entry[1] += 1 / steps
    if not ms:
        return None
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top_kernels]
    return {"device_ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": k, "ms_per_step": v[0], "launches_per_step": v[1]}
                            for k, v in top],
            "trace": str(traces[-1])}  # fmt: skip


def _step_flops(mcfg, plan: BatchPlan) -> float:
    """Mean model FLOPs of one step of the plan."""
    per_step = [
        plan.batch_size * train_flops_per_sample(mcfg, int(length), plan.text_len)
        for length in plan.padded
    ]
    return sum(per_step) / len(per_step)


def _xla_estimates(compiled) -> dict[str, Any]:
    """XLA's own view of the compiled step (per device): memory it needs and its FLOP count
    (which includes elementwise and optimizer work, and counts a loop body once)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        m = compiled.memory_analysis()
        out["memory_bytes_per_device"] = int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    with contextlib.suppress(Exception):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["flops_per_device"] = float(cost["flops"])
    return out


def _jax_peak_memory(devices) -> tuple[int, str]:
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        return int(max(peaks)), "device peak_bytes_in_use (max over devices)"
    return _max_rss_bytes(), "process max RSS (no device memory stats)"


# -- the PyTorch twin, in a child process: its own device memory, no CUDA library clash with
# -- JAX, and its own max RSS on CPU.


def time_twin(spec: dict[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """TorchSignCLIP train steps (Adam, clip-norm, the signclip loss) on the plan's shapes.

    bf16 autocast on GPU for a 16-bit dtype (TF32 matmuls for float32, as XLA's default),
    fp32 on CPU. With microbatches > 1 the same GradCache scheme as the JAX step: embed all
    microbatches without gradients, the full-batch loss, then re-run each microbatch with
    the same dropout seed and backpropagate its embedding gradients.
    """
    import statistics

    import torch

    from signclip_jax.interop.torch_twin import TorchSignCLIP

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    half = on_gpu and spec["dtype"] != "float32"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(spec["seed"])
    model = TorchSignCLIP(spec["model_config"], attn_implementation=spec["attention"])
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = spec["optimizer"]
    opt = torch.optim.Adam(
        params, lr=opt_cfg["lr"], betas=(opt_cfg["b1"], opt_cfg["b2"]), eps=opt_cfg["eps"],
        fused=on_gpu,
    )  # fmt: skip
    mcfg = spec["model_config"]
    b, m = plan.batch_size, spec["microbatches"]
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    poses = {
        int(length): torch.randn(b, int(length), mcfg["pose_dim"], generator=gen, device=device)
        for length in sorted({int(x) for x in plan.padded})
    }
    vocab = mcfg["bert"]["vocab_size"]
    batches = []
    for step in range(plan.steps):
        pose_mask, text_mask = (torch.from_numpy(x).to(device) for x in plan.masks(step))
        ids = torch.randint(min(1000, vocab // 2), vocab, text_mask.shape, generator=gen,
                            device=device)  # fmt: skip
        ids[:, 0] = mcfg["cls_token_id"]
        rows = torch.arange(b, device=device)
        ids[rows, torch.from_numpy(plan.text_lengths[step] - 1).to(device).long()] = mcfg[
            "sep_token_id"
        ]
        ids[~text_mask] = 0
        batches.append((poses[int(plan.padded[step])], pose_mask, ids, text_mask))

    def loss_fn(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = v.float() @ t.float().T  # the original MMContraLoss: raw dot products
        labels = torch.arange(len(v), device=device)
        ce = torch.nn.functional.cross_entropy
        return ce(logits, labels) + ce(logits.T, labels)

    def embed(batch, seed: int):
        torch.manual_seed(seed)  # the same dropout masks in both GradCache passes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            return model(*batch)

    counter = [0]

    def train_step(batch) -> torch.Tensor:
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        if m == 1:
            loss = loss_fn(*embed(batch, counter[0]))
            loss.backward()
        else:
            micro = list(zip(*(x.chunk(m) for x in batch)))
            seeds = [counter[0] * m + i for i in range(m)]
            with torch.no_grad():
                embs = [embed(mb, s) for mb, s in zip(micro, seeds)]
            v = torch.cat([e[0] for e in embs]).float().requires_grad_()
            t = torch.cat([e[1] for e in embs]).float().requires_grad_()
            loss = loss_fn(v, t)
            loss.backward()
            for i, (mb, s) in enumerate(zip(micro, seeds)):
                rows = slice(i * (b // m), (i + 1) * (b // m))
                pv, pt = embed(mb, s)
                torch.autograd.backward([pv.float(), pt.float()], [v.grad[rows], t.grad[rows]])
        torch.nn.utils.clip_grad_norm_(params, opt_cfg["clip_norm"])
        opt.step()
        return loss

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def run(n: int) -> torch.Tensor:
        loss = None
        for j in range(n):
            loss = train_step(batches[j % plan.steps])
        sync()
        return loss

    start = time.perf_counter()
    run(1)  # eager: no compile, but the first step pays cuBLAS/cuDNN set-up
    first = time.perf_counter() - start
    run(max(spec["warmup"] - 1, 0))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    repeat_s = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        loss = run(plan.steps)
        repeat_s.append(time.perf_counter() - start)
    if on_gpu:
        memory, measure = torch.cuda.max_memory_allocated(device), "torch max_memory_allocated"
        kind = torch.cuda.get_device_name(device)
    else:
        memory, measure = _max_rss_bytes(), "process max RSS (twin process)"
        kind = "cpu"
    return {
        "impl": "torch twin",
        "device": kind,
        "devices": 1,
        "compile_s": None,
        "first_step_s": first,
        "repeat_s": repeat_s,
        "median_s": statistics.median(repeat_s),
        "peak_memory_bytes": int(memory),
        "memory_measure": measure,
        "loss": float(loss.detach()),
        "attention": spec["attention"],
        "precision": "bf16 autocast" if half else ("tf32" if on_gpu else "fp32"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def twin_main(argv: list[str]) -> int:
    """Child-process entry: `twin_main([spec.json, plan.npz, out.json])`."""
    import numpy as np

    spec_path, plan_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    with np.load(plan_path) as z:
        plan = BatchPlan(z["lengths"], z["padded"], z["text_lengths"], int(z["text_len"]))
    try:
        result = time_twin(spec, plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files.write_json_atomic(out_path, result)
    return 0


def run_twin(spec: dict[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """`time_twin` in a fresh Python process; {"impl", "error"} when it fails."""
    import subprocess

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="scj-twin-") as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec))
        np.savez(tmp / "plan.npz", lengths=plan.lengths, padded=plan.padded,
                 text_lengths=plan.text_lengths, text_len=plan.text_len)  # fmt: skip
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
        code = (
            "import sys; from signclip_jax.tools.bench import twin_main; "
            "sys.exit(twin_main(sys.argv[1:]))"
        )
        files = [str(tmp / f) for f in ("spec.json", "plan.npz", "out.json")]
        proc = subprocess.run(
            [sys.executable, "-c", code, *files], env=env, capture_output=True, text=True
        )
        if proc.returncode == 0:
            return json.loads((tmp / "out.json").read_text())
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    log.warning("the PyTorch twin failed (exit %d):\n%s", proc.returncode, proc.stderr[-3000:])
    return {"impl": "torch twin", "error": lines[-1] if lines else f"exit {proc.returncode}"}


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    _check_counts(args)
    config = train_config(args)
    from signclip_jax.model import signclip as signclip_model

    mcfg = signclip_model.model_config(config)
    frames = args.frames if not args.lengths else None
    if frames is None and not args.lengths:
        frames = mcfg.max_frames
    if frames is not None and frames > mcfg.max_frames:
        raise UserError(f"--frames={frames} exceeds the model's max_frames={mcfg.max_frames}")
    buckets = tuple(config.data.get("length_buckets", ()) or ())
    plan = plan_batches(
        steps=args.steps, batch_size=config.batch_size, max_frames=mcfg.max_frames,
        text_len=int(config.data.text_max_len) - 1, frames=frames, buckets=buckets,
        sort_by_length=args.sort_by_length, seed=config.seed,
    )  # fmt: skip
    if args.twin:
        # The twin runs first, in its own process, while JAX holds no device memory yet: no
        # up-front grab of 75% of the GPU, so the twin finds the memory free.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from signclip_jax.train.monitor import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache)  # the config's cache is not used here
    jax_bench = _JaxBench(config, mcfg, plan, args)  # checks devices and divisibility first

    results = []
    if args.twin:
        opt = config.optimizer
        spec = {
            "model_config": mcfg.to_dict(),
            "dtype": mcfg.dtype,
            "microbatches": int(config.microbatches),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": int(config.seed),
            "attention": args.twin_attention,
            "threads": args.twin_threads,
            "optimizer": {"lr": float(opt.lr), "b1": float(opt.b1), "b2": float(opt.b2),
                          "eps": float(opt.eps), "clip_norm": float(opt.clip_norm)},
        }  # fmt: skip
        twin = run_twin(spec, plan)
    try:
        jax_result = jax_bench.run()
    except UserError as e:
        if not args.twin:
            raise
        # Keep the twin's numbers (it ran first); the table shows the JAX error.
        log.error("the JAX step failed: %s", e)
        jax_result = {"impl": "jax", "error": str(e)}
    results.append(jax_result)
    step_flops = _step_flops(mcfg, plan)
    if args.twin:
        if "repeat_s" in twin:
            peak = peak_tflops(twin["device"], "float32" if twin["precision"] != "bf16 autocast"
                               else "bfloat16")  # fmt: skip
            twin.update(_timing(twin["repeat_s"], plan.steps, plan.batch_size, step_flops, peak))
            twin["peak_tflops_per_device"] = peak
        results.append(twin)

    import jax

    ratio = None
    if args.twin and "samples_per_s" in results[-1] and "samples_per_s" in jax_result:
        ratio = jax_result["samples_per_s"] / results[-1]["samples_per_s"]
    mean_padded = float(plan.padded.mean())
    return {
        "mode": "train",
        "config": args.config or "base_config (the original recipe)",
        "overrides": [f"{k}={v}" for k, v in args.overrides],
        "model": {
            "text_model": mcfg.text_model,
            "hidden_size": mcfg.hidden_size,
            "text_layers": mcfg.bert.num_hidden_layers,
            "video_layers": mcfg.video_layers,
            "intermediate_size": mcfg.bert.intermediate_size,
            "projection": mcfg.projection,
            "dtype": mcfg.dtype,
            "attention": mcfg.attention,
            "remat": mcfg.remat,
            "params": jax_result["params"]["total"] if "params" in jax_result else None,
        },
        "batch": {
            "batch_size": plan.batch_size,
            "microbatches": int(config.microbatches),
            "lengths": args.lengths or "fixed",
            "frames": frames,
            "length_buckets": list(buckets) if args.lengths else [],
            "sort_by_length": args.sort_by_length,
            **plan.summary(),
        },
        "flops": {
            "train_flops_per_sample": step_flops / plan.batch_size,
            "at_mean_padded_frames": mean_padded,
            "forward_by_part": forward_flops_per_sample(mcfg, round(mean_padded), plan.text_len),
            "formula": "3 x forward matmul FLOPs (see BENCHMARKS.md)",
        },
        "timing": {
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "fast_compile": args.fast_compile,
            "compilation_cache": args.compilation_cache,
        },
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": jax_bench.devices[0].device_kind,
            "devices": len(jax_bench.devices),
            "jax_version": jax.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "prng_impl": str(jax.config.jax_default_prng_impl),
        },
        "results": results,
        "jax_over_twin": ratio,
    }


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def print_train(result: dict[str, Any]) -> None:
    m, b, f = result["model"], result["batch"], result["flops"]
    machine = result["machine"]
    print(
        f"train step throughput: {m['text_model']} (hidden {m['hidden_size']}, "
        f"{m['video_layers']} video / {m['text_layers']} text layers"
        + (f", {m['params'] / 1e6:.1f}M params" if m["params"] else "")
        + f"), {m['dtype']}, attention {m['attention']}, remat={m['remat']}"
    )
    frames = (f"frames {b['frames']}" if b["lengths"] == "fixed"
              else f"lengths {b['lengths']} (buckets {b['length_buckets'] or 'none'}"
                   f"{', sorted' if b['sort_by_length'] else ''})")  # fmt: skip
    print(
        f"batch {b['batch_size']} x {b['microbatches']} microbatch(es), {frames}: mean padded "
        f"{b['mean_padded_frames']:.1f} frames, useful {100 * b['useful_frame_fraction']:.1f}%, "
        f"text {b['text_len']} tokens; {f['train_flops_per_sample'] / 1e9:.3f} GFLOP/sample "
        f"(3 x forward)"
    )
    print(
        f"{machine['devices']} x {machine['device_kind']}, jax {machine['jax_version']}, "
        f"{result['timing']['steps']} steps x {result['timing']['repeats']} repeats"
        + (" (fast_compile: XLA opt level 0)" if result["timing"]["fast_compile"] else "")
    )
    rows = []
    for r in result["results"]:
        row = dict(r)
        if "error" in r:
            print(f"{r['impl']}: FAILED: {r['error']}")
            continue
        row["startup"] = r["compile_s"] if r.get("compile_s") is not None else r["first_step_s"]
        row["what"] = "compile" if r.get("compile_s") is not None else "first step"
        row["mfu_pct"] = 100 * r["mfu"] if r.get("mfu") is not None else None
        row["memory"] = _gib(r["peak_memory_bytes"])
        rows.append(row)
    print(
        _table(
            rows,
            [
                ("impl", "impl", "s"),
                ("samples_per_s", "samples/s", ".2f"),
                ("step_ms", "step ms", ".1f"),
                ("startup", "startup s", ".1f"),
                ("what", "startup", "s"),
                ("tflops", "TFLOP/s", ".4g"),
                ("mfu_pct", "MFU %", ".1f"),
                ("memory", "peak GiB", "s"),
                ("memory_measure", "memory measured as", "s"),
                ("loss", "loss", ".3f"),
            ],
        )
    )
    if any(r.get("mfu") is None for r in rows):
        print("MFU: n/a where the device's peak FLOP/s is unknown (CPU)")
    if result["jax_over_twin"] is not None:
        print(f"JAX / twin samples/s: {result['jax_over_twin']:.2f}x")
    for r in result["results"]:
        if r.get("profile"):
            parts = r["profile"]["device_ms_per_step"]
            total = sum(parts.values())
            print(f"device time per step ({total:.1f} ms, from {r['profile']['trace']}): "
                  + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                              for k, v in parts.items()))  # fmt: skip
            for k in r["profile"].get("top_kernels", [])[:10]:
                ms, n = k["ms_per_step"], k["launches_per_step"]
                print(f"  {ms:8.2f} ms  x{n:<5g} {k['name'][:90]}")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train-step throughput (samples/s, MFU, memory) of random-init models",
        description="Times TrainStep.step on random batches of the given shape. Config "
        "overrides: --config.KEY=VALUE or --set KEY=VALUE (e.g. --config.model.text_model="
        "minilm, --set data.length_buckets='(64,128,192)'). MFU uses an analytic FLOP count "
        "(3 x forward matmul FLOPs) and a table of peak FLOP/s; see BENCHMARKS.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--config",
        help="training config CONFIG.py[:arg] (default: the original recipe, base_config())",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, same as --config.KEY=VALUE (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--bert",
        choices=BERT_SHORTCUTS,
        help="BERT architecture shortcut (sets model.bert and model.text_model)",
    )
    p.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--frames", type=int, help="pad every batch to this many frames "
                       "(default: data.max_frames)")  # fmt: skip
    shape.add_argument(
        "--lengths", choices=("spreadthesign",),
        help="draw pose lengths from the Spreadthesign distribution; pad each batch to the "
        "data.length_buckets bucket of its longest row",
    )  # fmt: skip
    p.add_argument(
        "--sort_by_length",
        action="store_true",
        help="with --lengths: batch rows of similar length together",
    )
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="model.dtype")
    p.add_argument("--attention", choices=("xla", "cudnn", "auto"), help="model.attention")
    p.add_argument("--remat", action="store_true", help="model.remat (per-layer)")
    p.add_argument("--microbatches", type=int, help="GradCache microbatches (config.microbatches)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--devices", type=int, help="use the first N local devices (default all)")
    p.add_argument("--seed", type=int, help="config.seed (random init and batches)")
    p.add_argument(
        "--twin",
        action="store_true",
        help="also time the PyTorch twin (in a child process) on the same shapes",
    )
    p.add_argument(
        "--twin_attention",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="transformers attention implementation of the twin",
    )
    p.add_argument(
        "--twin_threads", type=int,
        help="torch intra-op threads of the twin on CPU (default: torch's choice; 1 is far "
        "faster than spin-waiting threads on a loaded machine)",
    )  # fmt: skip
    p.add_argument(
        "--fast_compile", action="store_true",
        help="XLA backend optimisation level 0: compiles several times faster on CPU, runs "
        "slower; for smoke tests, not for numbers",
    )  # fmt: skip
    p.add_argument(
        "--compilation_cache", metavar="DIR",
        help="persistent XLA compilation cache (off by default, so that 'compile' is a real "
        "compile; with it, a repeated shape's compile time is a cache read)",
    )  # fmt: skip
    p.add_argument(
        "--profile", metavar="DIR",
        help="after timing, trace 2 more JAX steps with jax.profiler into DIR (view with xprof "
        "or TensorBoard's profile plugin)",
    )  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(run=bench_train, show=print_train, overrides=[])


# ---------------------------------------------------------------------------------------------
# CLI

# name -> function adding the subcommand's parser (which sets run= and show= defaults).
# ---------------------------------------------------------------------------------------------
# lengths


def _ints(raw: str, error: str) -> list[int]:
    """Comma-separated integers ("1,2,3") -> [1, 2, 3]; UserError(error) on anything else."""
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise UserError(error) from None


def _bucket_set(raw: str) -> tuple[int, ...]:
    if raw.strip().lower() in ("", "none", "()"):
        return ()
    values = tuple(
        _ints(
            raw.replace("(", "").replace(")", ""),
            f"--buckets wants comma-separated frame counts or none, got {raw!r}",
        )
    )
    if any(v <= 0 for v in values):
        raise UserError(f"--buckets values must be > 0, got {raw!r}")
    return values


def bench_lengths(args: argparse.Namespace) -> dict[str, Any]:
    """Padding and training FLOPs per clip of length buckets, with and without length grouping,
    on the Spreadthesign length model: how much bucketing can save, before any timing."""
    import numpy as np

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    windows = _ints(
        args.windows, f"--windows must be comma-separated integers, got {args.windows!r}"
    )
    if not windows or min(windows) < 1:
        raise UserError(f"--windows must be integers >= 1, got {args.windows!r}")
    config = train_config(args)  # the train-only flags are unset defaults (_add_lengths)
    from signclip_jax.model import signclip as signclip_model

    mcfg = signclip_model.model_config(config)
    text_len = int(config.data.text_max_len) - 1
    batch, top = int(config.batch_size), int(mcfg.max_frames)
    bucket_sets = [_bucket_set(b) for b in args.buckets] if args.buckets else [()]
    if not args.buckets and tuple(config.data.get("length_buckets", ()) or ()):
        bucket_sets.append(tuple(config.data.length_buckets))
    full = train_flops_per_sample(mcfg, top, text_len)
    rows = []
    for buckets in bucket_sets:
        for window in windows:
            padded, real = [], []
            for seed in range(max(1, args.batches // window)):
                plan = plan_batches(
                    steps=window, batch_size=batch, max_frames=top, text_len=text_len,
                    buckets=buckets, sort_by_length=window > 1, seed=seed,
                )  # fmt: skip
                padded += [int(x) for x in plan.padded]
                real.append(plan.lengths)
            flops = float(np.mean([train_flops_per_sample(mcfg, x, text_len) for x in padded]))
            useful = float(np.concatenate(real).sum()) / (sum(padded) * batch)
            rows.append({
                "buckets": "none" if not buckets else ",".join(map(str, buckets)),
                "window": window, "batches": len(padded),
                "mean_padded_frames": float(np.mean(padded)), "useful_frame_fraction": useful,
                "train_gflop_per_sample": flops / 1e9, "speedup_bound": full / flops,
                "padded_lengths": sorted(set(padded)),
            })  # fmt: skip
    return {
        "mode": "lengths", "batch_size": batch, "max_frames": top, "text_len": text_len,
        "model": {"hidden_size": mcfg.hidden_size, "video_layers": mcfg.video_layers},
        "full_length_gflop_per_sample": full / 1e9, "results": rows,
    }  # fmt: skip


def print_lengths(result: dict[str, Any]) -> None:
    print(
        f"length buckets on the Spreadthesign length model (batch {result['batch_size']}, "
        f"max {result['max_frames']} frames: {result['full_length_gflop_per_sample']:.1f} "
        "GFLOP per clip; window = data.length_group_batches, 1 = random batches)"
    )
    for row in result["results"]:
        row["lengths_used"] = len(row["padded_lengths"])
        row["useful_pct"] = 100 * row["useful_frame_fraction"]
    print(
        _table(
            result["results"],
            [
                ("buckets", "buckets", "s"),
                ("window", "window", "d"),
                ("mean_padded_frames", "mean padded frames", ".1f"),
                ("useful_pct", "useful %", ".1f"),
                ("train_gflop_per_sample", "GFLOP/clip", ".1f"),
                ("speedup_bound", "x vs max_frames", ".2f"),
                ("lengths_used", "compiles", "d"),
            ],
        )
    )


def _add_lengths(sub) -> None:
    p = sub.add_parser(
        "lengths",
        help="padding and FLOPs of length buckets and length grouping (no model is run)",
        description="Mean padded frames, useful-frame fraction and analytic training FLOPs "
        "per clip for length buckets and length-grouping windows, on batches drawn from the "
        "Spreadthesign length model (as `train --lengths=spreadthesign`). The speed-up bound "
        "assumes the step time follows the FLOPs.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", help="training config (CONFIG.py[:arg]); default spreadthesign.py")
    p.add_argument("--bert", choices=BERT_SHORTCUTS, help="model.bert architecture (no download)")
    p.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    p.add_argument(
        "--buckets", action="append", metavar="F1,F2,...|none",
        help="a data.length_buckets set to compare (repeat the flag for several; default: none "
        "and the config's)",
    )  # fmt: skip
    p.add_argument(
        "--windows", default="1,8,32",
        help="data.length_group_batches values (comma-separated; 1 = random batches)",
    )  # fmt: skip
    p.add_argument("--batches", type=int, default=512, help="batches drawn per row")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", help="write the results as JSON here")
    # train_config reads these train flags; lengths leaves them to the config.
    p.set_defaults(microbatches=None, dtype=None, attention=None, remat=False, seed=None)
    p.set_defaults(run=bench_lengths, show=print_lengths)


MODES: dict[str, Callable[[Any], None]] = {
    "input": _add_input, "train": _add_train, "lengths": _add_lengths,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.bench",
        description="Throughput benchmarks; prints a table and optionally writes JSON.",
    )
    sub = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    for add in MODES.values():
        add(sub)
    return p


def _split_overrides(parser, args, extra: list[str]) -> None:
    """--config.KEY=VALUE leftovers and --set KEY=VALUE -> args.overrides [(KEY, VALUE)]."""
    overrides, unknown = [], []
    for item in extra:
        if item.startswith("--config.") and "=" in item:
            key, _, value = item[len("--config.") :].partition("=")
            overrides.append((key, value))
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.mode != "train":
        parser.error(f"--config.KEY=VALUE overrides are for the train mode, not {args.mode}")
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        overrides.append((key.removeprefix("config."), value))
    args.overrides = overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _split_overrides(parser, args, extra)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if hasattr(args, "workers") and isinstance(args.workers, str):
        args.workers = _ints(
            args.workers, f"--workers must be comma-separated integers, got {args.workers!r}"
        )
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    result = args.run(args)
    args.show(result)
    if args.out:
        files.write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0

