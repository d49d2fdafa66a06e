"""python -m signclip_jax.embed: inputs (files, dirs, globs, texts file), per-file failures,
the npz it writes, equality with the model's towers, and batch independence; windows and
segments of long recordings (resumable shards, each window equal to its slice embedded as a
file), and per-clip .npy files."""

import contextlib
import io
import subprocess
import sys
import types
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import signclip_jax.data
from signclip_jax import run as run_lib
from signclip_jax.data import pose as pose_lib
from signclip_jax.data import segments as seg_lib
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
from signclip_jax.serving import clips, video_input
from signclip_jax.serving import embed as embed_lib
from signclip_jax.serving import embedder as embedder_lib
from tests.helpers import write_pose

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def poses(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("embed_poses")
    (d / "dir" / "nested").mkdir(parents=True)
    write_pose(d / "dir" / "b.pose", 30, 1)
    write_pose(d / "dir" / "a.pose", 60, 2)
    write_pose(d / "dir" / "nested" / "c.pose", 20, 3)
    (d / "dir" / "notes.txt").write_text("not a pose")
    write_pose(d / "short.pose", 12, 4)
    write_pose(d / "long.pose", 150, 5)  # longer than the tiny model's max_frames (96)
    write_pose(d / "mid.pose", 80, 6)
    good = (d / "short.pose").read_bytes()
    (d / "corrupt.pose").write_bytes(good[: len(good) // 2])
    (d / "clip.mp4").write_bytes(b"not really a video")
    return d


@pytest.fixture(scope="module")
def reference(tiny_workdir):
    """(sources, texts) -> the towers called directly, every pose padded to max_frames: no
    buckets, no Embedder (jitted only to keep op-by-op compiles out of the test time)."""
    run = run_lib.load_run(tiny_workdir)
    spec = run.settings.spec
    pose_tower = nnx.jit(lambda model, pose, mask: model.embed_pose(pose, mask))
    text_tower = nnx.jit(lambda model, ids, mask: model.embed_text(ids, mask))

    def embed(sources, texts):
        feats = [pose_lib.load_features(s, spec) for s in sources]
        pose = np.zeros((len(feats), spec.max_frames, spec.feature_dim), np.float32)
        mask = np.zeros(pose.shape[:2], bool)
        for i, f in enumerate(feats):
            pose[i], mask[i] = pose_lib.pad_frames(f, spec.max_frames)
        pose_emb = np.asarray(pose_tower(run.model, pose, mask)) if feats else None
        if not texts:
            return pose_emb, None
        ids, tmask = text_lib.encode_texts(run.tokenizer, texts, run.settings.text_max_len)
        return pose_emb, np.asarray(text_tower(run.model, ids, tmask))

    return embed


@contextlib.contextmanager
def fake_video_module(
    pose_bytes: bytes | None = None, error: str | None = None, env_error: str | None = None
):
    """signclip_jax.data.video stand-in: returns `pose_bytes`, or raises UserError(error) (a bad
    video) or VideoEnvError(env_error) (no video environment)."""
    module = types.ModuleType("signclip_jax.data.video")
    calls = []

    class VideoEnvError(UserError):
        pass

    def video_to_pose(source, *, name=None):
        calls.append(source)
        if env_error:
            raise VideoEnvError(env_error)
        if error:
            raise UserError(f"{name}: {error}")
        return pose_bytes

    module.video_to_pose = video_to_pose
    module.VideoEnvError = VideoEnvError
    with pytest.MonkeyPatch.context() as mp:
        # Both places `from signclip_jax.data import video` looks: the package attribute (set
        # once any test imported the real module) and sys.modules.
        mp.setattr(signclip_jax.data, "video", module, raising=False)
        mp.setitem(sys.modules, "signclip_jax.data.video", module)
        yield calls


def _cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.embed", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_and_usage_errors(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "--texts_file" in r.stdout and "failed_files" in r.stdout
    r = _cli("--workdir", str(tmp_path), "--out", str(tmp_path / "o.npz"))
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: nothing to embed: give --poses and/or --texts / --texts_file"
    )
    r = _cli("--workdir", str(tmp_path), "--poses", str(tmp_path / "*.pose"), "--out", "o.npz")
    assert r.returncode == 2 and "matches no files" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--poses", "x.pose", "--out", "o.npz")  # neither --workdir nor --checkpoint
    assert r.returncode == 2
    assert not (tmp_path / "o.npz").exists()


def test_unwritable_out_is_one_line_before_any_work(tmp_path, poses):
    """Checked before the model loads (the --workdir here is not even a run) and before any
    pose is read: a folder that is a file, and /proc (unwritable for root too, as CI runs)."""
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    outs = [a_file / "emb.npz"]
    if Path("/proc/self").exists():
        outs.append(Path("/proc/emb.npz"))
    for out in outs:
        r = _cli("--workdir", str(tmp_path / "no_run"), "--poses", str(poses / "short.pose"),
                 "--out", str(out))  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith(f"error: --out {out}: cannot"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_amplifying_pose_is_one_reported_failure(tiny_workdir, poses, tmp_path):
    """Issue 17's ~150 KB file declaring 3 GB of frames: refused before decoding, reported,
    the other poses still embedded (exit 1)."""
    from tests.data.malformed import amplification

    amp = tmp_path / "amp.pose"
    amp.write_bytes(amplification())
    out = tmp_path / "emb.npz"
    err = io.StringIO()
    with redirect_stderr(err):
        code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(amp),
                               str(poses / "short.pose"), f"--out={out}", "-q"])  # fmt: skip
    npz = np.load(out)
    assert code == 1 and list(npz["failed_files"]) == [str(amp)]
    assert "65535 frames" in npz["failed_errors"][0] and "MiB" in npz["failed_errors"][0]
    assert npz["pose_embeddings"].shape[0] == 1 and "Traceback" not in err.getvalue()


def test_expand_poses(poses):
    d = poses / "dir"
    # A directory: its *.pose files, sorted, not recursive, nothing else.
    assert embed_lib.expand_poses([str(d)]) == [str(d / "a.pose"), str(d / "b.pose")]
    # Globs sorted, `**` recursive; specs keep the order given; files are taken as is.
    got = embed_lib.expand_poses(
        [str(poses / "short.pose"), str(d / "**" / "*.pose"), str(poses / "missing.pose")]
    )
    assert got == [
        str(poses / "short.pose"),
        str(d / "a.pose"),
        str(d / "b.pose"),
        str(d / "nested" / "c.pose"),
        str(poses / "missing.pose"),
    ]
    empty = poses / "empty_dir"
    empty.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=r"holds no \.pose files"):
        embed_lib.expand_poses([str(empty)])
    with pytest.raises(UserError, match="matches no files"):
        embed_lib.expand_poses([str(poses / "*.nothing")])


