"""Manifest: a CSV (with header) or JSONL file listing pose files and captions.

Bad rows do not stop a load: each is skipped, listed in `source.skipped` as ("FILE line N",
reason) (the input pipeline counts them with the examples it skips) and logged, the first few
one by one, then a count. A file with no usable row at all (not JSON lines, no pose column,
every row bad) is rejected with its first problem's line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from signclip_jax.data.sources.common import (
    TEXT_KEYS,
    normalize_split,
    read_text_bytes,
    undecodable_byte,
)
from signclip_jax.errors import DataError, UserError

log = logging.getLogger(__name__)

_POSE_KEYS = ("pose", "pose_path", "path", "file")
_STRING_KEYS = ("sign_language", "spoken_language", "signer")
# Bad rows logged one by one; the rest only in the count.
_LOG_EACH = 5

Row = tuple[int, "dict[str, Any] | None", str]  # (line number, row or None, error)


def _read_jsonl(data: bytes) -> list[Row]:
    rows: list[Row] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # this line only: the others may be fine
            byte = raw[e.start]
            rows.append(
                (lineno, None, f"not UTF-8 text (byte 0x{byte:02x} at column {e.start + 1})")
            )
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((lineno, None, f"invalid JSON ({e.msg}, column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append((lineno, None, f"{_kind(obj)} ({_clip(obj)}), not a JSON object"))
            continue
        rows.append((lineno, obj, ""))
    return rows


def _read_csv(data: bytes, path: str) -> list[Row]:
    # Undecodable bytes are kept as escapes and reported per record, with its line number.
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = None
    rows: list[Row] = []
    end = 0  # last line read so far: a record starts on the line after
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if reader.line_num == end:  # no progress: give up on the rest
                raise DataError(f"manifest {path} line {start}: {e}") from None
            end = reader.line_num
            rows.append((start, None, f"CSV error ({e})"))
            continue
        end = reader.line_num
        if not row:
            continue
        if header is None:
            header = [h.strip() for h in row]
            byte = undecodable_byte("".join(header))
            if byte is not None:
                raise DataError(
                    f"manifest {path} line {start} (the header): not UTF-8 text (byte 0x{byte:02x})"
                )
            if _first_key(dict.fromkeys(header), _POSE_KEYS) is None:
                raise DataError(
                    f"manifest {path} line {start}: the header {_clip(','.join(header))} has no "
                    f"pose column ({', '.join(_POSE_KEYS)}); is it a CSV file with a header?"
                )
            continue
        bad = [(i, b) for i, b in enumerate(map(undecodable_byte, row)) if b is not None]
        if bad:
            i, byte = bad[0]
            where = f"column {header[i]!r}" if i < len(header) else f"field {i + 1}"
            rows.append((start, None, f"not UTF-8 text (byte 0x{byte:02x} in {where})"))
        elif len(row) != len(header):
            rows.append((start, None, f"{len(row)} fields, header has {len(header)}"))
        else:
            rows.append((start, dict(zip(header, row)), ""))
    return rows


def _read_manifest_rows(path: str) -> tuple[list[Row], str]:
    """[(line number, row dict or None, error)], format ("jsonl" or "csv")."""
    fmt = "jsonl" if path.endswith((".jsonl", ".json", ".ndjson")) else "csv"
    data = read_text_bytes(path, "manifest")
    return (_read_jsonl(data) if fmt == "jsonl" else _read_csv(data, path)), fmt


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
    for k in keys:
        if k in row:
            return k
    return None


def _kind(value: Any) -> str:
    """'an object', 'a list', 'a number', ... (JSON's names for a value's type)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _clip(value: Any) -> str:
    """A value as it reads in the file: strings quoted, JSON values as JSON; at most 40 chars."""
    s = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def _wrong_type(key: str, value: Any, want: str = "a string") -> str:
    return f"{key} is {_kind(value)} ({_clip(value)}), not {want}"


def _row_split(row: dict[str, Any], checked: bool) -> tuple[str | None, str]:
    """The row's split (None: no split key, so every split) and an error ("" if none).

    Empty or null means train; names are checked only when a split is asked for (`checked`),
    so a manifest with its own split names still loads whole."""
    if "split" not in row:
        return None, ""
    value = row["split"]
    if value is None or value == "":
        return "train", ""
    if not isinstance(value, str):
        return None, _wrong_type("split", value)
    if not checked:
        return value, ""
    try:
        return normalize_split(value), ""
    except UserError:
        return None, f"unknown split {_clip(value)} (use train, val or test)"


