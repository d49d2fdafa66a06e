"""`python -m signclip_jax.prepare`: end to end (subprocess), skip report and exit codes. (The
packing library, including interrupted runs: tests/data/test_packing.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import sources
from signclip_jax.data.synthetic import write_synthetic_dataset
from tests.data.malformed import write_malformed_poses

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.prepare", *args],
        capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=120,
    )  # fmt: skip


def test_help():
    r = _run("--help")
    assert r.returncode == 0 and "--shard_size" in r.stdout and "ArrayRecord" in r.stdout


def test_synthetic_end_to_end(tmp_path):
    out = tmp_path / "packed"
    r = _run(
        "--source=synthetic", f"--synthetic_dir={tmp_path / 'syn'}", "--split=all",
        f"--out={out}", "--dtype=float32", "--shard_size=5", "--workers=2", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "skipped 0" in r.stdout
    index = json.loads((out / "index.json").read_text())
    src = sources.SpreadthesignSource(
        tmp_path / "syn" / "metadata.csv", tmp_path / "syn" / "poses", split="all"
    )
    assert index["num_records"] == len(src) and index["skipped"] == 0
    assert [s["num_records"] for s in index["shards"]][:-1] == [5] * (len(index["shards"]) - 1)
    assert not list(out.glob("*.tmp")) and (out / "skipped.txt").read_text() == ""
    packed = sources.PackedSource(out)
    spec = pose_lib.PoseSpec(max_frames=0)
    for i in (0, len(src) - 1):  # order kept, features bit-exact
        assert packed[i]["id"] == src[i]["id"]
        arr = pose_lib.PoseArray(packed[i]["points"], packed[i]["observed"], packed[i]["fps"])
        want = pose_lib.load_features(src[i]["pose_path"], spec)
        assert pose_lib.to_features(arr, spec).tobytes() == want.tobytes()

    again = _run("--source=synthetic", f"--synthetic_dir={tmp_path / 'syn'}", f"--out={out}")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_skipped_files_are_reported(tmp_path):
    csv_path = write_synthetic_dataset(tmp_path / "syn", num_signs=2, signers=3)
    good = sorted((tmp_path / "syn" / "poses").glob("*.pose"))
    bad = write_malformed_poses(tmp_path / "bad")
    lines = [json.dumps({"pose": str(p), "text": "w"}) for p in [*good, *bad]]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "packed"
    r = _run("--source=manifest", f"--manifest={tmp_path / 'm.jsonl'}", f"--out={out}", "-q")
    assert r.returncode == 0, r.stderr
    assert f"packed {len(good)} examples" in r.stdout and f"skipped {len(bad)}" in r.stdout
    listed = [line.split("\t") for line in (out / "skipped.txt").read_text().splitlines()]
    assert sorted(name for name, _ in listed) == sorted(str(p) for p in bad)
    assert all(reason for _, reason in listed)
    assert len(sources.PackedSource(out)) == len(good)
    del csv_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source=spreadthesign", "--csv=/nonexistent.csv", "--pose_dir=/tmp"], "does not exist"),
        (["--source=manifest"], "needs data.manifest"),
        (["--config=/nonexistent/config.py"], "does not exist"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
    r = _run(*args, f"--out={tmp_path / 'o'}")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_all_bad_is_an_error(tmp_path):
    bad = write_malformed_poses(tmp_path / "bad")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"pose": str(p)}) for p in bad))
    r = _run("--source=manifest", f"--manifest={tmp_path / 'm.jsonl'}", f"--out={tmp_path / 'o'}")
    assert r.returncode == 2 and "no usable examples" in r.stderr
    assert not (tmp_path / "o" / "index.json").exists()


def test_missing_out_is_a_usage_error():
    r = _run("--source=synthetic")
    assert r.returncode == 2 and "--out" in r.stderr


def test_stage_text_model_then_load_it_offline(tmp_path):
    """--text_model copies the tokenizer, config.json and weights into --out; loading from
    there needs no hub (HF_HUB_OFFLINE=1 in _run) and gives the same tokenizer and weights."""
    import numpy as np

    from signclip_jax.data import text
    from signclip_jax.model import bert

    out = tmp_path / "models" / "minilm"
    r = _run("--text_model=minilm", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert f"--config.model.text_model={out}" in r.stdout
    staged = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"} <= set(
        staged
    ), staged
    bundled = text.bundled_minilm_path()
    a, b = text.load_tokenizer(str(out)), text.load_tokenizer("minilm")
    caption = "<en> <ase> house"
    assert a(caption)["input_ids"] == b(caption)["input_ids"]
    assert bert.BertConfig.from_hf(str(out)) == bert.BertConfig.from_hf(bundled)
    staged_w, _ = bert.read_checkpoint(str(out))
    bundled_w, _ = bert.read_checkpoint(bundled)
    assert staged_w.keys() == bundled_w.keys()
    assert all(np.array_equal(staged_w[k], bundled_w[k]) for k in bundled_w)


def test_stage_text_model_takes_no_data_flags(tmp_path):
    r = _run("--text_model=minilm", "--source=synthetic", f"--out={tmp_path / 'o'}")
    assert r.returncode == 2 and "drop --source" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
