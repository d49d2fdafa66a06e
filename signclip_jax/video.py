"""`python -m signclip_jax.video`: the command line lives in signclip_jax/tools/video.py."""

from signclip_jax.cli import run_cli
from signclip_jax.tools.video import main

if __name__ == "__main__":
    run_cli(main)
