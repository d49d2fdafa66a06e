"""Manifest source: CSV and JSONL, relative and absolute pose paths, label names, splits."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.errors import DataError


def test_manifest_csv_and_jsonl(synth, tmp_path):
    _, pose_dir, rows = synth
    (tmp_path / "sub").mkdir()
    rel = f"../{pose_dir.parent.name}/poses/{rows[0][0]}"
    # A manifest beside a folder that links to the poses, to check relative resolution.
    (tmp_path / pose_dir.parent.name).symlink_to(pose_dir.parent)
    absolute = str(pose_dir / rows[1][0])
    entries = [
        {"pose": rel, "text": "house", "label": "house", "signer": "s1", "split": "train"},
        {"pose": absolute, "text": "tree", "label": "tree", "sign_language": "gsg",
         "spoken_language": "de", "split": "test"},
        {"pose": rel, "text": "sun", "label": "apple", "split": "train"},
    ]  # fmt: skip
    keys = ["pose", "text", "label", "sign_language", "spoken_language", "signer", "split"]
    with open(tmp_path / "sub" / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for e in entries:
            w.writerow([e.get(k, "") for k in keys])
        w.writerow(["too", "few"])  # malformed: counted
    (tmp_path / "sub" / "m.jsonl").write_text(
        "\n".join(json.dumps(e) for e in entries) + "\n{not json\n"
    )
    for name in ("m.csv", "m.jsonl"):
        src = sources.ManifestSource(tmp_path / "sub" / name)
        assert len(src) == 3 and len(src.skipped) == 1
        assert src[0]["pose_path"] == str(tmp_path / "sub" / rel)
        assert pose_lib.load_features(src[0]["pose_path"]).shape[1] == 609  # resolves
        assert src[1]["pose_path"] == absolute
        assert src.label_names == ["apple", "house", "tree"]
        assert [src[i]["label"] for i in range(3)] == [1, 2, 0]
        assert (src[0]["sign_language"], src[0]["spoken_language"], src[0]["signer"]) == (
            "ase", "en", "s1",
        )  # fmt: skip
        assert (src[1]["sign_language"], src[1]["spoken_language"]) == ("gsg", "de")
        test = sources.ManifestSource(tmp_path / "sub" / name, split="test")
        assert len(test) == 1 and test[0]["text"] == "tree"


def test_manifest_integer_labels_and_missing_file(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"pose": "a.pose", "label": 3}\n{"pose": "b.pose"}\n')
    src = sources.ManifestSource(tmp_path / "m.jsonl")
    assert [src[0]["label"], src[1]["label"]] == [3, -1] and src.label_names is None
    with pytest.raises(DataError, match="does not exist"):
        sources.ManifestSource(tmp_path / "none.csv")


def _load(path, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="signclip_jax.data.sources.manifest"):
        src = sources.ManifestSource(path, **kw)
    return src, [r.getMessage() for r in caplog.records]


def test_bad_json_rows_are_skipped_with_file_and_line_never_stringified(tmp_path, caplog):
    lines = [
        b'{"pose": "a.pose", "text": "ok", "split": "train"}',
        b'{"pose": "b.pose", "text": "x", "split": 7}',
        b'{"pose": "c.pose", "text": {"a": 1}}',
        b'{"pose": "d.pose", "gloss": ["g"]}',
        b'{"pose": "e.pose", "text": 3}',
        b'{"pose": ["f.pose"], "text": "y"}',
        b'{"pose": "g.pose", "sign_language": {"x": 1}}',
        b'{"pose": "h.pose", "text": "caf\xc3\xa9 \xff"}',  # one bad byte: this line only
        b'{"pose": "i.pose", "split": "holdout"}',
        b"[1, 2]",
        b"",
        b'{"pose": "j.pose", "text": null, "id": 5, "label": 2}',
        b'{"pose": "k.pose", "text": "other split, bad label", "split": "test", "label": [1]}',
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    src, logs = _load(path, caplog, split="train")
    assert [src[i]["pose_path"].rsplit("/", 1)[1] for i in range(len(src))] == ["a.pose", "j.pose"]
    assert src[1]["text"] == "nan" and src[1]["id"] == "5" and src[1]["label"] == 2
    skipped = dict(src.skipped)
    want = {
        2: "split is a number (7), not a string",
        3: 'text is an object ({"a": 1}), not a string',
        4: 'gloss is a list (["g"]), not a string',
        5: "text is a number (3), not a string",
        6: 'pose is a list (["f.pose"]), not a string',
        7: 'sign_language is an object ({"x": 1}), not a string',
        8: f"not UTF-8 text (byte 0xff at column {lines[7].index(0xFF) + 1})",
        9: "unknown split 'holdout' (use train, val or test)",
        10: "a list ([1, 2]), not a JSON object",
    }  # the bad row of the test split (line 13) is the test split's to count
    assert skipped == {f"{path} line {n}": reason for n, reason in want.items()}
    assert not any("{'a': 1}" in r for r in skipped.values())
    assert f"skipping {path} line 2: split is a number (7), not a string" in logs
    assert f"manifest {path}: 9 of 11 rows of split 'train' skipped as unusable" in logs[-1]
    test, _ = _load(path, caplog, split="test")  # rows without a split are in every split
    assert [test[i]["pose_path"].rsplit("/", 1)[1] for i in range(len(test))] == ["j.pose"]
    assert f"{path} line 13" in dict(test.skipped) and f"{path} line 2" in dict(test.skipped)
    # Read whole (no split): unknown split names are kept, the bad label is counted.
    whole, _ = _load(path, caplog)
    assert f"{path} line 9" not in dict(whole.skipped)
    assert (
        dict(whole.skipped)[f"{path} line 13"]
        == "label is a list ([1]), not a string or an integer"
    )


def test_a_split_whose_rows_are_all_bad_is_rejected_with_the_first_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"pose": "a.pose", "split": "train"}\n{"pose": "b.pose", "text": {}, "split": "test"}\n'
    )
    with pytest.raises(DataError, match=r"split 'test': all 1 were skipped \(first, line 2: text"):
        sources.ManifestSource(path, split="test")
    assert len(sources.ManifestSource(path, split="train")) == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("m.jsonl", b"pose,text\na.pose,x\n", r"all 2 are bad \(first, line 1: invalid JSON.*JSON "
         r"lines file"),
        ("m.jsonl", '{"pose": "a"}\n'.encode("utf-16"), r"are bad \(first, line 1: not UTF-8"),
        ("m.jsonl", b'{"pose": 1}\n{"text": "x"}\n', r"all 2 are bad \(first, line 1: pose is a "
         r"number \(1\)"),
        ("m.csv", b'{"pose": "a.pose"}\n', r"line 1: the header .* has no pose column"),
        ("m.csv", b"pose,te\xffxt\na,b\n", r"line 1 \(the header\): not UTF-8 text \(byte 0xff\)"),
        ("m.csv", b"pose,text\n,x\n", r"all 1 are bad \(first, line 2: no pose file\)"),
        ("m.csv", b"", "has no rows"),
    ],
)  # fmt: skip
def test_an_unusable_file_is_rejected_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"manifest {path}.*{message}"):
        sources.ManifestSource(path)


def test_csv_rows_bad_bytes_field_counts_and_multiline_records(tmp_path, caplog):
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"\xef\xbb\xbfpose,text,split\n"  # a byte-order mark is not part of the header
        b'a.pose,"two\nlines",train\n'
        b"b.pose,caf\xe9,train\n"
        b"c.pose," + b"x" * (csv.field_size_limit() + 1) + b",train\n"
        b"d.pose,too,many,fields\n"
        b"e.pose,,\n"
    )
    src, logs = _load(path, caplog, split="train")
    assert [src[i]["text"] for i in range(len(src))] == ["two\nlines", ""]
    assert src.skipped == [
        (f"{path} line 4", "not UTF-8 text (byte 0xe9 in column 'text')"),
        (f"{path} line 5", f"CSV error (field larger than field limit ({csv.field_size_limit()}))"),
        (f"{path} line 6", "4 fields, header has 3"),
    ]
    assert f"manifest {path}: 3 of 5 rows of split 'train' skipped as unusable" in logs


def test_duplicate_ids_warn_once_with_count_and_first_example(tmp_path, caplog):
    rows = [
        {"id": "a", "pose": "1.pose", "split": "train"},
        {"id": "b", "pose": "2.pose", "split": "train"},
        {"id": "a", "pose": "3.pose", "split": "train"},
        {"id": "a", "pose": "4.pose", "split": "test"},  # the same example in train and test
        {"id": "b", "pose": "5.pose", "split": "train"},
        {"id": "c", "pose": "6.pose", "split": "train"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src, logs = _load(path, caplog, split="train")
    assert len(src) == 5 and src.duplicate_ids == 3  # kept, but counted
    dup = [m for m in logs if "repeat" in m]
    assert dup == [
        f"manifest {path}: 3 rows repeat an id of an earlier row (first: id 'a' on lines 1 and "
        "3); ids should name one example each"
    ]
    unique = tmp_path / "u.jsonl"
    unique.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    src, logs = _load(unique, caplog)
    assert src.duplicate_ids == 0 and not logs
