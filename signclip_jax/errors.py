"""Errors caused by user input, and the CLI wrapper that prints them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with something the user supplied (file, config value, argument).

    The message must say what is wrong and name the file or key, so that the CLI can print
    it on its own, without a traceback.
    """


class DataError(UserError):
    """A data file (pose, CSV, manifest, shard) that cannot be used. The message names it."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`; a UserError becomes one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