def test_read_texts_file(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_bytes("\ufeff<en> <ase> house\r\n\n  tree  \nHöhle\n\n".encode())
    assert embed_lib.read_texts_file(f) == ["<en> <ase> house", "tree", "Höhle"]
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        embed_lib.read_texts_file(f)
    with pytest.raises(UserError, match="cannot read"):
        embed_lib.read_texts_file(tmp_path / "missing.txt")


def test_video_hook(poses):
    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(signclip_jax.data, "video", raising=False)
        mp.setitem(sys.modules, "signclip_jax.data.video", None)  # module absent: ImportError
        with pytest.raises(UserError, match=r"x\.mp4: video input needs the optional video"):
            video_input.video_to_pose_bytes("x.mp4", name="x.mp4")
    with fake_video_module(env_error="mediapipe is not installed"):
        with pytest.raises(
            video_input.VideoUnavailable, match=r"up\.webm: .*optional video environment.*mediapipe"
        ):
            video_input.video_to_pose_bytes(b"...", name="up.webm")
    with fake_video_module(error="cannot decode"):  # a bad video: the module's own message
        with pytest.raises(UserError, match=r"^up\.webm: cannot decode$") as info:
            video_input.video_to_pose_bytes(b"...", name="up.webm")
        assert not isinstance(info.value, video_input.VideoUnavailable)
    with fake_video_module(pose_bytes=b"POSE") as calls:
        assert video_input.video_to_pose_bytes(Path("v.mov"), name="v.mov") == b"POSE"
        assert calls == ["v.mov"]


@pytest.fixture(scope="module")
def cli_run(tiny_workdir, poses, tmp_path_factory):
    """One embed run over every kind of input: dir, file, corrupt file, glob, missing file,
    a long pose, a video (through a fake video module), texts and a texts file."""
    out_dir = tmp_path_factory.mktemp("embed_out")
    texts_file = out_dir / "texts.txt"
    texts_file.write_text("<en> <ase> tree\n\n<en> <ase> sun\n")
    out = out_dir / "emb.npz"
    argv = [
        f"--workdir={tiny_workdir}",
        "--poses", str(poses / "dir"), str(poses / "short.pose"), str(poses / "corrupt.pose"),
        str(poses / "dir" / "nested" / "*.pose"),
        "--poses", str(poses / "missing.pose"), str(poses / "long.pose"), str(poses / "clip.mp4"),
        "--texts", "<en> <ase> house", "",
        f"--texts_file={texts_file}",
        f"--out={out}",
        "--batch_size=8",
    ]  # fmt: skip
    err = io.StringIO()
    with fake_video_module(pose_bytes=(poses / "mid.pose").read_bytes()), redirect_stderr(err):
        code = embed_lib.main(argv)
    return code, err.getvalue(), dict(np.load(out)), out_dir


def test_cli_embeds_every_input_and_reports_bad_files(cli_run, poses, reference):
    code, stderr, npz, out_dir = cli_run
    assert code == 1  # some files failed, the rest were written
    d = poses / "dir"
    good = [d / "a.pose", d / "b.pose", poses / "short.pose", d / "nested" / "c.pose",
            poses / "long.pose", poses / "clip.mp4"]  # fmt: skip
    assert list(npz["pose_files"]) == [str(p) for p in good]
    assert list(npz["failed_files"]) == [str(poses / "corrupt.pose"), str(poses / "missing.pose")]
    assert "not a readable .pose file" in npz["failed_errors"][0]
    assert "not found" in npz["failed_errors"][1]
    failed_lines = [line for line in stderr.splitlines() if line.startswith("failed:")]
    assert len(failed_lines) == 2
    assert "corrupt.pose" in failed_lines[0] and "missing.pose" in failed_lines[1]
    texts = ["<en> <ase> house", "", "<en> <ase> tree", "<en> <ase> sun"]
    assert list(npz["texts"]) == texts
    assert npz["pose_embeddings"].shape == (6, 32) and npz["pose_embeddings"].dtype == np.float32
    assert npz["text_embeddings"].shape == (4, 32) and npz["text_embeddings"].dtype == np.float32
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []  # no temp left

    # Exactly the towers' output: every pose padded to max_frames, texts as given.
    sources = [str(p) for p in good[:-1]] + [str(poses / "mid.pose")]  # the video is mid.pose
    pose_ref, text_ref = reference(sources, texts)
    np.testing.assert_allclose(npz["pose_embeddings"], pose_ref, atol=1e-5)
    np.testing.assert_allclose(npz["text_embeddings"], text_ref, atol=1e-5)


def test_pose_alone_equals_pose_among_longer_ones(cli_run, poses, tiny_workdir, tmp_path):
    """short.pose was embedded beside longer poses in cli_run; alone it must give the same row
    (the original server padded a request's poses together and pooled the padding)."""
    _, _, npz, _ = cli_run
    out = tmp_path / "alone.npz"
    step_dir = tiny_workdir / "checkpoints" / "4"
    code = embed_lib.main([f"--checkpoint={step_dir}", "--poses", str(poses / "short.pose"),
                           f"--out={out}", "--batch_size=8", "-q"])  # fmt: skip
    assert code == 0
    alone = np.load(out)
    assert list(alone["failed_files"]) == [] and alone["text_embeddings"].shape == (0, 32)
    row = list(npz["pose_files"]).index(str(poses / "short.pose"))
    np.testing.assert_allclose(alone["pose_embeddings"][0], npz["pose_embeddings"][row], atol=1e-5)
    # and it really differs from its neighbours (the check above could not pass by accident)
    assert np.abs(npz["pose_embeddings"][row] - npz["pose_embeddings"][row - 1]).max() > 1e-3


def test_real_recordings(shared_pose, tiny_workdir, reference, tmp_path, capsys):
    house = shared_pose("spreadthesign-ase-house.pose")
    reduced = shared_pose("pose-format-mediapipe.pose")  # body reduced to 8 points: unusable
    out = tmp_path / "real.npz"
    code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(reduced), str(house),
                           f"--out={out}", "--batch_size=8"])  # fmt: skip
    assert code == 1
    npz = np.load(out)
    assert list(npz["pose_files"]) == [str(house)]
    assert list(npz["failed_files"]) == [str(reduced)]
    assert "POSE_LANDMARKS lacks" in npz["failed_errors"][0]
    assert "pose-format-mediapipe.pose" in capsys.readouterr().err
    ref, _ = reference([house], [])
    np.testing.assert_allclose(npz["pose_embeddings"], ref, atol=1e-5)


