"""Packed ArrayRecord shards: prepare -> PackedSource round trip (bit-exact in float32), the
record encoding, per-split folders through make_source, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.data.packing import pack
from signclip_jax.errors import DataError
from tests.data.sources.helpers import data_config


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_roundtrip(synth, tmp_path, dtype):
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
    via_config = sources.make_source(data_config(source="packed", shards=str(tmp_path / "p")))
    assert len(via_config) == len(packed)
    # One folder per split: "{split}" in data.shards names it.
    pack(sources.SpreadthesignSource(csv_path, pose_dir, split="all"), tmp_path / "val",
         spec=spec, dtype=dtype, shard_size=100)  # fmt: skip
    per_split = data_config(source="packed", shards=str(tmp_path / "{split}"))
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
