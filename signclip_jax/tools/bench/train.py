"""`bench train`: train-step throughput of a randomly initialised model on random batches.

The step is the training step itself (train.step.make_train_step), compiled ahead of time
for each padded length of the plan (plan.py), then timed in repeats: compile time,
samples/s, step ms, TFLOP/s and MFU from the analytic FLOP count (model/flops.py) and a table
of peak FLOP/s, peak memory. `--twin` also times the PyTorch twin on the same shapes, first
and in its own process (twin.py).

`--layout=padded,packed` times both batch layouts of the same model on the same clips (same
frame and caption lengths, the same pose values and caption ids), one run each: `padded` is
the original recipe's (each clip padded to the plan's length, captions to text_max_len - 1),
`packed` puts several clips in a row (data/clip_packing.py) and cuts the captions to the
batch's longest, rounded up to --text_multiple. The JSON's `runs` has one entry per layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from signclip_jax.data import clip_packing, pipeline
from signclip_jax.errors import UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.model.flops import (
    forward_flops_per_sample,
    packed_train_flops,
    train_flops_per_sample,
)
from signclip_jax.tools.bench.common import max_rss_bytes, table, timing
from signclip_jax.tools.bench.overrides import train_config
from signclip_jax.tools.bench.plan import BatchPlan, plan_batches
from signclip_jax.tools.bench.twin import run_twin
from signclip_jax.train import sharding
from signclip_jax.train import step as train_step_lib
from signclip_jax.train.monitor import enable_compilation_cache

log = logging.getLogger(__name__)

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


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of one device of this kind for `dtype` matmuls; None if unknown."""
    for pattern, half, single in PEAK_TFLOPS:
        if pattern.lower() in device_kind.lower():
            return single if dtype == "float32" else half
    return None


