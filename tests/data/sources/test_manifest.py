"""Manifest source: CSV and JSONL, relative and absolute pose paths, label names, splits."""

from __future__ import annotations

import csv
import json

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
