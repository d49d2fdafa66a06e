"""`bench train`: train-step throughput of a randomly initialised model on random batches.

The step is the training step itself (train.step.make_train_step), compiled ahead of time
for each padded length of the plan (plan.py), then timed in repeats: compile time,
samples/s, step ms, TFLOP/s and MFU from the analytic FLOP count (model/flops.py) and a table
of peak FLOP/s, peak memory. `--twin` also times the PyTorch twin on the same shapes, first
and in its own process (twin.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from signclip_jax.data import pipeline
from signclip_jax.errors import UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.model.flops import forward_flops_per_sample, train_flops_per_sample
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

    def run(self) -> dict[str, Any]:
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
            **timing(
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
            twin.update(timing(twin["repeat_s"], plan.steps, plan.batch_size, step_flops, peak))
            twin["peak_tflops_per_device"] = peak
        results.append(twin)

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