def _check_counts(args: argparse.Namespace) -> None:
    minimum = {"steps": 1, "repeats": 1, "warmup": 0, "batch_size": 1, "microbatches": 1,
               "frames": 1, "devices": 1, "twin_threads": 1}  # fmt: skip
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")
    if args.sort_by_length and not args.lengths:
        raise UserError("--sort_by_length needs --lengths=spreadthesign")
    layouts = layouts_of(getattr(args, "layout", "padded"))
    if "packed" in layouts and args.twin and layouts[0] != "padded":
        raise UserError("--twin times the padded layout: list padded first in --layout")
    for name in ("pack_row_len", "pack_row_multiple", "text_multiple"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")


LAYOUTS = ("padded", "packed")


def layouts_of(raw: str) -> list[str]:
    """--layout's comma list -> layout names (in order, no repeats); UserError otherwise."""
    names = [x.strip() for x in str(raw).split(",") if x.strip()]
    bad = [x for x in names if x not in LAYOUTS]
    if not names or bad or len(set(names)) != len(names):
        raise UserError(
            f"--layout wants a comma list of {', '.join(LAYOUTS)} (each once), got {raw!r}"
        )
    return names


class JaxBench:
    """The JAX side: mesh and checks first (cheap, before the twin runs), then the timing."""

    def __init__(self, config, mcfg, plan: BatchPlan, args: argparse.Namespace):
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

    def _packed_batches(
        self, padded: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The same clips as `padded` (each step's poses, caption ids and lengths), as the
        trainer's data.packing feeds them (train/step.py, InputLayout): the padded poses, the
        captions cut to the batch's longest and the slots of packed rows; the step gathers
        the rows on the devices (clip_packing.pack_on_device), so its time is counted.
        Returns (device batches, per-step {"rows", "text_len", "useful_token_fraction"})."""
        plan, mcfg, args = self.plan, self.mcfg, self.args
        row_len = args.pack_row_len or mcfg.max_frames + 2
        layout = train_step_lib.InputLayout(
            packing=True, max_frames=mcfg.max_frames, row_len=row_len,
            row_multiple=args.pack_row_multiple, text_multiple=args.text_multiple,
            shards=sharding.num_batch_shards(self.mesh, self.batch_axes),
            microbatches=int(self.config.microbatches),
        )  # fmt: skip
        batches, info = [], []
        for step, source in enumerate(padded):
            frames = plan.lengths[step].astype(np.int64)
            host_text = {
                k: np.asarray(jax.device_get(source[k])) for k in ("text_ids", "text_mask")
            }
            host = layout.packed(frames, host_text)
            batch = sharding.shard_batch(host, self.mesh, self.batch_axes)
            batch["pose"], batch["pose_mask"] = source["pose"], source["pose_mask"]
            batches.append(batch)
            segments, text_len = host["packed_segments"], host["text_ids"].shape[1]
            info.append({
                "rows": int(segments.shape[0]), "row_len": row_len, "text_len": text_len,
                "useful_token_fraction": float((segments > 0).sum()) / segments.size,
                "useful_frame_fraction": float(frames.sum()) / segments.size,
            })  # fmt: skip
        return batches, info

    def _prepare(self, layout: str) -> _Run:
        """A fresh model (the same weights for every layout: same seed), its train step, this
        layout's batches and one compiled executable per batch shape."""
        config, mcfg, args = self.config, self.mcfg, self.args
        model = signclip_model.SignCLIP(mcfg, rngs=nnx.Rngs(config.seed, dropout=config.seed + 1))
        params = signclip_model.count_params(model)
        total = args.warmup + args.steps * args.repeats
        fns = train_step_lib.make_train_step(config, model, self.mesh, self.batch_axes, total)
        del model  # its arrays now live (donated) in fns.state
        batches = self._batches()
        packing = None
        if layout == "packed":
            batches, packing = self._packed_batches(batches)
        keys = [_shape_key(b) for b in batches]
        options = {"xla_backend_optimization_level": 0} if args.fast_compile else None

        # Ahead-of-time compile, one executable per batch shape; the timed loop calls them.
        run = _Run(layout=layout, state=fns.state, batches=batches, keys=keys, params=params,
                   packing=packing)  # fmt: skip
        for i, key in enumerate(keys):
            if key in run.compiled:
                continue
            start = time.perf_counter()
            run.compiled[key] = fns.step.lower(fns.state, batches[i]).compile(options)
            run.compile_s[key] = time.perf_counter() - start
            run.xla[key] = _xla_estimates(run.compiled[key])
        return run

    def run(self, layouts: Sequence[str] = ("padded",)) -> list[dict[str, Any]]:
        """Times the train step on each layout's batches; one result row per layout.

        Every layout is compiled and warmed up first, then the timed repeats alternate
        between the layouts (A B A B ...), so that a machine's changing load (a shared CPU)
        falls on all of them alike.
        """
        mcfg, plan, args = self.mcfg, self.plan, self.args
        dtype = signclip_model.DTYPES[mcfg.dtype]
        attention = signclip_model._attention_impl(mcfg.attention, dtype)  # what "auto" chose
        rate = mcfg.bert.attention_probs_dropout_prob
        if attention == "pallas":  # model/flash_dropout.py, with or without dropout
            attention = f"pallas flash kernel (attention dropout {rate})"
        elif rate > 0:
            # Training with attention dropout runs the explicit softmax (bert.BertSelfAttention).
            attention = f"explicit (attention dropout {rate})"
        runs = [self._prepare(layout) for layout in layouts]
        try:
            for run in runs:
                run.steps(args.warmup)
            for _ in range(args.repeats):
                for run in runs:
                    start = time.perf_counter()
                    run.steps(plan.steps)
                    run.repeat_s.append(time.perf_counter() - start)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e):
                raise UserError(
                    f"out of device memory at batch {plan.batch_size}: lower --batch_size, or "
                    "use --microbatches / --remat"
                ) from None
            raise
        memory, measure = _jax_peak_memory(self.devices)  # before profiling can add to it
        if len(runs) > 1:
            measure += " (the whole run: every layout)"
        kind = self.devices[0].device_kind
        peak = peak_tflops(kind, mcfg.dtype)
        rows = []
        for run in runs:
            loss = float(run.metrics["loss"])
            profile = None
            if args.profile:
                trace = args.profile if len(runs) == 1 else os.path.join(args.profile, run.layout)
                with jax.profiler.trace(trace):
                    run.steps(2)
                profile = summarize_trace(trace, steps=2)
            if run.packing is None:
                step_flops = _step_flops(mcfg, plan)
            else:
                step_flops = _packed_step_flops(mcfg, plan, run.packing)
            pose = run.batches[0]["pose"]
            rows.append({
                "impl": "jax",
                "layout": run.layout,
                "device": kind,
                "devices": len(self.devices),
                "compile_s": sum(run.compile_s.values()),
                "compile_s_by_length": {str(k): v for k, v in run.compile_s.items()},
                **timing(run.repeat_s, plan.steps, plan.batch_size, step_flops,
                         peak * len(self.devices) if peak else None),
                "peak_memory_bytes": memory,
                "memory_measure": measure,
                "loss": loss,
                "attention": attention,
                "pose_dtype": str(pose.dtype),  # data.pose_dtype, as training feeds
                "params": run.params,
                "xla": {str(k): v for k, v in run.xla.items()},
                "peak_tflops_per_device": peak,
                "profile": profile,
                "step_flops": step_flops,
                "packing": _packing_summary(run.packing),
            })  # fmt: skip
        return rows


@dataclasses.dataclass
class _Run:
    """One layout's timed train step: its state, batches and executables (by batch shape)."""

    layout: str
    state: Any
    batches: list[dict[str, Any]]
    keys: list[str]  # each step's executable
    params: dict[str, int]
    packing: list[dict[str, Any]] | None
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)
    xla: dict[str, Any] = dataclasses.field(default_factory=dict)
    repeat_s: list[float] = dataclasses.field(default_factory=list)
    metrics: Any = None

    def steps(self, n: int) -> None:
        """n steps (cycling through the batches), then waits for the device."""
        for j in range(n):
            i = j % len(self.batches)
            self.state, self.metrics = self.compiled[self.keys[i]](self.state, self.batches[i])
        jax.block_until_ready((self.state, self.metrics))


def _shape_key(batch: dict[str, Any]) -> str:
    """What a compiled step is specialised on: the padded length, or a packed batch's rows
    and caption length."""
    if clip_packing.is_slotted(batch):
        return (
            f"{batch['packed_clip'].shape[0]} rows, frames {batch['pose'].shape[1]}, "
            f"text {batch['text_ids'].shape[1]}"
        )
    return str(batch["pose"].shape[1])


def _packing_summary(info: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "row_len": info[0]["row_len"],
        "rows": [i["rows"] for i in info],
        "text_len": [i["text_len"] for i in info],
        "useful_token_fraction": float(np.mean([i["useful_token_fraction"] for i in info])),
        "useful_frame_fraction": float(np.mean([i["useful_frame_fraction"] for i in info])),
    }


def _packed_step_flops(mcfg, plan: BatchPlan, info: list[dict[str, Any]]) -> float:
    """Mean model FLOPs of one packed step: the rows and caption tokens actually run."""
    per_step = [
        packed_train_flops(mcfg, i["rows"], i["row_len"], plan.batch_size, i["text_len"])
        for i in info
    ]
    return sum(per_step) / len(per_step)


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
    return max_rss_bytes(), "process max RSS (no device memory stats)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Times the JAX train step (and with --twin first the PyTorch twin); the result dict."""
    _check_counts(args)
    config = train_config(args)
    mcfg = signclip_model.model_config(config)
    frames = args.frames if not args.lengths else None
    if frames is None and not args.lengths:
        frames = mcfg.max_frames
    if frames is not None and frames > mcfg.max_frames:
        raise UserError(f"--frames={frames} exceeds the model's max_frames={mcfg.max_frames}")
    if args.pack_row_len is not None and args.pack_row_len < mcfg.max_frames + 2:
        raise UserError(
            f"--pack_row_len={args.pack_row_len} is shorter than one full clip "
            f"(max_frames + 2 = {mcfg.max_frames + 2} tokens)"
        )
    buckets = tuple(config.data.get("length_buckets", ()) or ())
    plan = plan_batches(
        steps=args.steps, batch_size=config.batch_size, max_frames=mcfg.max_frames,
        text_len=int(config.data.text_max_len) - 1, frames=frames, buckets=buckets,
        sort_by_length=args.sort_by_length, seed=config.seed,
    )  # fmt: skip
    if args.twin:
        # The twin runs first, in its own process, while JAX holds no device memory yet: no
        # up-front grab of 75% of the GPU, so the twin finds the memory free.
        # (Read when JAX creates its GPU client, on first use: importing JAX did not.)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    enable_compilation_cache(args.compilation_cache)  # the config's cache is not used here
    jax_bench = JaxBench(config, mcfg, plan, args)  # checks devices and divisibility first
    layouts = layouts_of(args.layout)

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
            "compile": bool(getattr(args, "twin_compile", False)),
            "compile_backend": getattr(args, "twin_compile_backend", "inductor"),
            "budget_s": getattr(args, "twin_budget_s", None),
            "optimizer": {"lr": float(opt.lr), "b1": float(opt.b1), "b2": float(opt.b2),
                          "eps": float(opt.eps), "clip_norm": float(opt.clip_norm)},
        }  # fmt: skip
        twin = run_twin(spec, plan)
    try:
        results += jax_bench.run(layouts)
    except UserError as e:
        if not args.twin:
            raise
        # Keep the twin's numbers (it ran first); the table shows the JAX error.
        log.error("the JAX step failed: %s", e)
        results += [{"impl": "jax", "layout": layout, "error": str(e)} for layout in layouts]
    runs = [_run_entry(r) for r in results]
    jax_result = results[0]  # the first layout's (the twin's comparison)
    step_flops = _step_flops(mcfg, plan)
    if args.twin:
        if "repeat_s" in twin:
            peak = peak_tflops(twin["device"], "float32" if twin["precision"] != "bf16 autocast"
                               else "bfloat16")  # fmt: skip
            twin.update(timing(twin["repeat_s"], plan.steps, plan.batch_size, step_flops, peak))
            twin["peak_tflops_per_device"] = peak
        results.append(twin)

    ratio = None
    if args.twin and "samples_per_s" in results[-1] and "samples_per_s" in jax_result:
        ratio = jax_result["samples_per_s"] / results[-1]["samples_per_s"]
    speeds = {r["layout"]: r.get("samples_per_s") for r in runs}
    packed_ratio = None
    if speeds.get("packed") and speeds.get("padded"):
        packed_ratio = speeds["packed"] / speeds["padded"]
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
        "runs": runs,
        "packed_over_padded": packed_ratio,
        "jax_over_twin": ratio,
    }


