"""signclip_jax.serving.clips: the Python API (paths, bytes, Pose objects, features), long
poses (truncate / window), per-clip file names, resumable row jobs and their progress lines."""

import io
import json

import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.data import pose as pose_lib
from signclip_jax.data import segments as seg
from signclip_jax.data import synthetic
from signclip_jax.errors import UserError
from signclip_jax.serving import clips
from signclip_jax.serving import embedder as embedder_lib
from tests.data.test_segments import write_long_pose
from tests.helpers import write_pose


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return embedder_lib.Embedder(run_lib.load_run(tiny_workdir), batch_size=16)


def test_api_takes_paths_bytes_poses_and_features(embedder, tmp_path):
    path = write_pose(tmp_path / "a.pose", 40, 1)
    data = path.read_bytes()
    pose = pose_lib.read_pose(path)
    feats = pose_lib.load_features(path, embedder.spec)
    got = clips.embed_poses(embedder, [str(path), path, data, pose, feats])
    want = embedder.embed_poses([str(path)])
    np.testing.assert_allclose(got, np.repeat(want, 5, axis=0), atol=1e-6)
    unit = clips.embed_poses(embedder, [path], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit[0], want[0] / np.linalg.norm(want[0]), atol=1e-6)
    with pytest.raises(UserError, match=r"features: shape \(3, 5\)"):
        clips.embed_poses(embedder, [np.zeros((3, 5), np.float32)])
    with pytest.raises(UserError, match="got int"):
        clips.embed_poses(embedder, [3])


