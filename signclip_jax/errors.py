"""Errors caused by user input. signclip_jax/cli.py prints them as one line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with something the user supplied (file, config value, argument).

    The message must say what is wrong and name the file or key, so that the CLI can print
    it on its own, without a traceback.
    """


class DataError(UserError):
    """A data file (pose, CSV, manifest, shard) that cannot be used. The message names it."""
