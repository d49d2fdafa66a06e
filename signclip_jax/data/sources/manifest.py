"""Manifest: a CSV (with header) or JSONL file listing pose files and captions."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from signclip_jax.data.sources.common import TEXT_KEYS, normalize_split
from signclip_jax.errors import DataError

log = logging.getLogger(__name__)

_POSE_KEYS = ("pose", "pose_path", "path", "file")


def _read_manifest_rows(path: str) -> tuple[list[tuple[int, dict[str, Any] | None, str]], str]:
    """[(line number, row dict or None, error)], format."""
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    fmt = "jsonl" if path.endswith((".jsonl", ".json", ".ndjson")) else "csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if fmt == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        rows.append((lineno, None, f"invalid JSON ({e.msg})"))
                        continue
                    if not isinstance(obj, dict):
                        rows.append((lineno, None, "not a JSON object"))
                        continue
                    rows.append((lineno, obj, ""))
            else:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    return [], fmt
                header = [h.strip() for h in header]
                for row in reader:
                    if not row:
                        continue
                    lineno = reader.line_num
                    if len(row) != len(header):
                        rows.append((lineno, None, f"{len(row)} fields, header has {len(header)}"))
                        continue
                    rows.append((lineno, dict(zip(header, row)), ""))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from None
    return rows, fmt


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
    for k in keys:
        if k in row:
            return k
    return None


class ManifestSource:
    """A CSV (with header) or JSONL manifest: one example per row.

    Columns: `pose` (or pose_path/path/file; relative to the manifest's folder, or absolute),
    `text` (or gloss/caption), optional `id`, `label` (integers, or names mapped to ids in
    sorted order: `self.label_names`), `sign_language`, `spoken_language`, `signer`, `split`
    (rows are kept when it equals `split`; no `split` argument keeps all rows). Missing
    languages default to `default_sign_language` / `default_spoken_language`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        default_sign_language: str = "ase",
        default_spoken_language: str = "en",
    ):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"manifest {self.path} does not exist")
        base = os.path.dirname(os.path.abspath(self.path))
        want = None if split in (None, "", "all") else normalize_split(split)
        rows, self.format = _read_manifest_rows(self.path)
        self.skipped: list[tuple[str, str]] = []
        kept: list[dict[str, Any]] = []
        for lineno, row, error in rows:
            name = f"{self.path} line {lineno}"
            if row is None:
                self.skipped.append((name, f"malformed row: {error}"))
                continue
            if want is not None and "split" in row:
                if normalize_split(str(row["split"]) or "train") != want:
                    continue
            pose_key = _first_key(row, _POSE_KEYS)
            pose = str(row.get(pose_key) or "").strip() if pose_key else ""
            if not pose:
                self.skipped.append((name, "malformed row: no pose file"))
                continue
            text_key = _first_key(row, TEXT_KEYS)
            text = row.get(text_key) if text_key else ""
            kept.append(
                {
                    "id": str(row.get("id") or f"{len(kept)}"),
                    "pose_path": pose if os.path.isabs(pose) else os.path.join(base, pose),
                    "text": "nan" if text is None else str(text),
                    "sign_language": str(row.get("sign_language") or default_sign_language),
                    "spoken_language": str(row.get("spoken_language") or default_spoken_language),
                    "label": row.get("label", ""),
                    "signer": str(row.get("signer") or ""),
                    "_line": lineno,
                }
            )
        if not rows:
            raise DataError(f"manifest {self.path} has no rows")
        self.label_names = _assign_labels(kept, self.path)
        if want is not None and not kept and not self.skipped:
            raise DataError(f"manifest {self.path} has no rows for split {want!r}")
        self._rows = kept
        for name, reason in self.skipped[:5]:
            log.warning("skipping %s: %s", name, reason)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = dict(self._rows[index])
        r.pop("_line")
        return r

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, n={len(self)})"


def _assign_labels(rows: list[dict[str, Any]], path: str) -> list[str] | None:
    """Integer labels stay; any non-integer label -> names mapped to ids in sorted order."""
    raw = [r["label"] for r in rows]
    present = [v for v in raw if v not in ("", None)]
    ints = []
    for v in present:
        try:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            ints.append(int(v))
        except (TypeError, ValueError):
            break
    else:
        for r in rows:
            r["label"] = -1 if r["label"] in ("", None) else int(r["label"])
        return None
    names = sorted({str(v) for v in present})
    ids = {n: i for i, n in enumerate(names)}
    for r in rows:
        r["label"] = -1 if r["label"] in ("", None) else ids[str(r["label"])]
    log.info("%s: %d label names mapped to ids 0..%d", path, len(names), len(names) - 1)
    return names
