"""One command-line style for every `python -m signclip_jax.*` command.

A user error is one line on stderr, `error: ...`, exit code 2, no traceback: a `UserError`
raised anywhere below `run_cli`, or a usage error that argparse reports through `Parser`.
`train` parses with absl (ml_collections' --config.KEY=VALUE flags) and prints the same line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from signclip_jax.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Prints the one-line user error and exits 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`; a UserError becomes one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def format_duration(seconds: float) -> str:
    """'1:02:03' or '2:03' (progress lines, ETAs); '?' when not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the contract: one line, exit 2 (no usage dump).

    Sub-parsers made through `add_subparsers` inherit the class, so they report the same way.
    """

    def error(self, message: str):
        fail(f"{self.prog}: {message} (see --help)")


def add_checkpoint_args(
    parser: argparse.ArgumentParser, *, required: bool = True, repeat_model: bool = False
) -> None:
    """--workdir | --checkpoint | --model (one of them, required unless `required=False`) and
    --which: how every command that loads a model names it.
    `signclip_jax.models.checkpoint_args(args)` turns them into the (workdir, checkpoint) pair
    `run.load_run` takes. `repeat_model`: --model may repeat as [NAME=]REF (serve answers
    several models; args.model is then a list)."""
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--workdir", help="training workdir (its latest or best checkpoint)")
    src.add_argument("--checkpoint", help="one checkpoint step directory (WORKDIR/checkpoints/N)")
    refs = (
        "a run directory, a step directory, a release folder (convert to-pytorch --format=hf) or "
        "hf-hub:ORG/NAME[@REVISION] (through the Hugging Face cache; HF_HUB_OFFLINE=1 reads "
        "only the cache)"
    )
    if repeat_model:
        src.add_argument(
            "--model",
            metavar="[NAME=]REF",
            action="append",
            help=f"a model to serve, repeatable: {refs}; requests choose one with model_name "
            "(default: the first). NAME defaults to --model_name for a single model, else to "
            "the folder's (repository's) name",
        )
    else:
        src.add_argument("--model", metavar="REF", help=refs)
    parser.add_argument(
        "--which",
        default="latest",
        choices=("latest", "best"),
        help="checkpoint of --workdir (a run directory) to use (default: latest)",
    )
