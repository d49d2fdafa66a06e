"""tools/bench/train.py (+ twin.py): `bench train` in tiny forms, with and without the PyTorch
twin; the peak FLOP/s table and the profile summary."""

from __future__ import annotations

import gzip
import json
import math
import statistics
import subprocess
import sys

import jax
import pytest

from signclip_jax.errors import UserError
from signclip_jax.model.bert import TINY_BERT
from signclip_jax.model.flops import train_flops_per_sample
from signclip_jax.model.signclip import model_config
from signclip_jax.tools.bench import train
from tests.tools.bench import ROOT, bench_in_process

# A tiny random BERT (2 layers, hidden 32; 1 video layer keeps the CPU compile short) and
# XLA's optimisation level 0 (`--fast_compile`): the run is about the harness, not the speed.
TINY_TRAIN = [
    "train", "--bert=tiny", "--batch_size=8", "--steps=2", "--warmup=1", "--repeats=1",
    "--fast_compile", "--config.model.video_layers=1",
]  # fmt: skip


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
    out = tmp_path / "train.json"
    stdout = bench_in_process(
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
    mcfg = model_config(
        {"bert": dict(TINY_BERT), "video_layers": 1, "max_frames": 256,
         "cls_token_id": 101, "sep_token_id": 102, "text_model": "minilm"}
    )  # fmt: skip
    flops = train_flops_per_sample(mcfg, 32, 63)
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
    out, cache, trace = tmp_path / "train.json", tmp_path / "cache", tmp_path / "trace"
    try:
        stdout = bench_in_process(
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
    def jax_fails(self, layouts):
        raise UserError("out of device memory at batch 8: lower --batch_size")

    twin = {
        "impl": "torch twin", "device": "cpu", "devices": 1, "compile_s": None,
        "first_step_s": 0.5, "repeat_s": [0.2], "median_s": 0.2, "precision": "fp32",
        "peak_memory_bytes": 2**30, "memory_measure": "process max RSS", "loss": 4.1,
    }  # fmt: skip
    monkeypatch.setattr(train.JaxBench, "run", jax_fails)
    monkeypatch.setattr(train, "run_twin", lambda spec, plan: dict(twin))
    out = tmp_path / "train.json"
    stdout = bench_in_process(capsys, *TINY_TRAIN, "--frames=32", "--twin", f"--out={out}")
    result = json.loads(out.read_text())
    jax_row, twin_row = result["results"]
    assert jax_row == {
        "impl": "jax",
        "layout": "padded",
        "error": "out of device memory at batch 8: lower --batch_size",
    }
    assert twin_row["samples_per_s"] == pytest.approx(8 * 2 / 0.2)
    assert result["jax_over_twin"] is None and result["model"]["params"] is None
    assert "jax: FAILED: out of device memory" in stdout and "torch twin" in stdout


@pytest.mark.slow  # three XLA compiles at opt level 0 (~20-40 s on 2 loaded cores)
def test_train_bench_padded_and_packed_layouts(tmp_path, capsys):
    """Both layouts of the same model on the same clips, sharded over 2 devices with 2
    GradCache microbatches (the packed batch's microbatch-major path)."""
    out = tmp_path / "train.json"
    stdout = bench_in_process(
        capsys, *TINY_TRAIN, "--lengths=spreadthesign", "--layout=padded,packed",
        "--microbatches=2", "--devices=2", "--set", "data.max_frames=96", f"--out={out}",
    )  # fmt: skip
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["layout"] for r in runs] == ["padded", "packed"]
    assert [r["layout"] for r in result["results"]] == ["padded", "packed"]
    for row in result["results"]:
        _check_row(row, 8, 2)
    padded, packed = runs
    assert result["packed_over_padded"] == pytest.approx(
        packed["samples_per_s"] / padded["samples_per_s"]
    )
    p = packed["packing"]
    assert p["row_len"] == 98 and all(r % 4 == 0 for r in p["rows"])  # 2 shards x 2 micro
    assert all(t < 63 and t % 8 == 0 for t in p["text_len"])
    # The packed rows hold the plan's clips: their real frames over all slots.
    assert p["useful_frame_fraction"] == pytest.approx(
        sum(result["batch"]["mean_pose_frames"] * 8 for _ in p["rows"])
        / sum(r * 98 for r in p["rows"])
    )
    assert padded["packing"] is None
    assert "packed / padded clips/s" in stdout and "useful tokens" in stdout


def test_layout_names():
    assert train.layouts_of("padded,packed") == ["padded", "packed"]
    assert train.layouts_of(" packed ") == ["packed"]
    for bad in ("", "packed,packed", "padded,ragged"):
        with pytest.raises(UserError, match="--layout"):
            train.layouts_of(bad)


def test_peak_tflops_table():
    assert train.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert train.peak_tflops("NVIDIA H200", "bfloat16") == pytest.approx(989.4)
    assert train.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756)
    assert train.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == pytest.approx(156)
    assert train.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197)
    assert train.peak_tflops("TPU v4", "bfloat16") == pytest.approx(275)
    assert train.peak_tflops("cpu", "float32") is None


def test_summarize_trace_groups_device_kernels(tmp_path):
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
    summary = train.summarize_trace(str(tmp_path), steps=2)
    assert summary["trace"] == str(path)
    assert summary["device_ms_per_step"] == {
        "matmul": 2.0, "attention (cuDNN)": 1.0, "other fusions": 0.75,
        "random bits (dropout)": 0.25,
    }  # fmt: skip
    assert list(summary["device_ms_per_step"]) == [
        "matmul", "attention (cuDNN)", "other fusions", "random bits (dropout)",
    ]  # fmt: skip
    top = train.summarize_trace(str(tmp_path), steps=2, top_kernels=2)["top_kernels"]
    assert [(k["name"], k["ms_per_step"], k["launches_per_step"]) for k in top] == [
        ("nvjet_sm90_tst_192x192_NTN", 1.5, 0.5),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1.0, 0.5),
    ]
    assert train.summarize_trace(str(tmp_path / "none"), steps=2) is None


def test_twin_process_imports_neither_jax_nor_torch_up_front():
    """The twin's child imports twin.py: no JAX there (its own device memory, no CUDA library
    clash), and torch only once it runs."""
    code = (
        "import sys; from signclip_jax.tools.bench.twin import twin_main; "
        "print([m for m in ('jax', 'torch') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
