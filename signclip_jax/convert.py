"""`python -m signclip_jax.convert`: the command line lives in signclip_jax/interop/convert.py."""

from signclip_jax.cli import run_cli
from signclip_jax.interop.convert import main

if __name__ == "__main__":
    run_cli(main)
