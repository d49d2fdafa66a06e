"""python -m signclip_jax.search: index / query / evaluate on the demo data (synthetic signs)
with a briefly trained model: each prompt finds a recording of its sign first; evaluate's mAP
equals a brute-force computation; another model is refused; usage errors are one line."""

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.serving import embedder as embedder_lib
from signclip_jax.serving import search as search_lib
from signclip_jax.tools import search as search_cli
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # the demo model's training steps (its one checkpoint)


def train_demo(data: str, workdir: str) -> None:
    """configs/demo.py:tiny on 4 synthetic signs x 3 signers (generated into `data`), 40
    steps at a high learning rate, no temporal augmentation. No evaluator runs (search needs
    only the checkpoint; the weights are the same with or without one)."""
    from signclip_jax.train import loop as train_lib

    config = tiny_config(Path(data), total_steps=STEPS)
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 5
    config.data.augment.temporal = False
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = STEPS
    config.evals = ml_collections.ConfigDict()
    train_lib.train(config, workdir)


_TRAIN = """
import sys
sys.path.insert(0, sys.argv[1])
from absl import flags
flags.FLAGS.mark_as_parsed()
from tests.tools import test_search
test_search.train_demo(sys.argv[2], sys.argv[3])
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data and a tiny model trained on it (`train_demo`), enough to tell the signs
    apart (each prompt's best recording of its sign beats the others by >= 0.15 in cosine);
    plus a manifest of the English rows (pose, text) and its index.

    Trained in a child process on one CPU device, as on a laptop: about half the time of the
    8 virtual devices of the test process (one program to compile, no cross-device steps).
    """
    data = tmp_path_factory.mktemp("demo_data")
    workdir = tmp_path_factory.mktemp("demo_run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(ROOT), str(data), str(workdir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(data / "metadata.csv")) if r["language"] == "en"]
    manifest = data / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["pose", "text"])
        writer.writerows([f"poses/{r['pose']}", r["text"]] for r in rows)
    index = data / "demo.index.npz"
    code = search_cli.main(["index", f"--workdir={workdir}", f"--manifest={manifest}",
                            f"--out={index}", "-q"])  # fmt: skip
    assert code == 0
    words = sorted({r["text"] for r in rows})
    sign_of = {str(data / "poses" / r["pose"]): r["text"] for r in rows}
    return workdir, index, words, sign_of


@pytest.fixture(scope="module")
def demo_embedder(demo):
    """The demo model through the library (one load and compile for the module's checks)."""
    return embedder_lib.Embedder(run_lib.load_run(demo[0]), batch_size=8)


