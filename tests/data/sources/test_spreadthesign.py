"""Spreadthesign CSV source: splits (generated as sign-language-datasets' 1.0.0-uzh, or split
files), both column layouts, language filter, NaN captions, malformed rows, missing files."""

from __future__ import annotations

import pickle
import random

import pytest

from signclip_jax.data import sources
from signclip_jax.errors import DataError, UserError
from tests.data.sources.helpers import write_csv


def _original_split(num_rows, seed=3407, ratio=0.001):
    # A direct re-implementation of sign-language-datasets' splits/1.0.0-uzh/split.py.
    video_ids = list(range(num_rows))
    random.seed(seed)
    random.shuffle(video_ids)
    val_idx = int(num_rows * ratio)
    test_idx = val_idx + int(num_rows * ratio)
    return video_ids[:val_idx], video_ids[val_idx:test_idx], video_ids[test_idx:]


# --- splits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 4321, 25000])
def test_generated_split_matches_original_procedure(n):
    val, test, train = _original_split(n)
    got = sources.generate_split_ids(n)
    assert got["val"] == val and got["test"] == test and got["train"] == train
    assert len(val) == n // 1000


def test_generated_split_is_deterministic_and_keeps_one_row_when_small():
    a = sources.generate_split_ids(57, seed=5)
    assert a == sources.generate_split_ids(57, seed=5)
    assert a != sources.generate_split_ids(57, seed=6)
    assert len(a["val"]) == 1 and len(a["test"]) == 1  # documented deviation for N < 1000
    assert sorted(a["val"] + a["test"] + a["train"]) == list(range(57))
    none = sources.generate_split_ids(57, val_fraction=0.0, test_fraction=0.0)
    assert none["val"] == [] and none["test"] == [] and len(none["train"]) == 57


def test_split_generation_is_over_all_rows_then_language_filter(synth):
    csv_path, pose_dir, rows = synth
    splits = sources.generate_split_ids(len(rows), val_fraction=0.1, test_fraction=0.1)
    got = {}
    for split in ("train", "val", "test"):
        src = sources.SpreadthesignSource(
            csv_path, pose_dir, split=split, val_fraction=0.1, test_fraction=0.1
        )
        got[split] = [int(src[i]["id"]) for i in range(len(src))]
        want = sorted(i for i in splits[split] if rows[i][2] == "en")
        assert got[split] == want
    english = [i for i, r in enumerate(rows) if r[2] == "en"]
    assert sorted(i for ids in got.values() for i in ids) == english


def test_split_files(synth, tmp_path):
    csv_path, pose_dir, rows = synth
    english = [i for i, r in enumerate(rows) if r[2] == "en"]
    test_ids = [english[3], english[0], english[7], 1 if rows[1][2] == "de" else english[1]]
    (tmp_path / "test.txt").write_text("".join(f"{i}\n" for i in test_ids) + "\n")
    src = sources.SpreadthesignSource(csv_path, pose_dir, split="test", split_dir=tmp_path)
    assert [int(src[i]["id"]) for i in range(len(src))] == sorted(
        i for i in test_ids if rows[i][2] == "en"
    )
    (tmp_path / "val.txt").write_text(f"{len(rows) + 5}\n")
    with pytest.raises(DataError, match="names row"):
        sources.SpreadthesignSource(csv_path, pose_dir, split="val", split_dir=tmp_path)
    with pytest.raises(DataError, match=r"train\.txt"):
        sources.SpreadthesignSource(csv_path, pose_dir, split="train", split_dir=tmp_path)


# --- CSV layouts, language filter, text --------------------------------------------------------


def test_record_fields(synth):
    csv_path, pose_dir, rows = synth
    src = sources.SpreadthesignSource(csv_path, pose_dir, split="all")
    r = src[0]
    i = int(r["id"])
    assert r["pose_path"] == str(pose_dir / rows[i][0])
    assert (r["sign_language"], r["spoken_language"], r["text"]) == (rows[i][1], "en", rows[i][3])
    assert r["label"] == -1 and r["signer"] == ""


def test_named_columns_any_order_and_positional_layouts(synth, tmp_path):
    csv_path, pose_dir, rows = synth
    reference = sources.SpreadthesignSource(csv_path, pose_dir, split="all")
    want = [reference[i] for i in range(len(reference))]
    shuffled = [[r[3], "x", r[0], r[2], r[1]] for r in rows]
    layouts = {
        "named": write_csv(
            tmp_path / "a.csv", ["text", "extra", "pose", "language", "videoLanguage"], shuffled
        ),
        "positional+header": write_csv(tmp_path / "b.csv", ["file", "sl", "lang", "word"], rows),
        "positional": write_csv(tmp_path / "c.csv", None, rows),
    }
    for name, path in layouts.items():
        src = sources.SpreadthesignSource(path, pose_dir, split="all")
        assert [src[i] for i in range(len(src))] == want, name


