"""Helpers shared by the configs in configs/ (not the configs themselves).

`get_config(arg)` in each config file receives the text after `:` in
`--config=configs/x.py:arg`; `parse_arg` turns `"key=value,flag"` into typed values.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable
from typing import Any

import ml_collections

from signclip_jax.errors import UserError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"a=1,b=x,flag"` against `defaults`, converting each value to its default's type.

    A bare name sets a boolean default to True. Unknown keys are an error.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise UserError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise UserError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
            continue
        out[key] = _convert(key, raw.strip(), default)
    return out


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"config argument {key}={raw!r} is not a boolean")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise UserError(
                f"config argument {key}={raw!r} is not a {type(default).__name__}"
            ) from None
    if isinstance(default, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise UserError(f"config argument {key}={raw!r} is not a tuple literal") from None
        return type(default)(value if isinstance(value, (tuple, list)) else (value,))
    return raw


# ---------------------------------------------------------------------------------------------
# --config.a.b=value overrides of a saved config (config.json of a workdir).


def parse_override_value(raw: str, current: Any, key: str) -> Any:
    """`raw` converted to the type of the value it replaces (a literal for new keys)."""
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--config.{key}={raw!r} is not a boolean")
    if isinstance(current, (int, float)):
        try:
            return type(current)(raw)
        except ValueError:
            if isinstance(current, int):
                try:  # an int field given a float ("1e3") that is whole
                    value = float(raw)
                    if value.is_integer():
                        return int(value)
                except ValueError:
                    pass
            raise UserError(f"--config.{key}={raw!r} is not a {type(current).__name__}") from None
    if isinstance(current, (list, tuple)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = [x.strip() for x in raw.split(",") if x.strip()]  # "en,de"
        if not isinstance(value, (list, tuple)):
            value = [value]
        return type(current)(value)
    if isinstance(current, str):
        return raw
    try:  # None or a new key: a Python literal, else the string itself
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(config, overrides: Iterable[str], *, new_keys: bool | Collection[str] = True):
    """A copy of `config` (ConfigDict) with "a.b=value" overrides applied.

    Existing keys keep their type; a new key is allowed where its parent exists (optional
    data keys such as data.pose_header), parsed as a Python literal or kept as a string, unless
    `new_keys` is False (or is a collection of the dotted keys that may be new). Used by
    evaluate, convert and bench (train uses ml_collections' flags).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"config override {item!r}: expected --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, p in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise UserError(
                    f"--config.{key}: {'.'.join(parents[: i + 1])} is not in the config"
                )
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: {'.'.join(parents)} is not a group of settings")
        current = node[leaf] if leaf in node else None
        if isinstance(current, ml_collections.ConfigDict):
            raise UserError(f"--config.{key} is a group; set one of its keys: {sorted(current)}")
        allowed = new_keys if isinstance(new_keys, bool) else key in new_keys
        if leaf not in node and not allowed:
            raise UserError(f"--config.{key}: unknown key (known: {sorted(node.keys())})")
        value = parse_override_value(raw, current, key)
        try:
            node[leaf] = value
        except TypeError:
            # A field that held None (or a literal of another type): replace, don't coerce.
            node[leaf] = None
            node[leaf] = value
    return config


# ---------------------------------------------------------------------------------------------
# Command lines of the commands that load a trained model.


def add_checkpoint_args(parser) -> None:
    """--workdir | --checkpoint (one required) and --which: how embed, serve and convert name
    the checkpoint to load (argparse)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (its latest or best checkpoint)")
    src.add_argument("--checkpoint", help="one checkpoint step directory (WORKDIR/checkpoints/N)")
    parser.add_argument(
        "--which",
        default="latest",
        choices=("latest", "best"),
        help="checkpoint of --workdir to use (default: latest)",
    )
