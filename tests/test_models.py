"""signclip_jax.models: --model=REF (run directory, release folder, hf-hub:ORG/NAME[@REV]),
the model cache, `signclip_jax.load`, and the PyTorch twin's hf-hub references.

No network: the Hub is a Hugging Face cache laid out on disk from a release folder, read with
HF_HUB_OFFLINE=1 (conftest sets it for the whole suite).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from pose_format import Pose

import signclip_jax
from signclip_jax import cli, models
from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.interop import convert, importer
from signclip_jax.serving import embedder as embedder_lib
from tests.interop.fast_run import make_run, max_abs_diff, pose_files

ROOT = Path(__file__).resolve().parents[1]
REPO = "signclip-test/tiny"
TEXTS = ["<en> <ase> house", "<en> <ase> sad", "<de> <gsg> Haus"]


def hub_cache_from(folder: Path, cache: Path, repo_id: str, refs=("main",)) -> str:
    """Lays `folder` out as huggingface_hub's cache holds a download of `repo_id`: files in
    blobs/ named by their git blob sha1 (small files) or sha256 (.safetensors, as LFS),
    snapshots/COMMIT/NAME linking to them, refs/REF holding COMMIT. Returns COMMIT."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1("".join(names).encode() + repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in names:
        data = (folder / name).read_bytes()
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A run, its release folder, a Hub cache holding the release as REPO (refs main and v1),
    and a fresh model cache (SIGNCLIP_MODEL_CACHE) for this module."""
    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.CACHE_ENV, str(root / "model_cache"))
        run_dir = make_run(root / "run")
        release = convert.export_hf(run_lib.load_run(run_dir), root / "release", repo_id=REPO)
        hub = root / "hub"
        commit = hub_cache_from(release, hub, REPO, refs=("main", "v1"))
        poses = pose_files(root / "poses")
        yield {"run": run_dir, "release": release, "hub": hub, "commit": commit,
               "poses": poses, "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def reference(env):
    """The embeddings of the run itself (the --workdir side)."""
    embedder = embedder_lib.Embedder(run_lib.load_run(env["run"]), batch_size=8)
    return embedder.embed_poses(env["poses"]), embedder.embed_texts(TEXTS)


def _imports(monkeypatch) -> list[str]:
    """Records every import into the model cache (importer.prepare_import calls)."""
    calls = []
    real = importer.prepare_import

    def counted(folder, **kw):
        calls.append(str(folder))
        return real(folder, **kw)

    monkeypatch.setattr(importer, "prepare_import", counted)
    return calls


# ----------------------------------------------------------------------------- resolving
def test_release_folder_and_hub_model_give_the_runs_embeddings(env, reference, monkeypatch):
    calls = _imports(monkeypatch)
    workdir, checkpoint = models.resolve(env["release"])
    assert checkpoint is None and calls == [str(env["release"])]
    cached = Path(workdir)
    assert cached.parent == models.cache_dir() and models.is_cached_run(cached)
    assert cached.name == models.release_key(env["release"])
    run = run_lib.load_run(workdir)
    embedder = embedder_lib.Embedder(run, batch_size=8)
    poses, texts = embedder.embed_poses(env["poses"]), embedder.embed_texts(TEXTS)
    diff = max(max_abs_diff(poses, reference[0]), max_abs_diff(texts, reference[1]))
    print(f"release folder vs its run: max abs diff {diff}")
    assert diff == 0.0
    assert np.abs(reference[0]).max() > 1e-3  # not trivially equal

    # The Hub snapshot of the same files: the same cached run, no second import. Branch, tag,
    # commit and a copy of the folder elsewhere all map to it.
    hub = str(env["hub"])
    for ref in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@v1", f"hf-hub:{REPO}@{env['commit']}"):
        assert models.resolve(ref, hub_cache=hub) == (workdir, None), ref
    copy = env["root"] / "release-copy"
    shutil.copytree(env["release"], copy)
    (copy / "README.md").write_text("another card: not part of the model")
    assert models.resolve(copy) == (workdir, None)
    assert len(calls) == 1
    hidden = [p.name for p in models.cache_dir().iterdir() if p.name.startswith(".")]
    assert hidden == []  # no staging folder left

    # Other weights: another key, another run.
    changed = env["root"] / "release-changed"
    shutil.copytree(env["release"], changed)
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    assert models.release_key(changed) != models.release_key(env["release"])


def test_run_and_step_directories_pass_through(env, monkeypatch):
    calls = _imports(monkeypatch)
    assert models.resolve(env["run"]) == (str(env["run"]), None)
    step = env["run"] / "checkpoints" / "0"
    assert models.resolve(step) == (None, str(step))
    assert calls == []
    assert models.name_of(step) == "run" and models.name_of(f"hf-hub:{REPO}@v1") == "tiny"


def test_bad_references_are_one_clear_error(env, tmp_path):
    hub = str(env["hub"])
    cases = {
        f"hf-hub:{REPO.replace('tiny', 'missing')}": r"is not in the Hugging Face cache .* and "
        r"HF_HUB_OFFLINE is set: download it once .*`hf download signclip-test/missing`",
        f"hf-hub:{REPO}@no-such-branch": r"not in the Hugging Face cache",
        "hf-hub:": r"expected hf-hub:ORG/NAME",
        f"hf-hub:{REPO}@": r"expected hf-hub:ORG/NAME",
        "hf-hub:a/b/c": r"not a Hub repository id",
        "": r"--model is empty",
        REPO: r"does not exist; for a Hub model write --model=hf-hub:signclip-test/tiny",
        str(tmp_path): r"neither a run directory .* nor a release folder",
        str(env["release"] / "model.safetensors"): r"is a file",
    }
    for ref, match in cases.items():
        with pytest.raises(UserError, match=match):
            models.resolve(ref, hub_cache=hub)
    # A Hub repository that is not a signclip-jax release.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    hub_cache_from(other, tmp_path / "hub", "someone/bert")
    with pytest.raises(UserError, match=r"hf-hub:someone/bert is not a signclip-jax release"):
        models.resolve("hf-hub:someone/bert", hub_cache=tmp_path / "hub")


def test_publishing_keeps_a_complete_import_and_replaces_an_incomplete_one(tmp_path):
    target = tmp_path / "key"
    target.mkdir()
    (target / models.IMPORT_MARKER).write_text("{}")
    (target / "theirs").write_text("")
    staging = tmp_path / ".key.tmp"
    staging.mkdir()
    (staging / "ours").write_text("")
    models._publish(staging, target)  # another process got there first: keep its run
    assert sorted(p.name for p in target.iterdir()) == [models.IMPORT_MARKER, "theirs"]
    (target / models.IMPORT_MARKER).unlink()  # now it is incomplete: replaced
    (staging / models.IMPORT_MARKER).write_text("{}")
    models._publish(staging, target)
    assert sorted(p.name for p in target.iterdir()) == [models.IMPORT_MARKER, "ours"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_checkpoint_flags_take_model(env):
    parser = cli.Parser(prog="x")
    cli.add_checkpoint_args(parser)
    args = parser.parse_args([f"--model={env['run']}"])
    assert models.checkpoint_args(args) == (str(env["run"]), None)
    args = parser.parse_args([f"--workdir={env['run']}", "--which=best"])
    assert models.checkpoint_args(args) == (str(env["run"]), None)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([f"--model={env['run']}", f"--workdir={env['run']}"])
    assert exit_.value.code == 2


def test_evaluate_takes_model(env, capsys):
    from signclip_jax.evaluation import cli as eval_cli

    opts = eval_cli.parse_args([f"--model={env['release']}", "--split=val"])
    assert (opts.model, opts.workdir, opts.checkpoint) == (str(env["release"]), None, None)
    run = eval_cli.load(opts)
    assert models.is_cached_run(run.workdir)  # results go to ./eval/NAME, not into the cache
    assert eval_cli.default_out(run, opts) == os.path.join("eval", "release")
    opts = eval_cli.parse_args([f"--model={env['run']}"])
    assert eval_cli.default_out(eval_cli.load(opts), opts) == os.path.join(env["run"], "eval")
    with pytest.raises(SystemExit) as exit_:
        eval_cli.parse_args([f"--model={env['run']}", f"--workdir={env['run']}"])
    assert exit_.value.code == 2 and "leave out --workdir" in capsys.readouterr().err


# ---------------------------------------------------------------------------- Python use
def test_load_embeds_paths_pose_objects_features_and_texts(env, reference, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(env["hub"]))
    model = signclip_jax.load(f"hf-hub:{REPO}", batch_size=8)
    paths = env["poses"]
    pose = Pose.read(paths[1].read_bytes())
    features = model.embedder.pose_features(paths[2])
    got = model.embed_poses([str(paths[0]), pose, features])
    assert max_abs_diff(got, reference[0]) == 0.0
    assert max_abs_diff(model.embed_texts(TEXTS), reference[1]) == 0.0
    assert model.embed_texts("<en> <ase> house").shape == (1, model.hidden_size)
    assert model.prompt("house") == "<en> <ase> house"
    with pytest.raises(UserError, match=r"pose 0: a int"):
        model.embed_poses([3])


def test_twin_loads_a_hub_reference(env, reference, monkeypatch):
    from signclip_jax.interop.torch_twin import TorchSignCLIP

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(env["hub"]))
    twin = TorchSignCLIP.from_pretrained(f"hf-hub:{REPO}@v1")
    local = TorchSignCLIP.from_pretrained(env["release"])
    np.testing.assert_array_equal(twin.embed_texts(TEXTS), local.embed_texts(TEXTS))
    assert max_abs_diff(twin.embed_poses(env["poses"]), reference[0]) < 1e-5
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        TorchSignCLIP.from_pretrained("hf-hub:signclip-test/missing")


# ------------------------------------------------------------------------- command line
def _embed(args: list[str], env_vars: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.embed", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env_vars},
    )  # fmt: skip


def test_embed_cli_model_from_the_hub_cache_equals_workdir(env, tmp_path):
    """HF_HUB_OFFLINE=1 embed --model=hf-hub:ORG/NAME == embed --workdir (max abs diff 0),
    with a model cache that starts empty."""
    inputs = ["--poses", *map(str, env["poses"]), "--texts", *TEXTS, "-q"]
    offline = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(env["hub"]),
        models.CACHE_ENV: str(tmp_path / "model_cache"),
    }
    r = _embed([f"--workdir={env['run']}", *inputs, f"--out={tmp_path / 'w.npz'}"], offline)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _embed([f"--model=hf-hub:{REPO}", *inputs, f"--out={tmp_path / 'm.npz'}"], offline)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (tmp_path / "model_cache").iterdir()] == [
        models.release_key(env["release"])
    ]
    w, m = np.load(tmp_path / "w.npz"), np.load(tmp_path / "m.npz")
    for key in ("pose_embeddings", "text_embeddings"):
        diff = max_abs_diff(w[key], m[key])
        print(f"embed --model=hf-hub vs --workdir, {key}: max abs diff {diff}")
        assert diff == 0.0, key
    r = _embed([f"--model=hf-hub:{REPO.replace('tiny', 'gone')}", *inputs,
                f"--out={tmp_path / 'x.npz'}"], offline)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: hf-hub:signclip-test/gone is not")