def test_language_filter(synth):
    csv_path, pose_dir, rows = synth
    n_en = sum(r[2] == "en" for r in rows)
    n_de = sum(r[2] == "de" for r in rows)
    assert n_de > 0
    assert len(sources.SpreadthesignSource(csv_path, pose_dir, split="all")) == n_en
    de = sources.SpreadthesignSource(csv_path, pose_dir, split="all", languages=("de",))
    assert len(de) == n_de and {de[i]["spoken_language"] for i in range(len(de))} == {"de"}
    assert len(sources.SpreadthesignSource(csv_path, pose_dir, split="all", languages=None)) == len(
        rows
    )


def test_nan_text_and_malformed_rows(synth, tmp_path):
    _, pose_dir, rows = synth
    f = rows[0][0]
    body = [
        [f, "ase", "en", ""],
        [f, "ase", "en", "NA"],
        [f, "ase", "en", "nan"],
        [f, "ase", "en", "house"],
        [f, "ase"],  # too few fields: counted
        ["", "ase", "en", "x"],  # no pose file: counted
        [f, "ase", "de"],  # too few fields, but another language: filtered, not counted
    ]
    path = write_csv(tmp_path / "m.csv", list(sources.SPREADTHESIGN_COLUMNS), body)
    src = sources.SpreadthesignSource(path, pose_dir, split="all")
    assert [src[i]["text"] for i in range(len(src))] == ["nan", "nan", "nan", "house"]
    assert [name for name, _ in src.skipped] == [f"{path} row 4 (line 6)", f"{path} row 5 (line 7)"]
    assert all("malformed row" in reason for _, reason in src.skipped)


def test_a_row_that_is_not_utf8_is_skipped_with_its_line_and_keeps_row_ids(synth, tmp_path):
    _, pose_dir, rows = synth
    f = rows[0][0].encode()
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"\xef\xbb\xbfpose,videoLanguage,language,text\n"
        + f + b',ase,en,"two\nlines"\n'
        + f + b",ase,en,caf\xe9\n"  # Latin-1, not UTF-8
        + f + b",ase,de,caf\xe9\n"  # another language: filtered, not counted
        + f + b",ase,en,house\n"
    )  # fmt: skip
    src = sources.SpreadthesignSource(path, pose_dir, split="all")
    assert src.columns["pose"] == 0  # the byte-order mark is not part of the header
    assert src.row_ids() == [0, 3] and [src[i]["text"] for i in range(2)] == ["two\nlines", "house"]
    assert src.skipped == [(f"{path} row 1 (line 4)", "not UTF-8 text (byte 0xe9)")]
    big = tmp_path / "big.csv"
    big.write_bytes(b"pose,videoLanguage,language,text\n" + f + b",ase,en," + b"x" * 200000 + b"\n")
    with pytest.raises(DataError, match=rf"metadata CSV {big} line 2: field larger than"):
        sources.SpreadthesignSource(big, pose_dir, split="all")


def test_missing_pose_files_kept_or_dropped(synth, tmp_path):
    _, pose_dir, rows = synth
    body = [rows[0], ["nope.pose", "ase", "en", "x"]]
    path = write_csv(tmp_path / "m.csv", list(sources.SPREADTHESIGN_COLUMNS), body)
    kept = sources.SpreadthesignSource(path, pose_dir, split="all")
    assert len(kept) == 2 and kept.skipped == []  # the pipeline counts it when reading
    dropped = sources.SpreadthesignSource(path, pose_dir, split="all", drop_missing=True)
    assert len(dropped) == 1 and dropped.skipped[0][1] == "missing file"


def test_spreadthesign_errors(synth, tmp_path):
    csv_path, pose_dir, _ = synth
    with pytest.raises(DataError, match="does not exist"):
        sources.SpreadthesignSource(tmp_path / "none.csv", pose_dir)
    with pytest.raises(DataError, match="pose directory"):
        sources.SpreadthesignSource(csv_path, tmp_path / "nodir")
    with pytest.raises(UserError, match="unknown split"):
        sources.SpreadthesignSource(csv_path, pose_dir, split="dev2")


def test_source_is_picklable(synth):
    csv_path, pose_dir, _ = synth
    src = sources.SpreadthesignSource(csv_path, pose_dir, split="all")
    again = pickle.loads(pickle.dumps(src))
    assert [again[i] for i in range(len(again))] == [src[i] for i in range(len(src))]
