"""`python -m signclip_jax.evaluate`: the command line is in signclip_jax/evaluation/cli.py."""

from signclip_jax.cli import run_cli
from signclip_jax.evaluation.cli import main

if __name__ == "__main__":
    run_cli(main)
