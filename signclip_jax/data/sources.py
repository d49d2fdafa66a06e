"""Random-access data sources: `len(source)` and `source[i] -> record dict`.

Every source is picklable (grain worker processes unpickle it) and cheap to index: nothing
heavy happens in `__getitem__` except reading one record. Pose decoding happens later, in
the pipeline (`pipeline.load_pose_array`), so that a bad file is a counted skip there.

A record is a dict with
  "id"               str   stable name of the example (CSV row index, manifest id, ...)
  one pose entry:    "pose_path" str | "pose_bytes" bytes (an encoded .pose file)
                     | "pose" pose_format.Pose (tfds examples that carry the arrays)
                     | "points" [T, P, 3] float32 + "observed" [T, P] bool + "fps" (packed
                       shards: the normalised PoseArray, so augmentation still works)
                     | "features" [T, D] float32 (precomputed features; no augmentation)
  "text"             str   raw caption (not yet a prompt)
  "sign_language"    str   e.g. "ase"
  "spoken_language"  str   e.g. "en"
  "label"            int   class id, -1 if none
  "signer"           str   "" if none
and, for a row that could not be parsed, "error": str (the pipeline counts it as skipped).

Rows dropped while a source is built (malformed CSV/JSONL lines) are listed in
`source.skipped` as (name, reason) pairs, so the pipeline can count them with the rest.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import random
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from signclip_jax import config as config_lib
from signclip_jax.errors import DataError, UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}

# The original reads the metadata CSV with pandas (`dtype=str`), whose default NA strings turn
# into float NaN and then into the literal prompt text "nan" (reference 6.4, 11.3 item 17).
# pandas 2.x's default list, so captions match what the original model was trained on.
PANDAS_NA_STRINGS = frozenset(
    {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    }
)  # fmt: skip

SPREADTHESIGN_COLUMNS = ("pose", "videoLanguage", "language", "text")


def normalize_split(split: str) -> str:
    """Canonical split name: "validation" -> "val" etc.; "all" passes through."""
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in (*SPLITS, "all"):
        raise UserError(f"unknown split {split!r}; use one of train, val, test, all")
    return s


def _record(
    id_: str,
    *,
    text: str = "",
    sign_language: str = "",
    spoken_language: str = "",
    label: int = -1,
    signer: str = "",
    **pose: Any,
) -> dict[str, Any]:
    return {
        "id": id_,
        "text": text,
        "sign_language": sign_language,
        "spoken_language": spoken_language,
        "label": int(label),
        "signer": signer,
        **pose,
    }


# ---------------------------------------------------------------------------------------------
# Spreadthesign: metadata CSV + pose directory, splits as sign-language-datasets' 1.0.0-uzh.


def generate_split_ids(
    num_rows: int,
    *,
    seed: int = 3407,
    val_fraction: float = 0.001,
    test_fraction: float = 0.001,
) -> dict[str, list[int]]:
    """Row ids of each split, as sign-language-datasets' `splits/1.0.0-uzh/split.py`.

    All rows (every spoken language) are shuffled with Python's `random.seed(seed)`;
    val = the first int(N * val_fraction), test = the next int(N * test_fraction), train =
    the rest. Deviation (documented): when a fraction is > 0 but gives 0 rows (N < 1000 for
    0.001) we keep 1 row, as long as train keeps at least one; for N >= 1000 the result is
    identical to the original's.
    """
    ids = list(range(num_rows))
    random.Random(seed).shuffle(ids)  # same stream as random.seed(seed); random.shuffle(ids)
    n_val = int(num_rows * val_fraction)
    n_test = int(num_rows * test_fraction)
    if val_fraction > 0 and n_val == 0 and num_rows - n_test >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and num_rows - n_val >= 2:
        n_test = 1
    return {
        "val": ids[:n_val],
        "test": ids[n_val : n_val + n_test],
        "train": ids[n_val + n_test :],
    }


def read_split_file(path: str | os.PathLike) -> list[int]:
    """One integer CSV row index per line (blank lines ignored)."""
    out = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(int(line))
                except ValueError:
                    raise DataError(
                        f"split file {path} line {lineno}: {line[:40]!r} is not a row index"
                    ) from None
    except OSError as e:
        raise DataError(f"cannot read split file {path}: {e.strerror or e}") from None
    return out


def _read_csv_rows(path: str | os.PathLike) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            # pandas skips blank lines (skip_blank_lines=True), so they take no row index.
            return [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read metadata CSV {path}: {e}") from None


def _detect_layout(first: list[str]) -> tuple[dict[str, int], bool]:
    """Column positions and whether the first row is a header.

    A header naming pose/videoLanguage/language/text -> those columns (any order). Otherwise
    positional (0 pose, 1 sign language, 2 spoken language, 3 text, as sign-language-datasets
    reads it): the first row is data when its first cell names a .pose file, else a header.
    """
    names = [c.strip() for c in first]
    if all(c in names for c in SPREADTHESIGN_COLUMNS):
        return {c: names.index(c) for c in SPREADTHESIGN_COLUMNS}, True
    positional = dict(zip(SPREADTHESIGN_COLUMNS, range(4)))
    is_header = not names[0].lower().endswith(".pose")
    return positional, is_header


class SpreadthesignSource:
    """Spreadthesign metadata CSV + pose folder (reference 6.4).

    Row id = 0-based data-row index (as the original's `reset_index()` and the split files).
    The split is selected first (split files or the generated 1.0.0-uzh procedure, over ALL
    rows), then the spoken-language filter (default English only, `language == 'en'`).
    Captions that pandas would read as NaN become "nan", as in the original.

    Missing pose files: the original silently keeps only rows whose file exists. We keep such
    rows (no file-system scan of 450k files at start-up) and the pipeline counts each as a
    skipped example, so the user sees how many there are. `drop_missing=True` instead checks
    every file here and lists the missing ones in `self.skipped`.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        pose_dir: str | os.PathLike,
        *,
        split: str = "train",
        split_dir: str | os.PathLike | None = None,
        split_seed: int = 3407,
        val_fraction: float = 0.001,
        test_fraction: float = 0.001,
        languages: Sequence[str] | None = ("en",),
        drop_missing: bool = False,
    ):
        self.csv_path = str(csv_path)
        self.pose_dir = str(pose_dir)
        self.split = normalize_split(split)
        if not os.path.isfile(self.csv_path):
            raise DataError(f"metadata CSV {self.csv_path} does not exist")
        if not os.path.isdir(self.pose_dir):
            raise DataError(f"pose directory {self.pose_dir} does not exist")
        rows = _read_csv_rows(self.csv_path)
        if not rows:
            raise DataError(f"metadata CSV {self.csv_path} is empty")
        columns, has_header = _detect_layout(rows[0])
        data = rows[1:] if has_header else rows
        self.num_rows = len(data)
        self.columns = columns

        if self.split == "all":
            ids = list(range(self.num_rows))
        elif split_dir:
            ids = read_split_file(Path(split_dir) / f"{self.split}.txt")
            bad = [i for i in ids if not 0 <= i < self.num_rows]
            if bad:
                raise DataError(
                    f"split file {Path(split_dir) / (self.split + '.txt')} names row {bad[0]} "
                    f"but {self.csv_path} has {self.num_rows} data rows ({len(bad)} such ids)"
                )
        else:
            ids = generate_split_ids(
                self.num_rows,
                seed=split_seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
            )[self.split]
        # The split files list ids in shuffled order; the original iterates the CSV in row
        # order and keeps rows whose id is in the split, so sort.
        ids = sorted(set(ids))

        langs = set(languages) if languages else None
        width = max(columns.values()) + 1
        self._rows: list[tuple[int, str, str, str, str]] = []
        self.skipped: list[tuple[str, str]] = []
        for i in ids:
            row = data[i]
            name = f"{self.csv_path} row {i}"
            if len(row) < width:
                if langs is not None and len(row) > columns["language"]:
                    if row[columns["language"]] not in langs:
                        continue
                self.skipped.append((name, f"malformed row: {len(row)} fields, need {width}"))
                continue
            spoken = row[columns["language"]]
            if langs is not None and spoken not in langs:
                continue
            pose = row[columns["pose"]].strip()
            if not pose:
                self.skipped.append((name, "malformed row: empty pose file name"))
                continue
            text = row[columns["text"]]
            if text in PANDAS_NA_STRINGS:
                text = "nan"
            self._rows.append((i, pose, row[columns["videoLanguage"]], spoken, text))
        if drop_missing:
            kept = []
            for r in self._rows:
                if os.path.exists(os.path.join(self.pose_dir, r[1])):
                    kept.append(r)
                else:
                    self.skipped.append((os.path.join(self.pose_dir, r[1]), "missing file"))
            self._rows = kept
        for name, reason in self.skipped[:5]:
            log.warning("skipping %s: %s", name, reason)
        if len(self.skipped) > 5:
            log.warning("... %d rows skipped in total in %s", len(self.skipped), self.csv_path)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, pose, signed, spoken, text = self._rows[index]
        return _record(
            str(i),
            text=text,
            sign_language=signed,
            spoken_language=spoken,
            pose_path=os.path.join(self.pose_dir, pose),
        )

    def row_ids(self) -> list[int]:
        """CSV row index of every record, in source order."""
        return [r[0] for r in self._rows]

    def __repr__(self) -> str:
        return f"SpreadthesignSource({self.csv_path!r}, split={self.split!r}, n={len(self)})"