def _query(*argv) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert search_cli.main(["query", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def test_each_prompt_finds_its_sign_first(demo, demo_embedder):
    workdir, index_path, words, sign_of = demo
    assert len(words) == 4 and len(sign_of) == 12
    prompts = [f"<en> <ase> {word}" for word in words]
    # Every prompt, through the library (one model load) ...
    index = search_lib.load_index(index_path)
    _, rows = search_lib.search(index, demo_embedder.embed_texts(prompts), k=1, backend="numpy")
    assert [sign_of[str(index.files[r])] for r in rows[:, 0]] == words
    # ... and through the command line.
    got = _query(f"--index={index_path}", "--text", prompts[1], "--k=3", "--backend=numpy")
    assert got["query"] == {"text": prompts[1]} and len(got["results"]) == 3
    first = got["results"][0]
    assert sign_of[first["file"]] == words[1], got["results"]
    assert first["label"] == prompts[1] and first["rank"] == 1
    assert got["model"]["checkpoint"] == str(workdir / "checkpoints" / str(STEPS))
    # A pose of the index finds itself first (cosine 1).
    pose = sorted(sign_of)[5]
    got = _query(f"--index={index_path}", "--pose", pose, "--k=2")
    assert got["results"][0]["file"] == pose
    assert got["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_plain_output(demo, capsys):
    index = demo[1]
    assert search_cli.main(["query", f"--index={index}", "--text", "<en> <ase> sun"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("query '<en> <ase> sun': 10 of 12 poses (cosine scores")
    assert lines[1].split() == ["rank", "score", "file", "label"] and len(lines) == 12


def _ap(order, relevant):
    hits, total = 0, 0.0
    for rank, j in enumerate(order, 1):
        if relevant[j]:
            hits += 1
            total += hits / rank
    return total / hits


def test_evaluate_equals_brute_force(demo, demo_embedder, tmp_path, capsys):
    _, index_path, words, _ = demo
    out = tmp_path / "metrics.json"
    assert search_cli.main(["evaluate", f"--index={index_path}", "--k", "1", "2", "--json",
                            f"--out={out}"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == got

    index = search_lib.load_index(index_path)
    e = index.embeddings / np.linalg.norm(index.embeddings, axis=1, keepdims=True)
    labels = list(index.labels)
    texts = [f"<en> <ase> {w}" for w in words]
    t = demo_embedder.embed_texts(texts)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    n = len(labels)
    p2p_ap, p2p_p1, p2p_p2 = [], [], []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        order = sorted(others, key=lambda j: (-float(e[i] @ e[j]), j))
        relevant = {j: labels[j] == labels[i] for j in others}
        p2p_ap.append(_ap(order, relevant))
        p2p_p1.append(relevant[order[0]] / 1)
        p2p_p2.append((relevant[order[0]] + relevant[order[1]]) / 2)
    t2p_ap, t2p_p1 = [], []
    for text, q in zip(texts, t):
        order = sorted(range(n), key=lambda j: (-float(q @ e[j]), j))
        relevant = [label == text for label in labels]
        t2p_ap.append(_ap(order, relevant))
        t2p_p1.append(float(relevant[order[0]]))
    assert got["pose_to_pose"]["queries"] == 12 and got["text_to_pose"]["queries"] == 4
    assert got["pose_to_pose"]["mAP"] == pytest.approx(np.mean(p2p_ap), abs=1e-6)
    assert got["pose_to_pose"]["P@1"] == pytest.approx(np.mean(p2p_p1), abs=1e-6)
    assert got["pose_to_pose"]["P@2"] == pytest.approx(np.mean(p2p_p2), abs=1e-6)
    assert got["text_to_pose"]["mAP"] == pytest.approx(np.mean(t2p_ap), abs=1e-6)
    assert got["text_to_pose"]["P@1"] == pytest.approx(np.mean(t2p_p1), abs=1e-6) == 1.0


def test_another_model_is_refused(demo, tiny_workdir):
    _, index, _, _ = demo
    refused = rf"is not the one the index was built with, .*step {STEPS}"
    with pytest.raises(UserError, match=refused):
        search_cli.main(["query", f"--index={index}", "--text", "x", f"--workdir={tiny_workdir}"])
    unlabelled = Path(index).with_name("plain.npz")
    pose = sorted((Path(index).parent / "poses").iterdir())[0]
    argv = ["index", f"--workdir={tiny_workdir}", "--poses", str(pose), f"--out={unlabelled}"]
    assert search_cli.main(argv) == 0
    with pytest.raises(UserError, match="no labels"):
        search_cli.main(["evaluate", f"--index={unlabelled}"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "signclip_jax.search", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _error(argv, capsys) -> str:
    """search_cli.main(argv) in process -> its one user error: a parser error's stderr line
    (exit 2), or a UserError's message (the entry module prints it as one line, exit 2)."""
    try:
        search_cli.main(argv)
    except SystemExit as e:
        assert e.code == 2, (argv, e.code)
        return capsys.readouterr().err
    except UserError as e:
        return str(e)
    raise AssertionError(f"{argv}: no error")


def test_usage_errors(tmp_path, capsys):
    r = _cli("--help")
    assert r.returncode == 0 and "index" in r.stdout and "evaluate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "signclip_jax", "search", "query", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--text" in r.stdout and "--workdir" in r.stdout
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    cases = [
        (["query", f"--index={bad}"], "one of the arguments --text --pose is required"),
        (["query", f"--index={bad}", "--text", "x"], f"--index {bad}: not a search index"),
        (["query", f"--index={tmp_path / 'none.npz'}", "--text", "x"], "cannot read"),
        (["index", "--poses", "x.pose", f"--out={tmp_path / 'i.npz'}"], "--workdir"),
        (["index", "--workdir", str(tmp_path), f"--out={tmp_path / 'i.npz'}"], "nothing to index"),
        (["index", "--workdir", str(tmp_path), "--poses", str(tmp_path / "*.pose"),
          f"--out={tmp_path / 'i.npz'}"], "matches no files"),
        (["evaluate", f"--index={bad}"], "not a search index"),
    ]  # fmt: skip
    # Through the entry module (exit code, one line, no traceback): a parser error and a
    # UserError; every case in process.
    for argv, message in cases[:2]:
        r = _cli(*argv)
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for argv, message in cases:
        error = _error(argv, capsys)
        assert message in error and len(error.strip().splitlines()) == 1, (argv, error)