def test_long_poses(embedder, tmp_path):
    """truncate keeps the first max_frames frames; window is the mean over max_frames windows
    overlapping by half (the clip normalised once, as a whole); short clips are the same."""
    max_frames = embedder.spec.max_frames  # 96 in the tiny model
    long = write_long_pose(tmp_path / "long.pose", 150)
    short = write_pose(tmp_path / "short.pose", 50, 2)
    full = pose_lib.load_features(long, pose_lib.PoseSpec(max_frames=0))
    spans = clips.long_pose_spans(150, max_frames)
    assert spans == [(0, 96), (48, 144), (54, 150)]
    windows = embedder.embed_features([full[s:e] for s, e in spans])

    trunc = clips.embed_poses(embedder, [long, short])
    win = clips.embed_poses(embedder, [long, short], long_poses="window")
    np.testing.assert_allclose(trunc[0], embedder.embed_features([full[:max_frames]])[0], atol=1e-6)
    np.testing.assert_allclose(win[0], windows.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(win[1], trunc[1], atol=1e-6)
    assert np.abs(win[0] - trunc[0]).max() > 1e-3
    # embed_files gives the same rows, with the failures collected.
    rows, good, failed = clips.embed_files(
        embedder, [str(long), str(tmp_path / "none.pose"), str(short)], long_poses="window"
    )
    assert good == [str(long), str(short)] and failed[0][0] == str(tmp_path / "none.pose")
    np.testing.assert_allclose(rows, win, atol=1e-6)
    with pytest.raises(UserError, match="--long_poses 'average'"):
        clips.embed_clips(embedder, [full], long_poses="average")


def test_clip_file_names():
    assert clips.clip_file_name("a/b/house.pose", "sem-lex") == "house-using-model-sem-lex.npy"
    assert clips.clip_file_name("clip.MP4", "m") == "clip-using-model-m.npy"
    assert clips.clip_file_names(["x/a.pose", "y/b.pose"], "m") == [
        "a-using-model-m.npy", "b-using-model-m.npy"
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"x/a\.pose and y/a\.pose would both write"):
        clips.clip_file_names(["x/a.pose", "y/a.pose"], "m")
    for bad in ("", "a/b", "..", "a\\b"):
        with pytest.raises(UserError, match="--name"):
            clips.check_model_name(bad)


def _gap_pose(path, frames=400):
    """A recording whose shoulders are undetected in frames 0-69: windows inside that stretch
    cannot be normalised (failed rows), the others can."""
    data, conf = [], []
    seed = 10
    while sum(len(d) for d in data) < frames:
        d, c = synthetic.random_clip(seed, min_frames=60, max_frames=90)
        data.append(d[:, :, :-33])
        conf.append(c[:, :, :-33])
        seed += 1
    data, conf = np.concatenate(data)[:frames], np.concatenate(conf)[:frames].copy()
    conf[:70, :, 11:13] = 0  # POSE_LANDMARKS LEFT_SHOULDER, RIGHT_SHOULDER
    header = synthetic.holistic_header(468, world_landmarks=False)
    path.write_bytes(synthetic.pose_bytes(header, data, conf, 25.0))
    return path


def _job(units, out, **kw):
    kw.setdefault("window", seg.parse_length("64"))
    kw.setdefault("stride", seg.parse_length("16"))
    return clips.RowJob(units=units, out_dir=str(out), shard_rows=8, chunk=8, **kw)


def test_rows_resume_without_recomputing(embedder, tmp_path, monkeypatch):
    rec = write_long_pose(tmp_path / "rec.pose", 600)
    gap = _gap_pose(tmp_path / "gap.pose")
    corrupt = tmp_path / "corrupt.pose"
    corrupt.write_bytes(rec.read_bytes()[:5000])
    units = [clips.Unit(str(rec)), clips.Unit(str(corrupt)), clips.Unit(str(gap))]

    full_dir = tmp_path / "full"
    state = clips.run_rows(embedder, _job(units, full_dir))
    full = clips.load_rows(full_dir)
    n_rec, n_gap = len(seg.window_spans(600, 64, 16)), len(seg.window_spans(400, 64, 16))
    # Windows starting at 0 and 16 lie in the gap ([0, 64), [16, 80) still has frames 70-79
    # with shoulders, so only [0, 64) fails) and the corrupt file is one failed row.
    assert state == {"shards": -(-(n_rec + 1 + n_gap) // 8), "next": [3, 0],
                     "rows": n_rec + n_gap - 1, "failed": 2, "complete": True}  # fmt: skip
    assert list(full["failed_files"]) == [str(corrupt), str(gap)]
    assert list(full["failed_start_frames"]) == [-1, 0]
    assert "never both observed" in full["failed_errors"][1]
    assert full["embeddings"].shape == (n_rec + n_gap - 1, 32)
    np.testing.assert_allclose(full["start_seconds"], full["start_frames"] / 25.0)

    # Interrupted right after writing the 3rd shard, before recording it: the rerun embeds
    # only the rows after the 2 recorded shards (the 3rd again, to the same values).
    calls = {"shards": 0, "rows": 0}
    write = clips.files_lib.write_npz_atomic

    def write_then_stop(path, arrays):
        write(path, arrays)
        calls["shards"] += 1
        if calls["shards"] == 3:
            raise KeyboardInterrupt

    part_dir = tmp_path / "part"
    monkeypatch.setattr(clips.files_lib, "write_npz_atomic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        clips.run_rows(embedder, _job(units, part_dir))
    monkeypatch.setattr(clips.files_lib, "write_npz_atomic", write)
    state = json.loads((part_dir / "progress.json").read_text())
    assert state["shards"] == 2 and not state["complete"]
    assert (part_dir / "rows-00002.npz").exists()
    with pytest.raises(UserError, match="not finished"):
        clips.load_rows(part_dir)
    embed = embedder.embed_features

    def counting(features):
        calls["rows"] += len(features)
        return embed(features)

    monkeypatch.setattr(embedder, "embed_features", counting)
    clips.run_rows(embedder, _job(units, part_dir))
    assert calls["rows"] == n_rec + n_gap - 1 - 16  # 2 shards of 8 good rows not redone
    resumed = clips.load_rows(part_dir)
    for key, value in full.items():
        if key == "embeddings":
            np.testing.assert_allclose(resumed[key], value, atol=1e-6)
        else:
            np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    calls["rows"] = 0
    clips.run_rows(embedder, _job(units, part_dir))  # finished: nothing to do
    assert calls["rows"] == 0

    # Another job into the same folder is refused, naming what differs.
    with pytest.raises(UserError, match="differs in stride"):
        clips.run_rows(embedder, _job(units, part_dir, stride=seg.parse_length("32")))


def test_segment_rows(embedder, tmp_path):
    rec = write_long_pose(tmp_path / "rec.pose", 200)
    segments = [
        seg.Segment(1.0, 2.0, label="A", tier="gloss"),
        seg.Segment(100, 164, "f", label="B"),
        seg.Segment(9.0, 10.0, label="late", line="rec.srt line 9"),  # past the 8 s recording
    ]
    out = tmp_path / "rows"
    clips.run_rows(embedder, _job([clips.Unit(str(rec), segments)], out, window=None))
    rows = clips.load_rows(out)
    assert list(rows["labels"]) == ["A", "B"] and list(rows["tiers"]) == ["gloss", ""]
    assert list(rows["start_frames"]) == [25, 100] and list(rows["end_frames"]) == [50, 164]
    assert "rec.srt line 9" in rows["failed_errors"][0] and "outside" in rows["failed_errors"][0]
    pose = pose_lib.read_pose(rec)
    alone = []
    for s, e in [(25, 50), (100, 164)]:
        buffer = io.BytesIO()
        seg.slice_pose(pose, s, e).write(buffer)
        alone.append(buffer.getvalue())
    np.testing.assert_allclose(rows["embeddings"], embedder.embed_poses(alone), atol=1e-5)


def test_progress_lines_in_logs():
    out = io.StringIO()
    progress = clips.Progress(100, desc="embed", stream=out)
    for _ in range(20):
        progress.update(5, rows=2)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("embed: 100% (40 rows,")
    assert all("ETA" in line for line in lines)
    quiet = io.StringIO()
    progress = clips.Progress(100, desc="embed", stream=quiet, quiet=True)
    progress.update(100)
    assert quiet.getvalue() == ""
