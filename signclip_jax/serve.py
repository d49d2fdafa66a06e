"""`python -m signclip_jax.serve`: the command line lives in signclip_jax/serving/server.py.

`signclip_jax.serve:create_app()` is the app factory for gunicorn's own command line (see
`python -m signclip_jax.serve --help`); importing this module starts no JAX.
"""

from signclip_jax.cli import run_cli
from signclip_jax.serving.app import create_app
from signclip_jax.serving.server import main

__all__ = ["create_app", "main"]

if __name__ == "__main__":
    run_cli(main)
