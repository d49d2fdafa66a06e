"""`python -m signclip_jax.bench`: the command line lives in signclip_jax/tools/bench.py."""

from signclip_jax.cli import run_cli
from signclip_jax.tools.bench import main

if __name__ == "__main__":
    run_cli(main)