# ------------------------------------------------------------- continuous signing (issue 18)
def _slices_as_files(pose_path, starts, ends) -> list[bytes]:
    """Each [start, end) of a recording cut out and written as a .pose file of its own."""
    pose = pose_lib.read_pose(pose_path)
    out = []
    for s, e in zip(starts, ends):
        buffer = io.BytesIO()
        seg_lib.slice_pose(pose, int(s), int(e)).write(buffer)
        out.append(buffer.getvalue())
    return out


def _check_windows(rec, out, tiny_workdir, frames, fps):
    """The rows of `out` are every 64/16 window of `rec`, each equal (<= 1e-5) to embedding
    the slice as its own file."""
    rows = clips.load_rows(out)
    spans = seg_lib.window_spans(frames, 64, 16)
    assert [tuple(x) for x in zip(rows["start_frames"], rows["end_frames"])] == spans
    assert set(rows["files"]) == {str(rec)} and len(rows["failed_files"]) == 0
    np.testing.assert_allclose(rows["start_seconds"], rows["start_frames"] / fps)
    np.testing.assert_allclose(rows["end_seconds"], rows["end_frames"] / fps)
    assert rows["embeddings"].dtype == np.float32
    embedder = embedder_lib.Embedder(run_lib.load_run(tiny_workdir), batch_size=64)
    alone = embedder.embed_poses(_slices_as_files(rec, rows["start_frames"], rows["end_frames"]))
    np.testing.assert_allclose(rows["embeddings"], alone, atol=1e-5)
    return rows


