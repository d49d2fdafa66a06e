"""tools/bench/twin.py: the PyTorch twin's timing, eager and under torch.compile.

torch.compile's default backend (inductor) works on this CPU build but took ~95 s for the
tiny twin on 2 loaded cores; these tests use `aot_eager` (TorchDynamo's graph capture and
AOTAutograd's joint forward/backward, without inductor's code generation), which takes a
few seconds. The suite's smoke run (test_suite.py) uses it too.
"""

from __future__ import annotations

import pytest

from signclip_jax.model.bert import TINY_BERT
from signclip_jax.model.signclip import model_config
from signclip_jax.tools.bench.plan import plan_batches

torch = pytest.importorskip("torch")

from signclip_jax.tools.bench import twin  # noqa: E402 (after the torch check)


def _spec(**kw) -> dict:
    mcfg = model_config(
        {"bert": {**TINY_BERT, "num_hidden_layers": 1}, "video_layers": 1, "max_frames": 16,
         "cls_token_id": 101, "sep_token_id": 102, "text_model": "minilm"}
    )  # fmt: skip
    return {
        "model_config": mcfg.to_dict(), "dtype": "float32", "microbatches": 1, "warmup": 1,
        "repeats": 2, "seed": 0, "attention": "sdpa", "threads": 1,
        "optimizer": {"lr": 1e-4, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "clip_norm": 2.0},
        **kw,
    }  # fmt: skip


def _plan():
    return plan_batches(steps=2, batch_size=4, max_frames=16, text_len=15, frames=16)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_compiled_and_eager_twin_the_faster_is_the_row():
    r = twin.time_twin(_spec(compile=True, compile_backend="aot_eager"), _plan())
    compiled, eager = r["variants"]
    assert compiled["variant"] == "torch.compile (aot_eager)" and compiled["compiled"]
    assert eager["variant"] == "eager" and not eager["compiled"] and eager["compile_s"] is None
    for v in (compiled, eager):
        assert len(v["repeat_s"]) == 2 and v["median_s"] > 0 and v["loss"] > 0
    # The compile time is the first pass less one steady pass, apart from the timed steps.
    assert compiled["compile_s"] == pytest.approx(compiled["first_pass_s"] - compiled["median_s"])
    assert compiled["compile_s"] > 0
    best = min((compiled, eager), key=lambda v: v["median_s"])
    assert r["stronger"] == r["variant"] == best["variant"]
    assert r["repeat_s"] == best["repeat_s"] and r["compile_s"] == best["compile_s"]
    assert r["compiled"] == best["compiled"] and r["precision"] == "fp32"


def test_eager_twin_skipped_past_the_budget_and_alone_without_compile():
    r = twin.time_twin(_spec(compile=True, compile_backend="aot_eager", budget_s=0.0), _plan())
    compiled, eager = r["variants"]
    assert "median_s" in compiled and "median_s" not in eager
    assert eager["skipped"].startswith("--twin_budget_s=0")
    assert r["variant"] == compiled["variant"]
    r = twin.time_twin(_spec(), _plan())  # no compile: the eager twin, as before
    assert [v["variant"] for v in r["variants"]] == ["eager"] and r["compile_s"] is None


def test_a_compiler_failure_keeps_the_eager_twin():
    r = twin.time_twin(_spec(compile=True, compile_backend="no_such_backend"), _plan())
    failed, eager = r["variants"]
    assert eager["variant"] == "eager" and "median_s" in eager
    assert failed["compiled"] and "no_such_backend" in failed["error"]
    assert r["variant"] == "eager" and r["median_s"] > 0
