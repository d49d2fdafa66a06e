"""`python -m signclip_jax.bench`: the command line lives in signclip_jax/tools/bench/cli.py
(one module per mode beside it)."""

from signclip_jax.cli import run_cli
from signclip_jax.tools.bench.cli import main

if __name__ == "__main__":
    run_cli(main)
