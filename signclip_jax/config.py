"""Helpers shared by the configs in configs/ (not the configs themselves).

`get_config(arg)` in each config file receives the text after `:` in
`--config=configs/x.py:arg`; `parse_arg` turns `"key=value,flag"` into typed values.
"""

from __future__ import annotations

import ast
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