def test_five_minute_recording_in_windows_resumes(tiny_workdir, tmp_path, monkeypatch):
    """A 5-minute recording (generated clips of several signers one after the other) embedded
    with --window=64 --stride=16 in one command, interrupted after two shards: the rerun
    continues there (the finished rows are not embedded again), and every window equals the
    slice embedded as its own file."""
    from tests.data.test_segments import write_long_pose

    frames = 5 * 60 * 25
    rec = write_long_pose(tmp_path / "session.pose", frames)
    out = tmp_path / "rows"
    argv = [f"--workdir={tiny_workdir}", "--poses", str(rec), "--window=64", "--stride=16",
            f"--out={out}", "--shard_rows=128", "--texts", "<en> <ase> house"]  # fmt: skip
    write = clips.files_lib.write_npz_atomic
    written = []

    def stop_after_two(path, arrays):
        if len(written) == 3:  # texts.npz and two shards are written: Ctrl-C in the third
            raise KeyboardInterrupt
        write(path, arrays)
        written.append(path)

    monkeypatch.setattr(clips.files_lib, "write_npz_atomic", stop_after_two)
    err = io.StringIO()
    with pytest.raises(KeyboardInterrupt), redirect_stderr(err):
        embed_lib.main(argv)
    monkeypatch.setattr(clips.files_lib, "write_npz_atomic", write)
    assert [p.name for p in sorted(out.glob("rows-*.npz"))] == ["rows-00000.npz", "rows-00001.npz"]
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("rows-*.npz")}

    embedded = []
    embed_features = embedder_lib.Embedder.embed_features

    def counting(self, features):
        embedded.append(len(features))
        return embed_features(self, features)

    monkeypatch.setattr(embedder_lib.Embedder, "embed_features", counting)
    err = io.StringIO()
    with redirect_stderr(err):
        code = embed_lib.main(argv)
    monkeypatch.setattr(embedder_lib.Embedder, "embed_features", embed_features)
    n = len(seg_lib.window_spans(frames, 64, 16))
    assert code == 0 and n == 466
    assert sum(embedded) == n - 256  # only the rows after the two finished shards
    assert max(embedded) > 64  # in large batches, not a model call per window
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("rows-0000[01].npz")} == done
    assert f"wrote 4 shard(s) to {out}: 466 rows" in err.getvalue()
    texts = np.load(out / "texts.npz")
    assert list(texts["texts"]) == ["<en> <ase> house"] and texts["text_embeddings"].shape == (
        1,
        32,
    )
    _check_windows(rec, out, tiny_workdir, frames, 25.0)


