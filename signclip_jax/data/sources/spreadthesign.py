"""Spreadthesign: metadata CSV + pose directory, splits as sign-language-datasets' 1.0.0-uzh.

`data.source='synthetic'` reads its generated folder with the same class (see synthetic.py).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signclip_jax.data.sources.common import (
    make_record,
    normalize_split,
    read_text_bytes,
    undecodable_byte,
)
from signclip_jax.errors import DataError

log = logging.getLogger(__name__)

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


def _read_csv_rows(path: str | os.PathLike) -> tuple[list[list[str]], list[int]]:
    """The CSV's non-blank rows and the line each starts on.

    Bytes that are not UTF-8 are kept as surrogate escapes (`_bad_byte` finds them), so one
    bad row is that row's problem (with its line), not the whole file's.
    """
    data = read_text_bytes(path, "metadata CSV")
    reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    rows, lines, end = [], [], 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            # Rows are addressed by index (split files): a row cannot be dropped here.
            raise DataError(f"metadata CSV {path} line {end + 1}: {e}") from None
        # pandas skips blank lines (skip_blank_lines=True), so they take no row index.
        if row:
            rows.append(row)
            lines.append(end + 1)
        end = reader.line_num
    return rows, lines


def _bad_byte(cells: Sequence[str]) -> str:
    """'' or 'not UTF-8 text (byte 0xe9)' when a cell holds an undecodable byte."""
    for cell in cells:
        byte = undecodable_byte(cell)
        if byte is not None:
            return f"not UTF-8 text (byte 0x{byte:02x})"
    return ""


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
        rows, lines = _read_csv_rows(self.csv_path)
        if not rows:
            raise DataError(f"metadata CSV {self.csv_path} is empty")
        columns, has_header = _detect_layout(rows[0])
        data = rows[1:] if has_header else rows
        data_lines = lines[1:] if has_header else lines
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
            name = f"{self.csv_path} row {i} (line {data_lines[i]})"
            if len(row) < width:
                if langs is not None and len(row) > columns["language"]:
                    if row[columns["language"]] not in langs:
                        continue
                self.skipped.append((name, f"malformed row: {len(row)} fields, need {width}"))
                continue
            spoken = row[columns["language"]]
            if langs is not None and spoken not in langs:
                continue
            bad = _bad_byte([row[columns[c]] for c in SPREADTHESIGN_COLUMNS])
            if bad:
                self.skipped.append((name, bad))
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
        if self.skipped:
            log.warning(
                "%s: %d of %d rows of split %r skipped as unusable%s",
                self.csv_path,
                len(self.skipped),
                len(self.skipped) + len(self._rows),
                self.split,
                " (the first 5 are listed above)" if len(self.skipped) > 5 else "",
            )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, pose, signed, spoken, text = self._rows[index]
        return make_record(
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
