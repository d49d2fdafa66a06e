"""What every source shares: split names and the record dict (see the package docstring)."""

from __future__ import annotations

import codecs
import os
import re
from typing import Any

from signclip_jax.errors import DataError, UserError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}

# Column / key names that hold the caption, in order of preference (manifests, tfds examples).
TEXT_KEYS = ("text", "gloss", "caption")


def normalize_split(split: str) -> str:
    """Canonical split name: "validation" -> "val" etc.; "all" passes through."""
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in (*SPLITS, "all"):
        raise UserError(f"unknown split {split!r}; use one of train, val, test, all")
    return s


def make_record(
    id_: str,
    *,
    text: str = "",
    sign_language: str = "",
    spoken_language: str = "",
    label: int = -1,
    signer: str = "",
    **pose: Any,
) -> dict[str, Any]:
    """One record: the metadata fields with their defaults, plus the pose entry (`**pose`)."""
    return {
        "id": id_,
        "text": text,
        "sign_language": sign_language,
        "spoken_language": spoken_language,
        "label": int(label),
        "signer": signer,
        **pose,
    }


# Undecodable bytes, as Python's surrogateescape error handler keeps them.
_ESCAPED = re.compile("[\udc80-\udcff]")


def undecodable_byte(text: str) -> int | None:
    """The first byte that is not UTF-8, kept in `text` by the surrogateescape handler, or
    None: a bad row is that row's problem, named with its line, not the whole file's."""
    m = _ESCAPED.search(text)
    return None if m is None else ord(m.group()) - 0xDC00


def read_text_bytes(path: str | os.PathLike, what: str) -> bytes:
    """A text file's bytes without a UTF-8 byte-order mark (decode them per row, with
    surrogateescape). Unreadable: DataError 'cannot read WHAT PATH: why'."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data