def _run_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One layout's entry of the JSON's `runs` (samples/s are clips/s)."""
    keys = ("layout", "samples_per_s", "step_ms", "repeat_s", "compile_s", "tflops", "loss",
            "peak_memory_bytes", "packing", "error")  # fmt: skip
    return {k: row[k] for k in keys if k in row}


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def show(result: dict[str, Any]) -> None:
    """Prints the set-up lines, the table (one row per implementation) and the profile."""
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
        if r.get("packing"):
            p = r["packing"]
            print(
                f"packed: rows of {p['row_len']} tokens, rows per step {p['rows']}, useful "
                f"tokens {100 * p['useful_token_fraction']:.1f}% (frames "
                f"{100 * p['useful_frame_fraction']:.1f}%), captions cut to {p['text_len']}"
            )
        row["startup"] = r["compile_s"] if r.get("compile_s") is not None else r["first_step_s"]
        row["what"] = "compile" if r.get("compile_s") is not None else "first step"
        row["mfu_pct"] = 100 * r["mfu"] if r.get("mfu") is not None else None
        row["memory"] = _gib(r["peak_memory_bytes"])
        rows.append(row)
    print(
        table(
            rows,
            [
                ("impl", "impl", "s"),
                ("layout", "layout", "s"),
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
    for r in result["results"]:
        for v in r.get("variants") or []:  # the twin's eager and compiled runs
            if "median_s" in v:
                rate = result["batch"]["batch_size"] * result["timing"]["steps"] / v["median_s"]
                compiled = v.get("compile_s") is not None
                extra = f", compile {v['compile_s']:.1f} s" if compiled else ""
                print(
                    f"twin {v['variant']}: {rate:.2f} samples/s{extra}"
                    + (" (the twin's row)" if v["variant"] == r.get("stronger") else "")
                )
            else:
                print(f"twin {v['variant']}: {v.get('error') or v.get('skipped')}")
    if result["jax_over_twin"] is not None:
        print(f"JAX / twin samples/s: {result['jax_over_twin']:.2f}x")
    if result.get("packed_over_padded") is not None:
        print(f"packed / padded clips/s: {result['packed_over_padded']:.2f}x")
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
