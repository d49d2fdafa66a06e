"""`bench train --twin`: the PyTorch twin's train step, timed on the same shapes as JAX's.

`run_twin` runs `time_twin` in a child process: its own device memory (JAX in the parent
holds none yet), no CUDA library clash with JAX, and its own max RSS on CPU. The child
imports neither JAX nor this package's JAX modules; torch (the `torch` extra) only there.

The twin's strongest ordinary setting: bf16 autocast, transformers' SDPA attention with the
padding mask and, with `--twin_compile`, the model under `torch.compile`. A compiled twin is
timed first, then the eager one when the time so far leaves room in `--twin_budget_s`; the
result row is the faster of the two, `variants` holds both, and a compiled variant's compile
time (its first pass over the batches less that many steady steps) is kept apart from its
steps/s.
"""

from __future__ import annotations

import json
import logging
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import signclip_jax
from signclip_jax import extras, files
from signclip_jax.errors import UserError
from signclip_jax.tools.bench.common import max_rss_bytes
from signclip_jax.tools.bench.plan import BatchPlan

log = logging.getLogger(__name__)


def time_twin(spec: dict[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """TorchSignCLIP train steps (Adam, clip-norm, the signclip loss) on the plan's shapes.

    bf16 autocast on GPU for a 16-bit dtype (TF32 matmuls for float32, as XLA's default),
    fp32 on CPU. With microbatches > 1 the same GradCache scheme as the JAX step: embed all
    microbatches without gradients, the full-batch loss, then re-run each microbatch with
    the same dropout seed and backpropagate its embedding gradients.

    spec["compile"]: the model under torch.compile(backend=spec["compile_backend"]) first,
    then eager if spec["budget_s"] (None: no limit) leaves room; the faster is the row.
    """
    # torch only here, in the child process (see the module docstring); it is an extra.
    torch = extras.require("torch", "torch", "bench train --twin")
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

    embed_forward = model  # the eager module, or torch.compile's wrapper of it (measure)

    def embed(batch, seed: int):
        torch.manual_seed(seed)  # the same dropout masks in both GradCache passes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            return embed_forward(*batch)

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

    def measure(name: str, forward) -> dict[str, Any]:
        """One variant (eager or compiled `forward`): first step, first pass over every
        batch shape (a compiled forward compiles there), warm-up, timed repeats."""
        nonlocal embed_forward
        embed_forward = forward
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)

        def run(n: int) -> torch.Tensor:
            loss = None
            for j in range(n):
                loss = train_step(batches[j % plan.steps])
            sync()
            return loss

        start = time.perf_counter()
        run(1)  # eager: no compile, but the first step pays cuBLAS/cuDNN set-up
        first = time.perf_counter() - start
        run(max(plan.steps - 1, 0))  # the rest of the first pass: one compile per shape
        first_pass = time.perf_counter() - start
        run(max(spec["warmup"] - 1, 0))
        repeat_s = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            loss = run(plan.steps)
            repeat_s.append(time.perf_counter() - start)
        median = statistics.median(repeat_s)
        row = {
            "variant": name,
            "compiled": name != "eager",
            "first_step_s": first,
            "first_pass_s": first_pass,
            # What the first pass took beyond that many steady steps: torch.compile's time.
            "compile_s": max(first_pass - median, 0.0) if name != "eager" else None,
            "repeat_s": repeat_s,
            "median_s": median,
            "loss": float(loss.detach()),
        }
        if on_gpu:
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return row

    started = time.perf_counter()
    variants = []
    backend = spec.get("compile_backend") or "inductor"
    if spec.get("compile"):
        try:
            compiled = torch.compile(model, backend=backend, mode=spec.get("compile_mode"),
                                     dynamic=False)  # fmt: skip
            variants.append(measure(f"torch.compile ({backend})", compiled))
        except Exception as e:  # a compiler failure: the eager twin still runs
            log.warning("torch.compile failed: %s", e)
            line = (str(e).splitlines() or [""])[0][:300]
            variants.append(
                {
                    "variant": f"torch.compile ({backend})",
                    "compiled": True,
                    "error": f"{type(e).__name__}: {line}",
                }
            )
            torch._dynamo.reset()
    spent = time.perf_counter() - started
    budget = spec.get("budget_s")
    # The eager twin: always without compile, and "when time allows" beside a compiled one
    # (its run takes about the compiled one's time less the compile).
    eager_guess = spent - (variants[0].get("compile_s") or 0.0) if variants else 0.0
    if not variants or budget is None or spent + eager_guess <= budget:
        variants.append(measure("eager", model))
    else:
        variants.append({"variant": "eager", "compiled": False,
                         "skipped": f"--twin_budget_s={budget:g}: {spent:.1f} s spent, the "
                         f"eager run needs ~{eager_guess:.1f} s"})  # fmt: skip
    timed = [v for v in variants if "median_s" in v]
    if not timed:
        raise UserError(f"the twin did not run: {variants[0].get('error')}")
    best = min(timed, key=lambda v: v["median_s"])
    if on_gpu:
        memory, measure_name = best["peak_memory_bytes"], "torch max_memory_allocated"
        kind = torch.cuda.get_device_name(device)
    else:
        memory, measure_name = max_rss_bytes(), "process max RSS (twin process)"
        kind = "cpu"
    return {
        "impl": "torch twin",
        "device": kind,
        "devices": 1,
        "variant": best["variant"],
        "compiled": best["compiled"],
        "compile_s": best["compile_s"],
        "first_step_s": best["first_step_s"],
        "repeat_s": best["repeat_s"],
        "median_s": best["median_s"],
        "peak_memory_bytes": int(memory),
        "memory_measure": measure_name,
        "loss": best["loss"],
        "attention": spec["attention"],
        "precision": "bf16 autocast" if half else ("tf32" if on_gpu else "fp32"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": variants,
        "stronger": best["variant"],
    }


def twin_main(argv: list[str]) -> int:
    """Child-process entry: `twin_main([spec.json, plan.npz, out.json])`."""
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


def _child_env() -> dict[str, str]:
    """The child's environment: the folder holding this copy of signclip_jax goes first on
    PYTHONPATH (a checkout that the parent imports from, e.g. under pytest), unless it is a
    site-packages folder, which the child finds by itself."""
    root = str(Path(signclip_jax.__file__).resolve().parents[1])
    site_dirs = {
        str(Path(p).resolve()) for p in (*site.getsitepackages(), site.getusersitepackages())
    }
    if root in site_dirs:
        return dict(os.environ)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_twin(spec: dict[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """`time_twin` in a fresh Python process; {"impl", "error"} when it fails."""
    with tempfile.TemporaryDirectory(prefix="scj-twin-") as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec))
        np.savez(tmp / "plan.npz", lengths=plan.lengths, padded=plan.padded,
                 text_lengths=plan.text_lengths, text_len=plan.text_len)  # fmt: skip
        code = f"import sys; from {__name__} import twin_main; sys.exit(twin_main(sys.argv[1:]))"
        paths = [str(tmp / f) for f in ("spec.json", "plan.npz", "out.json")]
        proc = subprocess.run(
            [sys.executable, "-c", code, *paths], env=_child_env(), capture_output=True, text=True
        )
        if proc.returncode == 0:
            return json.loads((tmp / "out.json").read_text())
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    log.warning("the PyTorch twin failed (exit %d):\n%s", proc.returncode, proc.stderr[-3000:])
    return {"impl": "torch twin", "error": lines[-1] if lines else f"exit {proc.returncode}"}
