"""Trains SignCLIP (or resumes the run in DIR):

  python -m signclip_jax.train --config=CONFIG.py[:arg] --workdir=DIR [--config.KEY=VALUE ...]

Writes DIR/config.json, DIR/metrics.jsonl (one JSON object per line), checkpoints and what
later commands need (evaluate, embed, serve, convert). What it evaluates while it trains is
config.evals (validation by default; e.g. --config.evals.zeroshot.every_steps=0 adds zero-shot
recognition).

This module is the command line only (absl flags); the trainer is signclip_jax/train/loop.py.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from signclip_jax import cli, files
from signclip_jax.errors import UserError
from signclip_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run (else from the env)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None or not _WORKDIR.value:
        cli.fail("--config=CONFIG.py and --workdir=DIR are required")
    try:
        # Before any work: an unwritable workdir would otherwise fail deep inside the trainer.
        files.check_writable_dir(_WORKDIR.value, "--workdir")
        loop.train(
            _CONFIG.value,
            _WORKDIR.value,
            coordinator=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    except UserError as e:
        cli.fail(str(e))


def run() -> None:
    # absl exits with status 1 after --help; the CLI contract is 0 for a successful request.
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)


if __name__ == "__main__":
    run()