def test_windows_in_seconds_and_segments(tiny_workdir, tmp_path):
    from tests.data.test_segments import write_long_pose

    rec = write_long_pose(tmp_path / "talk.pose", 300)
    frames_out, seconds_out = tmp_path / "frames", tmp_path / "seconds"
    for out, window, stride in ((frames_out, "64", "16"), (seconds_out, "2.56s", "640ms")):
        cut = [f"--window={window}", f"--stride={stride}", f"--out={out}", "-q"]
        code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(rec), *cut])
        assert code == 0
    a, b = clips.load_rows(frames_out), clips.load_rows(seconds_out)
    np.testing.assert_array_equal(a["start_frames"], b["start_frames"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-6)

    # Subtitles belong to the pose of the same name; CSV rows name theirs.
    (tmp_path / "talk.srt").write_text(
        "1\n00:00:01,000 --> 00:00:02,000\nHOUSE\n\n2\n00:00:20,000 --> 00:00:21,000\nlate\n"
    )
    (tmp_path / "parts.csv").write_text("file,start_frame,end_frame,label\ntalk.pose,100,164,X\n")
    out = tmp_path / "segs"
    err = io.StringIO()
    with redirect_stderr(err):
        segs = ["--segments", str(tmp_path / "talk.srt"), "--segments", str(tmp_path / "parts.csv")]
        code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(rec), *segs,
                               f"--out={out}"])  # fmt: skip
    assert code == 1  # the second cue lies past the 12 s recording
    rows = clips.load_rows(out)
    assert list(rows["labels"]) == ["HOUSE", "X"]
    assert list(zip(rows["start_frames"], rows["end_frames"])) == [(25, 50), (100, 164)]
    assert list(rows["failed_errors"]) and "lies outside" in rows["failed_errors"][0]
    assert "failed:" in err.getvalue() and "talk.srt line 6" in err.getvalue()
    run = run_lib.load_run(tiny_workdir)
    alone = embedder_lib.Embedder(run).embed_poses(_slices_as_files(rec, [25, 100], [50, 164]))
    np.testing.assert_allclose(rows["embeddings"], alone, atol=1e-5)

    # A rerun with other arguments into the same folder is refused, naming what differs.
    with pytest.raises(UserError, match=r"holds the rows of another job .*differs in .*window"):
        embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(rec), "--window=32",
                        f"--out={out}"])  # fmt: skip


