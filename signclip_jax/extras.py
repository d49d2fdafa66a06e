"""Optional dependencies: one clear error naming the extra to install.

The core install is what training and JAX inference need. The rest comes in extras
(pyproject.toml): `torch` (PyTorch twin, import/export), `serve` (HTTP server), `gcs`
(gs:// paths), `eval` (few-shot, probe, plots), `tfds` (tfds sources), `demo` (the bundled
MiniLM), `all`. Code that needs one imports it through `require`, where it is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from signclip_jax.errors import UserError


class MissingExtra(UserError):
    """An optional dependency is not installed; the message says what to pip install."""


def install_hint(extra: str) -> str:
    return f"pip install 'signclip-jax[{extra}]'"


def require(module: str, extra: str, what: str) -> ModuleType:
    """Imports `module`, or raises MissingExtra: "`what` needs `module` ...: pip install ...".

    Only the module itself being absent counts; a module that is installed but fails inside
    its own imports keeps its original error (that is a broken install, not a missing extra).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise
        raise MissingExtra(
            f"{what} needs the optional package {top!r}, which is not installed: "
            f"{install_hint(extra)}"
        ) from None
