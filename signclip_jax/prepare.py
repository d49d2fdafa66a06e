"""`python -m signclip_jax.prepare`: the command line lives in signclip_jax/tools/prepare.py."""

from signclip_jax.cli import run_cli
from signclip_jax.tools.prepare import main

if __name__ == "__main__":
    run_cli(main)
