"""Data sources: Spreadthesign CSV (both layouts, splits, language filter, NaN text), manifests,
packed ArrayRecord shards, tfds array_record data sources, make_source."""

from __future__ import annotations

import csv
import json
import pickle
import random
import sys

import ml_collections
import numpy as np
import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.data.synthetic import write_synthetic_dataset
from signclip_jax.errors import DataError, UserError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Synthetic Spreadthesign-style dataset: (csv path, pose dir, rows without header)."""
    out = tmp_path_factory.mktemp("synth")
    csv_path = write_synthetic_dataset(out, num_signs=4, signers=5, seed=1)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return csv_path, out / "poses", rows[1:]


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


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
        "named": _write_csv(
            tmp_path / "a.csv", ["text", "extra", "pose", "language", "videoLanguage"], shuffled
        ),
        "positional+header": _write_csv(tmp_path / "b.csv", ["file", "sl", "lang", "word"], rows),
        "positional": _write_csv(tmp_path / "c.csv", None, rows),
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
    path = _write_csv(tmp_path / "m.csv", list(sources.SPREADTHESIGN_COLUMNS), body)
    src = sources.SpreadthesignSource(path, pose_dir, split="all")
    assert [src[i]["text"] for i in range(len(src))] == ["nan", "nan", "nan", "house"]
    assert [name.split()[-1] for name, _ in src.skipped] == ["4", "5"]
    assert all("malformed row" in reason for _, reason in src.skipped)


def test_missing_pose_files_kept_or_dropped(synth, tmp_path):
    _, pose_dir, rows = synth
    body = [rows[0], ["nope.pose", "ase", "en", "x"]]
    path = _write_csv(tmp_path / "m.csv", list(sources.SPREADTHESIGN_COLUMNS), body)
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


# --- manifests -------------------------------------------------------------------------------


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


# --- packed shards ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_roundtrip(synth, tmp_path, dtype):
    from signclip_jax.tools.prepare import pack

    csv_path, pose_dir, _ = synth
    src = sources.SpreadthesignSource(csv_path, pose_dir, split="all")
    spec = pose_lib.PoseSpec(max_frames=0)
    index = pack(src, tmp_path / "p", spec=spec, dtype=dtype, shard_size=7)
    packed = sources.PackedSource(tmp_path / "p")
    assert len(packed) == len(src) == index["num_records"]
    assert len(index["shards"]) == -(-len(src) // 7)
    assert packed.components == "reduced_face"
    for i in range(len(src)):
        record = packed[i]
        want = pose_lib.load_features(src[i]["pose_path"], pose_lib.PoseSpec(max_frames=0))
        got = pose_lib.to_features(
            pose_lib.PoseArray(record["points"], record["observed"], record["fps"]), spec
        )
        if dtype == "float32":
            assert got.tobytes() == want.tobytes()  # bit-exact
        else:
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
        for key in ("id", "text", "sign_language", "spoken_language", "label", "signer"):
            assert record[key] == src[i][key]
    via_config = sources.make_source(_data(source="packed", shards=str(tmp_path / "p")))
    assert len(via_config) == len(packed)
    # One folder per split: "{split}" in data.shards names it.
    pack(sources.SpreadthesignSource(csv_path, pose_dir, split="all"), tmp_path / "val",
         spec=spec, dtype=dtype, shard_size=100)  # fmt: skip
    per_split = _data(source="packed", shards=str(tmp_path / "{split}"))
    with pytest.raises(DataError, match=r"no packed shards found at .*train"):
        sources.make_source(per_split, split="train")  # tmp_path/train does not exist
    assert len(sources.make_source(per_split, split="val")) == len(src)
    again = pickle.loads(pickle.dumps(packed))
    assert again[3]["id"] == packed[3]["id"]
    # Glob and list forms read the same records.
    by_glob = sources.PackedSource(str(tmp_path / "p" / "data-*.array_record"))
    assert len(by_glob) == len(packed) and by_glob[5]["id"] == packed[5]["id"]


def test_packed_record_encoding_and_corruption():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 7, 3)).astype(np.float32)
    observed = rng.random((5, 7)) > 0.3
    data = sources.encode_packed(points, observed, 30.0, {"id": "x", "text": "ü"}, "float32")
    r = sources.decode_packed(data)
    assert np.array_equal(r["points"], points) and np.array_equal(r["observed"], observed)
    assert (r["id"], r["text"], r["fps"], r["label"]) == ("x", "ü", 30.0, -1)
    for bad in (b"", b"XXXX" + data[4:], data[:20]):
        with pytest.raises(DataError, match="not a valid packed"):
            sources.decode_packed(bad)


def test_packed_errors(tmp_path):
    with pytest.raises(DataError, match=r"index\.json"):
        sources.PackedSource(tmp_path)
    with pytest.raises(DataError, match="no packed shards"):
        sources.PackedSource(str(tmp_path / "*.array_record"))


# --- tfds ------------------------------------------------------------------------------------


_BUILDERS: dict[bool, type] = {}  # tfds registers builder classes by name: define each once


def _tiny_builder(data_dir, poses, with_arrays: bool):
    tfds = pytest.importorskip("tensorflow_datasets")
    if with_arrays not in _BUILDERS:
        _BUILDERS[with_arrays] = _define_builder(tfds, with_arrays)
    builder = _BUILDERS[with_arrays](data_dir=str(data_dir), file_format="array_record")
    builder.poses = poses
    builder.download_and_prepare()
    return builder


def _define_builder(tfds, with_arrays: bool):
    from pose_format import Pose

    class TinySigns(tfds.core.GeneratorBasedBuilder):
        name = "tiny_signs_arrays" if with_arrays else "tiny_signs_paths"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            if with_arrays:
                pose = {
                    "data": tfds.features.Tensor(shape=(None, 1, 576, 3), dtype=np.float32),
                    "conf": tfds.features.Tensor(shape=(None, 1, 576), dtype=np.float32),
                    "fps": tfds.features.Scalar(dtype=np.int32),
                }
            else:
                pose = tfds.features.Text()
            features = {
                "id": tfds.features.Text(),
                "gloss": tfds.features.Text(),
                "sign_language": tfds.features.Text(),
                "spoken_language": tfds.features.Text(),
                "gloss_id": tfds.features.Scalar(dtype=np.int64),
                ("pose" if with_arrays else "pose_path"): pose,
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, path in enumerate(self.poses):
                ex = {"id": path.stem, "gloss": f"w{i}", "sign_language": "ase",
                      "spoken_language": "en", "gloss_id": i}  # fmt: skip
                if with_arrays:
                    p = Pose.read(path.read_bytes())
                    ex["pose"] = {
                        "data": np.asarray(p.body.data.data, np.float32),
                        "conf": np.asarray(p.body.confidence, np.float32),
                        "fps": int(p.body.fps),
                    }
                else:
                    ex["pose_path"] = str(path)
                yield str(i), ex

    TinySigns.__name__ = "TinySignsArrays" if with_arrays else "TinySignsPaths"
    return TinySigns


@pytest.mark.parametrize("with_arrays", [True, False])
def test_tfds_array_record_source(synth, tmp_path, with_arrays):
    _, pose_dir, _ = synth
    poses = sorted(pose_dir.glob("*.pose"))[:4]
    builder = _tiny_builder(tmp_path, poses, with_arrays)
    for name in (str(builder.data_dir), builder.name):
        src = sources.TfdsSource(name, "train", str(tmp_path))
        assert len(src) == 4
        src = pickle.loads(pickle.dumps(src))  # as a grain worker gets it
        for i in range(4):
            r = src[i]
            path = pose_dir / f"{r['id']}.pose"
            assert r["text"] == f"w{r['label']}" and r["sign_language"] == "ase"
            from signclip_jax.data.pipeline import record_features

            got = record_features(r, pose_lib.PoseSpec())
            assert got.tobytes() == pose_lib.load_features(path).tobytes()
    with pytest.raises(DataError, match="cannot open tfds"):
        sources.TfdsSource("tiny_signs_paths", "nosuchsplit", str(tmp_path))


def test_tfds_example_with_unknown_layout_is_an_error_record():
    ex = {"id": b"e", "text": b"t", "pose": {"data": np.zeros((3, 1, 10, 3)),
          "conf": np.ones((3, 1, 10)), "fps": 25}}  # fmt: skip
    r = sources.example_to_record(ex, 0)
    assert "error" in r and "pose_header" in r["error"]


def test_tfds_missing_gives_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(UserError, match=r"signclip-jax\[tfds\]"):
        sources.TfdsSource("x", "train")


def test_sld_without_tensorflow_gives_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sign_language_datasets", None)
    monkeypatch.setitem(sys.modules, "sign_language_datasets.datasets", None)
    with pytest.raises(UserError, match=r"signclip-jax\[sld\]"):
        sources.SignLanguageDatasetsSource("spread_the_sign")


# --- make_source -----------------------------------------------------------------------------


def _data(**kw):
    return ml_collections.ConfigDict({"data": kw})


def test_make_source_kinds(synth, tmp_path):
    csv_path, pose_dir, _ = synth
    st = sources.make_source(
        _data(source="spreadthesign", csv_path=str(csv_path), pose_dir=str(pose_dir),
              val_fraction=0.1, test_fraction=0.1, languages=("en",)),
        split="test",
    )  # fmt: skip
    assert isinstance(st, sources.SpreadthesignSource) and st.split == "test" and len(st) > 0
    (tmp_path / "m.jsonl").write_text(json.dumps({"pose": str(pose_dir / "x.pose")}) + "\n")
    assert len(sources.make_source(_data(source="manifest", manifest=str(tmp_path / "m.jsonl"))))
    with pytest.raises(UserError, match=r"needs data\.csv_path"):
        sources.make_source(_data(source="spreadthesign"))
    with pytest.raises(UserError, match=r"unknown data\.source"):
        sources.make_source(_data(source="parquet"))


def test_make_source_synthetic_generates_once(tmp_path):
    cfg = _data(source="synthetic", synthetic_signs=2, synthetic_signers=3, languages=("en",))
    src = sources.make_source(cfg, split="all", workdir=str(tmp_path))
    assert len(src) == 6
    marker = tmp_path / "synthetic_data" / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    again = sources.make_source(cfg, split="all", workdir=str(tmp_path))
    assert [again[i] for i in range(6)] == [src[i] for i in range(6)]
    assert marker.stat().st_mtime_ns == stamp
    cfg.data.synthetic_signs = 3
    with pytest.raises(UserError, match=r"another data\.synthetic_dir"):
        sources.make_source(cfg, split="all", workdir=str(tmp_path))
    with pytest.raises(UserError, match="synthetic_dir"):
        sources.make_source(_data(source="synthetic"))
