"""`python -m signclip_jax.serve`: the command line lives in signclip_jax/serving/server.py."""

from signclip_jax.cli import run_cli
from signclip_jax.serving.server import main

if __name__ == "__main__":
    run_cli(main)