# ---------------------------------------------------------------------------------------------
# Manifest: CSV or JSONL listing pose files and captions.

_POSE_KEYS = ("pose", "pose_path", "path", "file")
_TEXT_KEYS = ("text", "gloss", "caption")


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
            text_key = _first_key(row, _TEXT_KEYS)
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


# ---------------------------------------------------------------------------------------------
# Packed ArrayRecord shards (written by `python -m signclip_jax.prepare`).

PACKED_MAGIC = b"SCJ1"
PACKED_INDEX = "index.json"
PACKED_FORMAT = "signclip-jax-packed"
PACKED_VERSION = 1


def encode_packed(
    points: np.ndarray, observed: np.ndarray, fps: float, meta: dict[str, Any], dtype: str
) -> bytes:
    """One packed record: magic, uint32 header length, JSON header, points, observed bits.

    points [T, P, 3] stored as `dtype` (float16 or float32), observed [T, P] as packed bits.
    No pickle: the shards are safe to read from untrusted places.
    """
    if dtype not in ("float16", "float32"):
        raise UserError(f"packed dtype must be float16 or float32, got {dtype!r}")
    t, p, c = points.shape
    header = dict(meta, frames=t, points=p, channels=c, fps=float(fps), dtype=dtype)
    head = json.dumps(header, ensure_ascii=False).encode()
    body = np.ascontiguousarray(points, dtype=dtype).tobytes()
    bits = np.packbits(np.asarray(observed, bool).reshape(-1)).tobytes()
    return PACKED_MAGIC + struct.pack("<I", len(head)) + head + body + bits


