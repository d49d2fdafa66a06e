"""`signclip-jax <command> ...` (the console script) and `python -m signclip_jax <command> ...`.

Each command runs exactly what `python -m signclip_jax.<command> ...` runs: the command's
module is run as `__main__` (runpy, as `python -m` does) with sys.argv set to what
`python -m` gives it, so flags, output and exit codes are the command's own. Nothing is
imported here before a command is chosen: `--help` answers at once.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

from signclip_jax.cli import fail

PROG = "signclip-jax"

# command -> what it does (one line of the --help listing). Module: signclip_jax.<command>.
COMMANDS: dict[str, str] = {
    "train": "train a model (absl flags: --config=CONFIG.py[:arg] --workdir=DIR)",
    "evaluate": "retrieval / recognition metrics of a trained model",
    "embed": "pose and text embeddings of a trained model to an .npz",
    "serve": "HTTP API serving a trained model",
    "convert": "to and from PyTorch (the original's checkpoint, a Hub model folder)",
    "prepare": "pack a data source into ArrayRecord shards",
    "bench": "measure throughput and memory",
    "video": "video -> .pose with MediaPipe Holistic (its own virtualenv)",
    "search": "index poses, query them by text or pose, mAP of the index",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [flags ...]",
        "",
        "SignCLIP in JAX. Each command runs `python -m signclip_jax.<command>`;",
        f"`{PROG} <command> --help` explains its flags.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()),
    ]
    return "\n".join(lines)


def module_of(command: str) -> str:
    """The module that `python -m` runs for `command` (a package runs its __main__)."""
    return f"signclip_jax.{command}"


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatches `argv` (default sys.argv[1:]): `<command> [flags ...]`, or --help."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if not args:
        fail(f"{PROG}: a command is required: {', '.join(COMMANDS)} (see --help)")
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(f"{PROG}: unknown command {command!r}; use one of {', '.join(COMMANDS)} (see --help)")
    # runpy with alter_sys sets sys.argv[0] to the module's file, as `python -m` does; the
    # command's own flags follow.
    sys.argv = [sys.argv[0], *rest]
    runpy.run_module(module_of(command), run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
