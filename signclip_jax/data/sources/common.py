"""What every source shares: split names and the record dict (see the package docstring)."""

from __future__ import annotations

from typing import Any

from signclip_jax.errors import UserError

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