def decode_packed(data: bytes, *, name: str = "packed record") -> dict[str, Any]:
    """Inverse of `encode_packed` -> record dict with points (float32), observed, fps."""
    try:
        if data[:4] != PACKED_MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8 : 8 + n].decode())
        t, p, c = header.pop("frames"), header.pop("points"), header.pop("channels")
        dtype = np.dtype(header.pop("dtype"))
        start = 8 + n
        end = start + t * p * c * dtype.itemsize
        points = np.frombuffer(data, dtype, t * p * c, start).reshape(t, p, c)
        bits = np.frombuffer(data, np.uint8, offset=end)
        observed = np.unpackbits(bits, count=t * p).astype(bool).reshape(t, p)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, TypeError) as e:
        raise DataError(f"{name} is not a valid packed pose record ({e})") from None
    fps = header.pop("fps")
    return _record(
        str(header.pop("id")),
        text=header.pop("text", ""),
        sign_language=header.pop("sign_language", ""),
        spoken_language=header.pop("spoken_language", ""),
        label=header.pop("label", -1),
        signer=header.pop("signer", ""),
        points=points.astype(np.float32),
        observed=observed,
        fps=float(fps),
    )


def _resolve_shards(shards: str | os.PathLike | Sequence[str]) -> tuple[list[str], dict | None]:
    if isinstance(shards, (list, tuple)):
        paths = [str(s) for s in shards]
        index = None
    elif os.path.isdir(shards):
        index_path = os.path.join(shards, PACKED_INDEX)
        if not os.path.isfile(index_path):
            raise DataError(f"{shards} has no {PACKED_INDEX}: not a folder written by prepare")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {index_path}: {e}") from None
        if index.get("format") != PACKED_FORMAT:
            raise DataError(f"{index_path} is not a {PACKED_FORMAT} index")
        paths = [os.path.join(shards, s["file"]) for s in index["shards"]]
    else:
        paths = sorted(glob.glob(str(shards)))
        index = None
        folder = os.path.dirname(paths[0]) if paths else ""
        if paths and os.path.isfile(os.path.join(folder, PACKED_INDEX)):
            with open(os.path.join(folder, PACKED_INDEX)) as f:
                index = json.load(f)
    if not paths:
        raise DataError(f"no packed shards found at {shards}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"packed shard {missing[0]} does not exist ({len(missing)} missing)")
    return paths, index


class PackedSource:
    """Records from ArrayRecord shards written by `prepare` (a folder, a glob or a list).

    Each record holds the normalised pose (points [T, P, 3] at full length, observed
    [T, P]), so features and augmentation are the same as from the .pose files; float32
    shards reproduce them bit-exactly. `self.index` is the folder's index.json (or None).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str]):
        self.paths, self.index = _resolve_shards(shards)
        self.skipped: list[tuple[str, str]] = []
        self._reader = None
        self._len = len(self._open())

    def _open(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            try:
                self._reader = ArrayRecordDataSource(self.paths)
            except Exception as e:  # array_record raises RuntimeError/ValueError on bad files
                raise DataError(f"cannot open packed shards {self.paths[0]}...: {e}") from None
        return self._reader

    def __getstate__(self):
        # Reopened lazily in each worker process.
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = self._open()[index]
        return decode_packed(data, name=f"packed record {index} of {self.paths[0]}...")

    @property
    def components(self) -> list[str] | None:
        return None if self.index is None else self.index.get("pose_spec", {}).get("components")

    def __repr__(self) -> str:
        return f"PackedSource({len(self.paths)} shards, n={len(self)})"


# ---------------------------------------------------------------------------------------------
# tfds (ArrayRecord data_source, no TensorFlow) and sign-language-datasets (TensorFlow).


def _require_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            "tfds data sources need tensorflow-datasets (no TensorFlow required): "
            "pip install 'signclip-jax[tfds]' (tensorflow-datasets>=4.9.10 importlib_resources)"
            f" [{e}]"
        ) from None
    return tfds


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return "" if value is None else str(value)


def _read_pose_header(path: str):
    """PoseHeader from a .pose or .poseheader file."""
    from pose_format.pose_header import PoseHeader
    from pose_format.utils.reader import BufferReader

    try:
        with open(path, "rb") as f:
            return PoseHeader.read(BufferReader(f.read()))
    except Exception as e:
        raise DataError(f"cannot read a pose header from {path}: {e}") from None


def example_to_record(
    example: dict[str, Any], index: int, *, header=None, header_name: str = ""
) -> dict[str, Any]:
    """A sign-language-datasets-style example -> record.

    Pose: "pose" as a dict {"data" [T,1,P,3], "conf" [T,1,P], "fps"} (PoseFeature; laid out
    by `header`, e.g. the dataset's holistic.poseheader, by default the MediaPipe Holistic
    layout with that many points), as bytes of an encoded .pose file,
    or "pose_path" (Spreadthesign's builder stores only the path). Text: "text", else
    "gloss". Label: "label"/"gloss_id" when integer.
    """
    id_ = _as_str(example.get("id")) or str(index)
    text = next((example[k] for k in _TEXT_KEYS if k in example), "")
    label = -1
    for k in ("label", "gloss_id"):
        v = example.get(k)
        if v is not None and np.issubdtype(np.asarray(v).dtype, np.integer):
            label = int(v)
            break
    meta = dict(
        text=_as_str(text),
        sign_language=_as_str(example.get("sign_language", example.get("signed_language"))),
        spoken_language=_as_str(example.get("spoken_language")),
        label=label,
        signer=_as_str(example.get("signer", example.get("signer_id", ""))),
    )
    pose = example.get("pose")
    if isinstance(pose, dict) and "data" in pose:
        if header is None:
            header, header_name = default_holistic_header(np.shape(pose["data"]))
        if header is None:
            return _record(
                id_,
                **meta,
                error=f"example carries pose arrays of shape {np.shape(pose['data'])} that match "
                "no MediaPipe Holistic layout; set data.pose_header to a .pose or .poseheader "
                "file with the same layout",
            )
        return _record(id_, **meta, pose=_pose_from_arrays(pose, header, id_, header_name))
    if isinstance(pose, (bytes, np.bytes_)):
        return _record(id_, **meta, pose_bytes=bytes(pose))
    path = example.get("pose_path")
    if path is not None:
        return _record(id_, **meta, pose_path=_as_str(path))
    return _record(id_, **meta, error="example has no pose (pose/pose_path)")


def default_holistic_header(shape: tuple[int, ...]):
    """(header, name) of the MediaPipe Holistic layout with shape[2] points, else (None, "").

    576 / 543 points: 468-point face with / without POSE_WORLD_LANDMARKS (sign-language-datasets'
    holistic.poseheader); 586 / 553: the refined 478-point face.
    """
    from signclip_jax.data.synthetic import holistic_header

    if len(shape) != 4:
        return None, ""
    for face in (468, 478):
        for world in (True, False):
            if shape[2] == 33 + face + 42 + (33 if world else 0):
                return holistic_header(face, world), f"<holistic face={face} world={world}>"
    return None, ""


def _pose_from_arrays(pose: dict[str, Any], header, id_: str, header_name: str):
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody

    data = np.asarray(pose["data"], np.float32)
    conf = np.asarray(pose["conf"], np.float32)
    points = sum(len(c.points) for c in header.components)
    if data.ndim != 4 or data.shape[2] != points or conf.shape != data.shape[:3]:
        raise DataError(
            f"example {id_}: pose data of shape {data.shape} (confidence {conf.shape}) does "
            f"not fit header {header_name} with {points} points: expected [T, people, "
            f"{points}, dims]"
        )
    masked = np.ma.masked_array(data, mask=np.repeat((conf == 0)[..., None], data.shape[-1], -1))
    return Pose(header, NumPyPoseBody(fps=float(pose["fps"]), data=masked, confidence=conf))


class TfdsSource:
    """A tfds dataset prepared with file_format="array_record", read with `tfds.data_source`
    (random access, no TensorFlow). Examples are mapped by `example_to_record`.

    `name` is a registered dataset name (with `data_dir`), or a builder directory
    (`.../name/config/version`) read with `tfds.builder_from_directory`.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        pose_header: str | None = None,
    ):
        _require_tfds()
        self.name, self.data_dir = name, data_dir or None
        self.split = {"val": "validation"}.get(split, split)
        self.pose_header = pose_header or None
        self.skipped: list[tuple[str, str]] = []
        self._ds = None
        self._header = None
        self._builder_dir: str | None = None
        self._len = len(self._open())

    def _open(self):
        if self._ds is None:
            tfds = _require_tfds()
            folder = self._builder_dir or self.name
            try:
                if os.path.isfile(os.path.join(folder, "dataset_info.json")):
                    builder = tfds.builder_from_directory(folder)
                else:
                    builder = tfds.builder(self.name, data_dir=self.data_dir)
                self._ds = builder.as_data_source(split=self.split)
                # Worker processes reopen the prepared folder: no builder class needed there.
                self._builder_dir = str(builder.data_dir)
            except UserError:
                raise
            except Exception as e:
                raise DataError(
                    f"cannot open tfds dataset {self.name!r} split {self.split!r} "
                    f"(data_dir={self.data_dir}): {type(e).__name__}: {e}"
                ) from None
            if self.pose_header:
                self._header = _read_pose_header(self.pose_header)
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None, "_header": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._open()[index]
        return example_to_record(
            example, index, header=self._header, header_name=self.pose_header or ""
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class SignLanguageDatasetsSource:
    """A sign-language-datasets builder (needs TensorFlow: the `sld` extra).

    Registers the builders by importing `sign_language_datasets.datasets`, prepares the
    dataset as array_record and then reads it like `TfdsSource`.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        builder_kwargs: dict[str, Any] | None = None,
        pose_header: str | None = None,
    ):
        try:
            import sign_language_datasets.datasets  # noqa: F401  (registers the builders)
            import tensorflow  # noqa: F401
        except ImportError as e:
            raise UserError(
                "data.source='sld' needs sign-language-datasets and TensorFlow (about 2 GB): "
                "pip install 'signclip-jax[sld]'; or prepare the dataset elsewhere and use "
                f"data.source='tfds' (array_record, no TensorFlow) [{e}]"
            ) from None
        tfds = _require_tfds()
        builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
        builder.download_and_prepare(file_format="array_record")
        self._inner = TfdsSource(builder.data_dir, split, pose_header=pose_header)
        self.skipped = self._inner.skipped

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._inner[index]


# ---------------------------------------------------------------------------------------------
# From a config.


def make_source(config, *, split: str | None = None, workdir: str | None = None):
    """Source for `config.data` (an ml_collections ConfigDict, or the whole config).

    data.source: spreadthesign (csv_path, pose_dir, split_dir, split_seed, val_fraction,
    test_fraction, languages) | manifest (manifest) | tfds (tfds_name, data_dir, pose_header)
    | sld (tfds_name, data_dir) | packed (shards; a "{split}" in it becomes the split name)
    | synthetic (synthetic_dir, synthetic_signs, synthetic_signers, synthetic_seed,
    synthetic_sign_languages; generated there when absent, default folder
    `workdir/synthetic_data`, then read as spreadthesign). `split` defaults to
    data.split, else "train".
    """
    data = config_lib.section(config, "data")
    kind = str(config_lib.get(data, "source", "spreadthesign")).lower()
    split = normalize_split(split or config_lib.get(data, "split", "train"))

    def need(key: str) -> str:
        value = config_lib.get(data, key, "")
        if value in ("", None):
            raise UserError(f"data.source={kind!r} needs data.{key}")
        return str(value)

    languages = config_lib.get(data, "languages", ("en",))
    if isinstance(languages, str):
        languages = tuple(x for x in languages.split(",") if x)
    st_kwargs = dict(
        split=split,
        split_dir=config_lib.get(data, "split_dir", "") or None,
        split_seed=int(config_lib.get(data, "split_seed", 3407)),
        val_fraction=float(config_lib.get(data, "val_fraction", 0.001)),
        test_fraction=float(config_lib.get(data, "test_fraction", 0.001)),
        languages=tuple(languages) or None,
        drop_missing=bool(config_lib.get(data, "drop_missing", False)),
    )
    if kind == "spreadthesign":
        return SpreadthesignSource(need("csv_path"), need("pose_dir"), **st_kwargs)
    if kind == "synthetic":
        folder = config_lib.get(data, "synthetic_dir", "")
        if not folder:
            if not workdir or "://" in str(workdir):
                raise UserError("data.source='synthetic' needs data.synthetic_dir")
            folder = os.path.join(str(workdir), "synthetic_data")
        csv_path = ensure_synthetic(
            folder,
            num_signs=int(config_lib.get(data, "synthetic_signs", 8)),
            signers=int(config_lib.get(data, "synthetic_signers", 6)),
            seed=int(config_lib.get(data, "synthetic_seed", 0)),
            sign_languages=tuple(config_lib.get(data, "synthetic_sign_languages", ())) or None,
        )
        return SpreadthesignSource(csv_path, Path(csv_path).parent / "poses", **st_kwargs)
    if kind == "manifest":
        return ManifestSource(need("manifest"), split=None if split == "all" else split)
    if kind == "packed":
        # "packed/{split}" names one folder per split (prepare each split separately).
        shards = need("shards")
        if "{split}" in shards:
            return PackedSource(shards.replace("{split}", split))
        if split != "train":
            log.warning("data.shards has no {split} placeholder: split %r reads %s", split, shards)
        return PackedSource(shards)
    if kind == "tfds":
        return TfdsSource(
            need("tfds_name"),
            split,
            config_lib.get(data, "data_dir", "") or None,
            pose_header=config_lib.get(data, "pose_header", "") or None,
        )
    if kind == "sld":
        return SignLanguageDatasetsSource(
            need("tfds_name"),
            split,
            config_lib.get(data, "data_dir", "") or None,
            pose_header=config_lib.get(data, "pose_header", "") or None,
        )
    raise UserError(
        f"unknown data.source {kind!r}; use spreadthesign, manifest, tfds, sld, packed or synthetic"
    )


def ensure_synthetic(
    directory: str | os.PathLike,
    *,
    num_signs: int = 8,
    signers: int = 6,
    seed: int = 0,
    sign_languages: tuple[str, ...] | None = None,
) -> Path:
    """The metadata CSV of a synthetic dataset in `directory`, generated once.

    A marker file records the parameters: a folder made with other ones is an error rather
    than silently reused.
    """
    from signclip_jax.data.synthetic import write_synthetic_dataset

    directory = Path(directory)
    params = {"num_signs": num_signs, "signers": signers, "seed": seed}
    extra = {}
    if sign_languages:  # only recorded when set, so older marker files stay valid
        params["sign_languages"] = list(sign_languages)
        extra["sign_languages"] = tuple(sign_languages)
    marker = directory / "synthetic.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("params") != params:
            raise UserError(
                f"{directory} holds a synthetic dataset made with {info.get('params')}, "
                f"not {params}: use another data.synthetic_dir"
            )
        return directory / info["csv"]
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = Path(
        write_synthetic_dataset(directory, num_signs=num_signs, signers=signers, seed=seed, **extra)
    )
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"params": params, "csv": os.path.relpath(csv_path, directory)}))
    os.replace(tmp, marker)
    return csv_path


__all__ = [
    "PANDAS_NA_STRINGS",
    "ManifestSource",
    "PackedSource",
    "SignLanguageDatasetsSource",
    "SpreadthesignSource",
    "TfdsSource",
    "decode_packed",
    "encode_packed",
    "ensure_synthetic",
    "example_to_record",
    "generate_split_ids",
    "make_source",
    "read_split_file",
]
