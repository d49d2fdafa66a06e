"""`python -m signclip_jax.embed`: the command line lives in signclip_jax/serving/embed.py."""

from signclip_jax.cli import run_cli
from signclip_jax.serving.embed import main

if __name__ == "__main__":
    run_cli(main)
