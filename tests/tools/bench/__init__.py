"""Tests of `python -m signclip_jax.bench` (signclip_jax/tools/bench/), one file per module,
and the two ways they run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from signclip_jax.tools.bench import cli

ROOT = Path(__file__).resolve().parents[3]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """`python -m signclip_jax.bench ARGS` in a fresh process (exit codes, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.bench", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip


def bench_in_process(capsys, *args: str) -> str:
    """`cli.main(args)` in this process (JAX already imported: no start-up cost); stdout."""
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out
