"""tools/bench/lengths.py: padding and FLOPs of length buckets and length grouping."""

from __future__ import annotations

import json

import pytest

from signclip_jax.model.flops import train_flops_per_sample
from signclip_jax.model.signclip import model_config
from signclip_jax.tools.bench import cli, overrides
from tests.tools.bench import bench_in_process
from tests.tools.bench import run_bench as _run


def test_lengths_mode_padding_and_flops(tmp_path, capsys):
    out = tmp_path / "lengths.json"
    stdout = bench_in_process(
        capsys, "lengths", "--bert=bert-base-cased", "--batch_size=64", "--batches=64",
        "--buckets=none", "--buckets=62,126,190", "--windows=1,16", f"--out={out}",
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = {(r["buckets"], r["window"]): r for r in result["results"]}
    assert set(rows) == {(b, w) for b in ("none", "62,126,190") for w in (1, 16)} | {
        ("packed 258", 1)
    }
    mcfg = model_config(overrides.train_config(cli.build_parser().parse_args(
        ["train", "--bert=bert-base-cased"])))  # fmt: skip
    full = train_flops_per_sample(mcfg, 256, 63)
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
    # Packing (rows of max_frames + 2 tokens, captions cut): >= 90 % of the slots are real
    # tokens, and the FLOPs per clip fall with the slots (and the shorter captions).
    packed = rows[("packed 258", 1)]
    assert packed["useful_token_fraction"] >= 0.9
    assert packed["useful_frame_fraction"] < packed["useful_token_fraction"]
    assert packed["mean_padded_frames"] < 110 and packed["speedup_bound"] > 2.2
    assert packed["train_gflop_per_sample"] * packed["speedup_bound"] == pytest.approx(full / 1e9)
    for bad, message in (
        ("--buckets=1,x", "--buckets wants"), ("--buckets=0,64", "--buckets values must be > 0"),
        ("--windows=0", "--windows"), ("--batches=0", "--batches must be >= 1"),
    ):  # fmt: skip
        r = _run("lengths", bad)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
