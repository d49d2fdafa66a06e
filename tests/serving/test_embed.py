"""python -m signclip_jax.embed: inputs (files, dirs, globs, texts file), per-file failures,
the npz it writes, equality with the model's towers, and batch independence."""

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
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
from signclip_jax.serving import embed as embed_lib
from signclip_jax.serving import video_input
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
