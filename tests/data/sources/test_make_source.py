"""make_source: config.data.source -> the source of each kind; the package's public names."""

from __future__ import annotations

import json

import pytest

from signclip_jax.data import sources
from signclip_jax.errors import UserError
from tests.data.sources.helpers import data_config


def test_make_source_kinds(synth, tmp_path):
    csv_path, pose_dir, _ = synth
    st = sources.make_source(
        data_config(source="spreadthesign", csv_path=str(csv_path), pose_dir=str(pose_dir),
              val_fraction=0.1, test_fraction=0.1, languages=("en",)),
        split="test",
    )  # fmt: skip
    assert isinstance(st, sources.SpreadthesignSource) and st.split == "test" and len(st) > 0
    (tmp_path / "m.jsonl").write_text(json.dumps({"pose": str(pose_dir / "x.pose")}) + "\n")
    assert len(
        sources.make_source(data_config(source="manifest", manifest=str(tmp_path / "m.jsonl")))
    )
    with pytest.raises(UserError, match=r"needs data\.csv_path"):
        sources.make_source(data_config(source="spreadthesign"))
    with pytest.raises(UserError, match=r"unknown data\.source"):
        sources.make_source(data_config(source="parquet"))


def test_public_names_stay_on_the_package():
    # What the rest of the package and the tests reach as `sources.X` (one file per source
    # underneath; callers keep importing the package).
    for name in (
        "make_source", "normalize_split", "generate_split_ids", "read_split_file",
        "SpreadthesignSource", "ManifestSource", "PackedSource", "TfdsSource",
        "SignLanguageDatasetsSource", "encode_packed", "decode_packed", "example_to_record",
        "ensure_synthetic", "PANDAS_NA_STRINGS", "SPREADTHESIGN_COLUMNS",
    ):  # fmt: skip
        assert getattr(sources, name) is not None, name
    assert (sources.PACKED_FORMAT, sources.PACKED_INDEX, sources.PACKED_VERSION) == (
        "signclip-jax-packed", "index.json", 1,
    )  # fmt: skip
    assert sorted(sources.__all__) == sorted(set(sources.__all__))
    assert all(hasattr(sources, name) for name in sources.__all__)
