"""tools/bench/cli.py: --help, usage errors (one line, exit 2), overrides, lazy modes."""

from __future__ import annotations

import subprocess
import sys

from tests.tools.bench import ROOT
from tests.tools.bench import run_bench as _run


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


def test_train_help_and_bad_arguments():
    r = _run("train", "--help")
    assert r.returncode == 0 and "--twin" in r.stdout and "--lengths" in r.stdout
    for args, needle in (
        (["train", "--batch_size=0"], "--batch_size"),
        (["train", "--bogus"], "--bogus"),
        (["train", "--frames=8", "--lengths=spreadthesign"], "--lengths"),
        (["train", "--sort_by_length"], "--sort_by_length"),
        (["train", "--dtype=float64"], "--dtype"),
        (["train", "--layout=padded,ragged"], "--layout"),
        (["train", "--layout=packed", "--pack_row_len=0"], "--pack_row_len"),
        (["train", "--bert=tiny", "--config.model.nope=1"], "model.nope"),
    ):
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, args


def test_parsing_imports_no_mode_and_no_jax():
    """--help stays instant: the parser is built without a mode's module (they import JAX)."""
    code = (
        "import sys; from signclip_jax.tools.bench import cli; "
        "args, extra = cli.build_parser().parse_known_args(['train', '--config.seed=3']); "
        "print(sorted(m for m in ('jax', 'torch', 'signclip_jax.tools.bench.train') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