def _parse_row(row: dict[str, Any], base: str) -> tuple[dict[str, Any] | None, str]:
    """One row's record fields (id may be None: numbered later), or None and the problem."""
    pose_key = _first_key(row, _POSE_KEYS)
    pose = row.get(pose_key) if pose_key else None
    if pose is not None and not isinstance(pose, str):
        return None, _wrong_type(pose_key, pose)
    pose = (pose or "").strip()
    if not pose:
        return None, "no pose file"
    if "\0" in pose:
        return None, f"{pose_key} holds a NUL character"
    text_key = _first_key(row, TEXT_KEYS)
    text = row.get(text_key) if text_key else ""
    if text is None:
        text = "nan"  # as the original's pandas reading of an empty caption
    elif not isinstance(text, str):
        return None, _wrong_type(text_key, text)
    id_ = row.get("id")
    if isinstance(id_, bool) or not isinstance(id_, (str, int, type(None))):
        return None, _wrong_type("id", id_, "a string or an integer")
    label = row.get("label", "")
    if isinstance(label, bool) or not isinstance(label, (str, int, float, type(None))):
        return None, _wrong_type("label", label, "a string or an integer")
    out = {
        "id": None if id_ in (None, "") else str(id_),
        "pose_path": pose if os.path.isabs(pose) else os.path.join(base, pose),
        "text": text,
        "label": label,
    }
    for key in _STRING_KEYS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            return None, _wrong_type(key, value)
        out[key] = value or ""
    return out, ""


class ManifestSource:
    """A CSV (with header) or JSONL manifest: one example per row.

    Columns: `pose` (or pose_path/path/file; relative to the manifest's folder, or absolute),
    `text` (or gloss/caption), optional `id`, `label` (integers, or names mapped to ids in
    sorted order: `self.label_names`), `sign_language`, `spoken_language`, `signer`, `split`
    (rows are kept when it equals `split`; empty or null means train; a row without the key
    is in every split; no `split` argument keeps all rows). Missing languages default to
    `default_sign_language` / `default_spoken_language`.

    JSON values must have the right type: strings (id and label may also be integers); a
    row holding an object, list or number where a string is needed is skipped, never turned
    into text. Each skipped row is in `self.skipped` ("FILE line N", reason); rows of other
    splits are not checked. Repeated ids are kept and counted (`self.duplicate_ids`) with one
    warning. DataError, naming the file and a line, when no row at all is usable.
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
        if not rows:
            raise DataError(f"manifest {self.path} has no rows")
        self.skipped: list[tuple[str, str]] = []
        kept: list[dict[str, Any]] = []
        other_ids: list[tuple[str, int]] = []  # explicit ids of other splits' rows
        usable = 0  # good rows of any split
        first_bad: tuple[int, str] | None = None
        for lineno, row, error in rows:
            row_split, record = None, None
            if row is not None:
                row_split, error = _row_split(row, checked=want is not None)
                if not error:
                    record, error = _parse_row(row, base)
            if error:
                first_bad = first_bad or (lineno, error)
                # A bad row of another (known) split is that split's to count.
                if want is None or row_split in (None, want):
                    self.skipped.append((f"{self.path} line {lineno}", error))
                continue
            usable += 1
            if want is not None and row_split not in (None, want):
                if record["id"] is not None:
                    other_ids.append((record["id"], lineno))
                continue
            record["sign_language"] = record["sign_language"] or default_sign_language
            record["spoken_language"] = record["spoken_language"] or default_spoken_language
            record["id"] = record["id"] if record["id"] is not None else str(len(kept))
            record["_line"] = lineno
            kept.append(record)
        if not usable:
            line, reason = first_bad
            hint = ""
            if self.format == "jsonl" and all(e.startswith("invalid JSON") for _, r, e in rows):
                hint = "; is it a JSON lines file (one object per line)?"
            raise DataError(
                f"manifest {self.path} has no usable rows: all {len(rows)} are bad (first, "
                f"line {line}: {reason}){hint}"
            )
        if want is not None and not kept:
            if self.skipped:
                name, reason = self.skipped[0]
                raise DataError(
                    f"manifest {self.path} has no usable rows for split {want!r}: all "
                    f"{len(self.skipped)} were skipped (first, {name[len(self.path) + 1 :]}: "
                    f"{reason})"
                )
            raise DataError(f"manifest {self.path} has no rows for split {want!r}")
        self.label_names = _assign_labels(kept, self.path)
        self._rows = kept
        for name, reason in self.skipped[:_LOG_EACH]:
            log.warning("skipping %s: %s", name, reason)
        if self.skipped:
            log.warning(
                "manifest %s: %d of %d rows%s skipped as unusable%s",
                self.path,
                len(self.skipped),
                len(self.skipped) + len(kept),
                "" if want is None else f" of split {want!r}",
                f" (the first {_LOG_EACH} are listed above)"
                if len(self.skipped) > _LOG_EACH
                else "",
            )
        self.duplicate_ids = _warn_duplicates(kept, other_ids, self.path)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = dict(self._rows[index])
        r.pop("_line")
        return r

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, n={len(self)})"


def _warn_duplicates(
    kept: list[dict[str, Any]], other_ids: list[tuple[str, int]], path: str
) -> int:
    """Rows whose id an earlier row (of any split) already has; one warning naming the first."""
    first_line: dict[str, int] = {}
    repeats = 0
    example = ""
    for id_, line in sorted([(r["id"], r["_line"]) for r in kept] + other_ids, key=lambda x: x[1]):
        if id_ in first_line:
            repeats += 1
            example = example or f"id {id_!r} on lines {first_line[id_]} and {line}"
        else:
            first_line[id_] = line
    if repeats:
        log.warning(
            "manifest %s: %d %s an id of an earlier row (first: %s); ids should name one "
            "example each",
            path,
            repeats,
            "row repeats" if repeats == 1 else "rows repeat",
            example,
        )
    return repeats


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
