"""data/packing.py: pack() writes shards atomically, index.json last, and checks its arguments.
(The `prepare` command line around it: tests/tools/test_prepare.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.data.packing import ShardWriter, pack
from signclip_jax.data.synthetic import write_synthetic_dataset
from signclip_jax.errors import UserError


class _Interrupting:
    """A source whose k-th record raises KeyboardInterrupt (a Ctrl-C mid-way)."""

    def __init__(self, source, k):
        self.source, self.k = source, k

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.k:
            raise KeyboardInterrupt
        return self.source[i]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    csv_path = write_synthetic_dataset(root / "syn", num_signs=3, signers=3)
    return sources.SpreadthesignSource(csv_path, root / "syn" / "poses", split="all")


def test_interrupted_pack_leaves_no_partial_output(synthetic, tmp_path):
    src = synthetic
    out = tmp_path / "p"
    with pytest.raises(KeyboardInterrupt):
        pack(_Interrupting(src, 7), out, spec=pose_lib.PoseSpec(max_frames=0), shard_size=4)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["data-00000.array_record"]  # the complete shard only: no .tmp, no index
    with pytest.raises(Exception, match=r"index\.json"):
        sources.PackedSource(out)
    index = pack(src, out, spec=pose_lib.PoseSpec(max_frames=0), shard_size=4, overwrite=True)
    assert index["num_records"] == len(src)
    np.testing.assert_array_equal(sources.PackedSource(out)[8]["points"].shape[1], 203)
    # index.json is the returned index; nothing temporary is left beside it.
    assert json.loads((out / sources.PACKED_INDEX).read_text()) == index
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("data-")) == [
        "index.json", "skipped.txt",
    ]  # fmt: skip
    assert [s["num_records"] for s in index["shards"]] == [4, 4, 1]


def test_pack_refuses_bad_arguments_and_existing_output(synthetic, tmp_path):
    spec = pose_lib.PoseSpec(max_frames=0)
    with pytest.raises(UserError, match="--dtype must be float16 or float32"):
        pack(synthetic, tmp_path / "a", spec=spec, dtype="bfloat16")
    with pytest.raises(UserError, match="--shard_size must be > 0"):
        pack(synthetic, tmp_path / "a", spec=spec, shard_size=0)
    pack(synthetic, tmp_path / "b", spec=spec)
    with pytest.raises(UserError, match="--overwrite"):
        pack(synthetic, tmp_path / "b", spec=spec)


def test_shard_writer_renames_complete_shards_and_aborts_the_open_one(tmp_path):
    writer = ShardWriter(tmp_path, shard_size=2)
    for i in range(3):
        writer.write(b"record %d" % i)
    assert writer.shards == [{"file": "data-00000.array_record", "num_records": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data-00000.array_record", "data-00001.array_record.tmp",
    ]  # fmt: skip
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data-00000.array_record"]