def test_rows_usage_errors(tmp_path):
    pose = write_pose(tmp_path / "a.pose", 20, 1)
    (tmp_path / "b.srt").write_text("1\n00:00:00,000 --> 00:00:00,500\nx\n")
    w = ["--workdir", str(tmp_path / "no_run"), "--poses", str(pose)]
    cases = [
        ([*w, "--window=64", "--segments=x.srt", "--out", str(tmp_path / "o")], "give one"),
        ([*w, "--stride=16", "--out", str(tmp_path / "o")], "--stride needs --window"),
        ([*w, "--window=64"], "give --out=DIR"),
        ([*w, "--window=64", "--out_dir", str(tmp_path), "--out", "o"], "--out_dir writes one"),
        ([*w, "--window=6.5", "--out", str(tmp_path / "o")], "--window '6.5'"),
        ([*w, "--window=64", "--out", str(pose)], "is a file"),
        ([*w, "--tier=x", "--out", "o.npz"], "--tier needs --segments"),
        (
            [*w, "--segments", str(tmp_path / "b.srt"), "--out", str(tmp_path / "o")],
            "--segments " + str(tmp_path / "b.srt") + ": no --poses file matches",
        ),
        ([*w, "--name=m", "--out", "o.npz"], "--name names the --out_dir files"),
        ([*w, "--out_dir", str(tmp_path / "d"), "--name=a/b"], "--name 'a/b'"),
        (w, "give --out=FILE.npz and/or --out_dir=DIR"),
    ]
    (tmp_path / "other.pose").write_bytes(pose.read_bytes())
    cases[7][0][3:3] = [str(tmp_path / "other.pose")]  # two poses, neither named b
    for argv, message in cases:
        r = _cli(*argv)
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_out_dir_writes_one_npy_per_clip(tiny_workdir, poses, tmp_path):
    """--out_dir: <stem>-using-model-<MODEL>.npy, [H] float32, the npz's rows; --normalize
    scales them to unit length."""
    inputs = [str(poses / "short.pose"), str(poses / "long.pose"), str(poses / "corrupt.pose")]
    out_dir, npz = tmp_path / "emb", tmp_path / "emb.npz"
    code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", *inputs, f"--out={npz}",
                           f"--out_dir={out_dir}", "--name=tiny", "-q"])  # fmt: skip
    assert code == 1  # corrupt.pose failed
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "long-using-model-tiny.npy", "short-using-model-tiny.npy"
    ]  # fmt: skip
    ref = np.load(npz)
    for i, stem in enumerate(["short", "long"]):
        row = np.load(out_dir / f"{stem}-using-model-tiny.npy")
        assert row.shape == (32,) and row.dtype == np.float32
        np.testing.assert_array_equal(row, ref["pose_embeddings"][i])
    unit_dir = tmp_path / "unit"
    flags = [f"--out_dir={unit_dir}", "--normalize", "--long_poses=window", "-q"]
    code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", *inputs[:2], *flags])
    assert code == 0
    name = tiny_workdir.name  # default MODEL: the run folder's name
    short = np.load(unit_dir / f"short-using-model-{name}.npy")
    np.testing.assert_allclose(np.linalg.norm(short), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        short, ref["pose_embeddings"][0] / np.linalg.norm(ref["pose_embeddings"][0]), atol=1e-6
    )
    # long.pose (150 frames > max_frames 96) is the mean of its windows with --long_poses=window.
    long = np.load(unit_dir / f"long-using-model-{name}.npy")
    assert (
        np.abs(long - ref["pose_embeddings"][1] / np.linalg.norm(ref["pose_embeddings"][1])).max()
        > 1e-3
    )
    r = _cli(f"--workdir={tiny_workdir}", "--poses", str(poses / "dir" / "a.pose"),
             str(poses / "dir" / "nested" / "c.pose"), str(tmp_path / "x" / "a.pose"),
             f"--out_dir={tmp_path / 'clash'}")  # fmt: skip
    assert r.returncode == 2 and "would both write a-using-model-MODEL.npy" in r.stderr


@pytest.mark.shared_data
def test_real_five_minute_recording(shared_data, tiny_workdir, tmp_path):
    """Real recordings (three signs, two signers) concatenated into 5 minutes at 25 fps:
    every 64/16 window equals the slice embedded as its own file."""
    names = ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose"]
    poses = [pose_lib.read_pose(shared_data / "poses" / n) for n in names]
    frames = 5 * 60 * 25
    data, conf, total = [], [], 0
    while total < frames:
        for p in poses:
            data.append(np.ma.getdata(p.body.data))
            conf.append(np.asarray(p.body.confidence))
            total += len(data[-1])
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody

    body = NumPyPoseBody(25.0, np.concatenate(data)[:frames], np.concatenate(conf)[:frames])
    rec = tmp_path / "real_session.pose"
    buffer = io.BytesIO()
    Pose(poses[0].header, body).write(buffer)
    rec.write_bytes(buffer.getvalue())
    out = tmp_path / "rows"
    code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(rec), "--window=64",
                           "--stride=16", f"--out={out}", "-q"])  # fmt: skip
    assert code == 0
    _check_windows(rec, out, tiny_workdir, frames, 25.0)
