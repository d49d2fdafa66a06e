"""`python -m signclip_jax.bench input` in a tiny form: prints a table of numbers, writes JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        "--batches=2", f"--out={out}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "samples/s" in r.stdout and ".pose files" in r.stdout and "packed shards" in r.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "input" and result["examples"] == 6
    rows = result["results"]
    assert {(x["what"], x["reader"]) for x in rows} == {
        (w, s) for w in ("per-example work", "grain pipeline")
        for s in (".pose files", "packed shards")
    }  # fmt: skip
    for x in rows:
        assert x["per_worker"] > 0 and x["seconds"] > 0
        # The table shows the same numbers as the JSON.
        assert re.search(rf"{x['per_worker']:.1f}\b", r.stdout)


def test_help_and_bad_arguments():
    r = _run("--help")
    assert r.returncode == 0 and "input" in r.stdout
    r = _run("input", "--workers=two")
    assert r.returncode == 2 and "--workers" in r.stderr and "Traceback" not in r.stderr
    r = _run()
    assert r.returncode == 2  # a mode is required
