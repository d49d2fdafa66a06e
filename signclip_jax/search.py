"""`python -m signclip_jax.search`: the command line lives in signclip_jax/tools/search.py."""

from signclip_jax.cli import run_cli
from signclip_jax.tools.search import main

if __name__ == "__main__":
    run_cli(main)
