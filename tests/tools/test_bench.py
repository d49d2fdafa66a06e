"""`python -m signclip_jax.bench input` and `train` in tiny forms: tables, JSON, FLOP counts."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signclip_jax.model.bert import TINY_BERT

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.bench", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_input_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(
        "input", "--signs=2", "--signers=3", "--n=6", "--workers=0", "--batch_size=2",
        "--batches=2", "--step_rate=1000", "--pose_dtype=bfloat16", f"--out={out}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "samples/s" in r.stdout and ".pose files" in r.stdout and "packed shards" in r.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "input" and result["examples"] == 6
    assert result["pose_dtype"] == "bfloat16" and "bfloat16 poses" in r.stdout
    rows = result["results"]
    assert {(x["what"], x["reader"]) for x in rows} == {
        (w, s) for w in ("per-example work", "grain pipeline")
        for s in (".pose files", "packed shards")
    }  # fmt: skip
    for x in rows:
        assert x["per_worker"] > 0 and x["seconds"] > 0
        # The table shows the same numbers as the JSON.
        assert re.search(rf"{x['per_worker']:.1f}\b", r.stdout)
    # Workers (cores) per accelerator at 1000 samples/s, from the one-process rates.
    per_example = {x["reader"]: x["per_worker"] for x in rows if x["what"] == "per-example work"}
    assert result["workers_per_accelerator"] == {
        k: math.ceil(1000 / v) for k, v in per_example.items()
    }
    for reader, workers in result["workers_per_accelerator"].items():
        assert f"{reader}: {workers} worker processes" in r.stdout


def test_help_and_bad_arguments():
    r = _run("--help")
    assert r.returncode == 0 and "input" in r.stdout
    r = _run("input", "--workers=two")
    assert r.returncode == 2 and "--workers" in r.stderr and "Traceback" not in r.stderr
    r = _run()
    assert r.returncode == 2  # a mode is required
    r = _run("input", "--step_rate=0")
    assert r.returncode == 2 and "--step_rate must be > 0" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------ train
# A tiny random BERT (2 layers, hidden 32; 1 video layer keeps the CPU compile short) and
# XLA's optimisation level 0 (`--fast_compile`): the run is about the harness, not the speed.
TINY_TRAIN = [
    "train", "--bert=tiny", "--batch_size=8", "--steps=2", "--warmup=1", "--repeats=1",
    "--fast_compile", "--config.model.video_layers=1",
]  # fmt: skip


def _bench_in_process(capsys, *args: str) -> str:
    """`bench.main(args)` in this process (JAX already imported: no start-up cost); stdout."""
    from signclip_jax.tools import bench

    assert bench.main(list(args)) == 0
    return capsys.readouterr().out


def _check_row(row: dict, batch_size: int, steps: int) -> None:
    assert row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["tflops"] > 0
    assert row["peak_memory_bytes"] > 0 and row["memory_measure"]
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert row["mfu"] is None  # no known peak FLOP/s on CPU
    median = statistics.median(row["repeat_s"])
    assert row["samples_per_s"] == pytest.approx(batch_size * steps / median)
    assert row["step_ms"] == pytest.approx(1000 * median / steps)


@pytest.mark.slow  # one XLA compile (~10-25 s on 2 loaded cores)
def test_train_bench_tiny_with_twin(tmp_path, capsys):
    from signclip_jax.tools import bench

    out = tmp_path / "train.json"
    stdout = _bench_in_process(
        capsys, *TINY_TRAIN, "--frames=32", "--twin", "--twin_threads=1", f"--out={out}"
    )
    result = json.loads(out.read_text())
    assert result["mode"] == "train" and result["batch"]["batch_size"] == 8
    assert result["model"]["hidden_size"] == 32 and result["model"]["video_layers"] == 1
    assert result["batch"]["mean_padded_frames"] == 32 and result["batch"]["text_len"] == 63
    assert 0 < result["batch"]["mean_caption_tokens"] < 63
    jax_row, twin_row = result["results"]
    assert jax_row["impl"] == "jax" and twin_row["impl"] == "torch twin"
    assert jax_row["devices"] == result["machine"]["devices"] >= 1
    assert jax_row["pose_dtype"] == "float32"  # a float32 model
    assert jax_row["compile_s"] > 0 and twin_row["first_step_s"] > 0
    for row in (jax_row, twin_row):
        _check_row(row, 8, 2)
    assert result["jax_over_twin"] == pytest.approx(
        jax_row["samples_per_s"] / twin_row["samples_per_s"]
    )
    # FLOPs: the analytic count of this model at 32 frames, 63 text tokens.
    from signclip_jax.model.signclip import model_config

    mcfg = model_config(
        {"bert": dict(TINY_BERT), "video_layers": 1, "max_frames": 256,
         "cls_token_id": 101, "sep_token_id": 102, "text_model": "minilm"}
    )  # fmt: skip
    flops = bench.train_flops_per_sample(mcfg, 32, 63)
    assert result["flops"]["train_flops_per_sample"] == flops
    assert jax_row["tflops"] == pytest.approx(
        8 * flops * 2 / statistics.median(jax_row["repeat_s"]) / 1e12
    )
    # The table shows the measured numbers.
    assert "torch twin" in stdout and "JAX / twin samples/s" in stdout
    for row in (jax_row, twin_row):
        assert f"{row['samples_per_s']:.2f}" in stdout
    assert result["machine"]["jax_version"] and result["machine"]["device_kind"]


@pytest.mark.slow  # one XLA compile (~10-25 s on 2 loaded cores)
def test_train_bench_lengths_microbatches(tmp_path, capsys):
    import jax

    out, cache, trace = tmp_path / "train.json", tmp_path / "cache", tmp_path / "trace"
    try:
        stdout = _bench_in_process(
            capsys, *TINY_TRAIN, "--lengths=spreadthesign", "--sort_by_length",
            "--microbatches=2", "--devices=2", "--set", "data.max_frames=96", f"--out={out}",
            "--dtype=bfloat16",
            f"--compilation_cache={cache}", f"--profile={trace}",
        )  # fmt: skip
    finally:
        jax.config.update("jax_compilation_cache_dir", None)  # the rest of the session
    assert any(cache.iterdir()) and list(trace.rglob("*.xplane.pb"))
    assert "profile" in json.loads(out.read_text())["results"][0]  # None on CPU: no device
    result = json.loads(out.read_text())
    (row,) = result["results"]
    _check_row(row, 8, 2)
    batch = result["batch"]
    assert batch["lengths"] == "spreadthesign" and batch["microbatches"] == 2
    assert row["devices"] == 2
    assert row["pose_dtype"] == "bfloat16"  # data.pose_dtype auto follows the bf16 model
    assert batch["padded_lengths"] == [96, 96] and batch["mean_padded_frames"] == 96
    assert 0 < batch["useful_frame_fraction"] < 1
    assert batch["mean_pose_frames"] == pytest.approx(96 * batch["useful_frame_fraction"])
    assert result["jax_over_twin"] is None
    assert "spreadthesign" in stdout and "useful" in stdout and "torch twin" not in stdout
    assert result["timing"]["compilation_cache"] == str(cache)


def test_train_bench_keeps_the_twin_when_jax_fails(tmp_path, capsys, monkeypatch):
    # Out of memory in the JAX step (as at batch 448 on an H100) must not lose the twin's
    # numbers, which were measured first. No compile: both sides are stood in for.
    from signclip_jax.errors import UserError
    from signclip_jax.tools import bench

    def jax_fails(self):
        raise UserError("out of device memory at batch 8: lower --batch_size")

    twin = {
        "impl": "torch twin", "device": "cpu", "devices": 1, "compile_s": None,
        "first_step_s": 0.5, "repeat_s": [0.2], "median_s": 0.2, "precision": "fp32",
        "peak_memory_bytes": 2**30, "memory_measure": "process max RSS", "loss": 4.1,
    }  # fmt: skip
    monkeypatch.setattr(bench._JaxBench, "run", jax_fails)
    monkeypatch.setattr(bench, "run_twin", lambda spec, plan: dict(twin))
    out = tmp_path / "train.json"
    stdout = _bench_in_process(capsys, *TINY_TRAIN, "--frames=32", "--twin", f"--out={out}")
    result = json.loads(out.read_text())
    jax_row, twin_row = result["results"]
    assert jax_row == {
        "impl": "jax",
        "error": "out of device memory at batch 8: lower --batch_size",
    }
    assert twin_row["samples_per_s"] == pytest.approx(8 * 2 / 0.2)
    assert result["jax_over_twin"] is None and result["model"]["params"] is None
    assert "jax: FAILED: out of device memory" in stdout and "torch twin" in stdout


def test_train_flops_per_sample():
    from signclip_jax.model.bert import PRESETS, BertConfig
    from signclip_jax.model.signclip import SignCLIPConfig
    from signclip_jax.tools import bench

    # Hand count: H 32, I 64, D 609, 1 video layer over 32 + 2 tokens, 2 text layers over 63.
    tiny = SignCLIPConfig(bert=BertConfig(**TINY_BERT), video_layers=1)
    layer_per_token = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # QKV + output + FFN
    frame_mlp = 2 * 32 * (609 * 32 + 32 * 32)
    video = 1 * 34 * layer_per_token + 1 * 2 * 2 * 34 * 34 * 32  # dense + scores and values
    text = 2 * 63 * layer_per_token + 2 * 2 * 2 * 63 * 63 * 32
    assert bench.train_flops_per_sample(tiny, 32, 63) == 3 * (frame_mlp + video + text)
    parts = bench.forward_flops_per_sample(tiny, 32, 63)
    assert parts["frame_mlp"] == frame_mlp and parts["projection"] == 0

    # Projection heads add 2 H^2 per tower.
    proj = SignCLIPConfig(bert=BertConfig(**TINY_BERT), video_layers=1, projection="linear")
    assert (
        bench.train_flops_per_sample(proj, 32, 63) - bench.train_flops_per_sample(tiny, 32, 63)
        == 3 * 2 * 2 * 32 * 32
    )

    # The original recipe: bert-base-cased, 12 video layers, 256 frames, 63 text tokens.
    base = SignCLIPConfig(bert=PRESETS["bert-base-cased"], video_layers=12)
    assert bench.train_flops_per_sample(base, 256, 63) == pytest.approx(173e9, rel=0.02)
    # Fewer frames, fewer FLOPs; attention grows faster than linearly.
    assert bench.train_flops_per_sample(base, 128, 63) < bench.train_flops_per_sample(base, 256, 63)


def test_plan_batches():
    from signclip_jax.tools import bench

    rng = np.random.default_rng(1)
    lengths = bench.spreadthesign_lengths(rng, 100_000, 256)
    assert lengths.min() >= 1 and lengths.max() <= 256
    assert abs(lengths.mean() - bench.ST_MEAN_FRAMES) < 2  # clipping trims a little
    assert abs(np.median(lengths) - bench.ST_MEDIAN_FRAMES) <= 1

    kw = dict(steps=20, batch_size=64, max_frames=256, text_len=63, buckets=(64, 128, 192))
    plain = bench.plan_batches(**kw, seed=3)
    grouped = bench.plan_batches(**kw, sort_by_length=True, seed=3)
    for plan in (plain, grouped):
        assert plan.lengths.shape == (20, 64) and plan.text_lengths.shape == (20, 64)
        for step in range(plan.steps):
            longest = plan.lengths[step].max()
            # The smallest of (64, 128, 192, 256) that holds the longest row.
            assert plan.padded[step] == min(b for b in (64, 128, 192, 256) if b >= longest)
            pose_mask, text_mask = plan.masks(step)
            assert pose_mask.shape == (64, plan.padded[step]) and text_mask.shape == (64, 63)
            assert (pose_mask.sum(1) == plan.lengths[step]).all()
            assert (text_mask.sum(1) == plan.text_lengths[step]).all()
        s = plan.summary()
        assert s["useful_frame_fraction"] == pytest.approx(
            plan.lengths.sum() / (plan.padded.sum() * 64)
        )
    # Grouping rows of similar length is what lets buckets pay off.
    assert grouped.summary()["mean_padded_frames"] < plain.summary()["mean_padded_frames"]
    assert grouped.summary()["useful_frame_fraction"] > plain.summary()["useful_frame_fraction"]
    assert sorted(grouped.lengths.ravel()) == sorted(plain.lengths.ravel())  # same rows

    fixed = bench.plan_batches(steps=3, batch_size=4, max_frames=256, text_len=23, frames=40)
    assert list(fixed.padded) == [40, 40, 40] and fixed.lengths.max() <= 40


def test_peak_tflops_table():
    from signclip_jax.tools import bench

    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == pytest.approx(989.4)
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756)
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == pytest.approx(156)
    assert bench.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197)
    assert bench.peak_tflops("TPU v4", "bfloat16") == pytest.approx(275)
    assert bench.peak_tflops("cpu", "float32") is None


def test_config_overrides():
    from signclip_jax import config as config_lib
    from signclip_jax.errors import UserError
    from signclip_jax.tools import bench
    from tests.helpers import load_config

    config = config_lib.apply_overrides(
        load_config("spreadthesign"),
        ["data.length_buckets=(64,128)", "model.remat=true", "batch_size=32",
         "model.text_model=minilm", "model.hidden_dropout=0.0"],  # optional key, absent before
        new_keys=bench.OPTIONAL_KEYS,
    )  # fmt: skip
    assert tuple(config.data.length_buckets) == (64, 128) and config.model.remat is True
    assert config.batch_size == 32 and config.model.text_model == "minilm"
    assert config.model.hidden_dropout == 0.0
    for key, raw in (("model.nope", "1"), ("nope.x", "1"), ("batch_size", "x"),
                     ("model.remat", "maybe")):  # fmt: skip
        with pytest.raises(UserError, match=key.split(".")[0]):
            config_lib.apply_overrides(config, [f"{key}={raw}"], new_keys=bench.OPTIONAL_KEYS)


def test_train_help_and_bad_arguments():
    r = _run("train", "--help")
    assert r.returncode == 0 and "--twin" in r.stdout and "--lengths" in r.stdout
    for args, needle in (
        (["train", "--batch_size=0"], "--batch_size"),
        (["train", "--bogus"], "--bogus"),
        (["train", "--frames=8", "--lengths=spreadthesign"], "--lengths"),
        (["train", "--sort_by_length"], "--sort_by_length"),
        (["train", "--dtype=float64"], "--dtype"),
        (["train", "--bert=tiny", "--config.model.nope=1"], "model.nope"),
    ):
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, args


def test_summarize_trace_groups_device_kernels(tmp_path):
    import gzip

    from signclip_jax.tools import bench

    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
    ]
    kernels = [  # (pid, name, microseconds)
        (1, "nvjet_sm90_tst_192x192_NTN", 3000), (1, "gemm_fusion_dot_1", 1000),
        (1, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 2000),
        (1, "loop_compare_xor_fusion", 500), (1, "input_add_reduce_fusion", 1500),
        (7, "python3", 99000),  # host time is not device time
    ]  # fmt: skip
    events = meta + [{"ph": "X", "pid": p, "name": n, "dur": d} for p, n, d in kernels]
    path = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = bench.summarize_trace(str(tmp_path), steps=2)
    assert summary["trace"] == str(path)
    assert summary["device_ms_per_step"] == {
        "matmul": 2.0, "attention (cuDNN)": 1.0, "other fusions": 0.75,
        "random bits (dropout)": 0.25,
    }  # fmt: skip
    assert list(summary["device_ms_per_step"]) == [
        "matmul", "attention (cuDNN)", "other fusions", "random bits (dropout)",
    ]  # fmt: skip
    top = bench.summarize_trace(str(tmp_path), steps=2, top_kernels=2)["top_kernels"]
    assert [(k["name"], k["ms_per_step"], k["launches_per_step"]) for k in top] == [
        ("nvjet_sm90_tst_192x192_NTN", 1.5, 0.5),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1.0, 0.5),
    ]
    assert bench.summarize_trace(str(tmp_path / "none"), steps=2) is None


def test_lengths_mode_padding_and_flops(tmp_path, capsys):
    from signclip_jax.model.signclip import model_config
    from signclip_jax.tools import bench

    out = tmp_path / "lengths.json"
    stdout = _bench_in_process(
        capsys, "lengths", "--bert=bert-base-cased", "--batch_size=64", "--batches=64",
        "--buckets=none", "--buckets=62,126,190", "--windows=1,16", f"--out={out}",
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = {(r["buckets"], r["window"]): r for r in result["results"]}
    assert set(rows) == {(b, w) for b in ("none", "62,126,190") for w in (1, 16)}
    mcfg = model_config(bench.train_config(bench.build_parser().parse_args(
        ["train", "--bert=bert-base-cased"])))  # fmt: skip
    full = bench.train_flops_per_sample(mcfg, 256, 63)
    assert result["full_length_gflop_per_sample"] == pytest.approx(full / 1e9)
    # No buckets, or random batches of 64 (their longest clip is nearly always > 190 frames
    # in the model): everything is padded to 256 frames.
    for key in (("none", 1), ("none", 16)):
        assert rows[key]["mean_padded_frames"] == 256 and rows[key]["speedup_bound"] == 1
    assert rows[("62,126,190", 1)]["mean_padded_frames"] > 240
    # Sorted windows of 16 batches: most batches fit a smaller bucket.
    grouped = rows[("62,126,190", 16)]
    assert grouped["batches"] == 64 and set(grouped["padded_lengths"]) <= {62, 126, 190, 256}
    assert grouped["mean_padded_frames"] < 200 and grouped["speedup_bound"] > 1.3
    assert 0.35 < rows[("none", 1)]["useful_frame_fraction"] < 0.42  # mean 97.8 / 256
    assert grouped["useful_frame_fraction"] > 0.6
    # The bound is the FLOP ratio of the padded lengths.
    assert grouped["train_gflop_per_sample"] * grouped["speedup_bound"] == pytest.approx(full / 1e9)
    assert f"{grouped['speedup_bound']:.2f}" in stdout and "62,126,190" in stdout
    for bad, message in (
        ("--buckets=1,x", "--buckets wants"), ("--buckets=0,64", "--buckets values must be > 0"),
        ("--windows=0", "--windows"), ("--batches=0", "--batches must be >= 1"),
    ):  # fmt: skip
        r = _run("lengths", bad)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
