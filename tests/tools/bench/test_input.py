"""tools/bench/input.py: `bench input` in a tiny form, table and JSON."""

from __future__ import annotations

import json
import math
import re

from tests.tools.bench import run_bench as _run


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
