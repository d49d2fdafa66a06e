"""python -m signclip_jax.search: index / query / evaluate on the demo data (synthetic signs)
with a briefly trained model: each prompt finds a recording of its sign first; evaluate's mAP
equals a brute-force computation; another model is refused; usage errors are one line."""

import csv
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.serving import embedder as embedder_lib
from signclip_jax.serving import search as search_lib
from signclip_jax.tools import search as search_cli
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data (configs/demo.py:tiny: 4 synthetic signs x 3 signers) and a tiny model
    trained on it for 40 steps (~45 s on 2 cores), enough to tell the signs apart (each
    prompt's best recording of its sign beats the others by >= 0.16 in cosine); plus a
    manifest of the English rows (pose, text)."""
    from signclip_jax.train import loop as train_lib

    data = tmp_path_factory.mktemp("demo_data")
    workdir = tmp_path_factory.mktemp("demo_run")
    config = tiny_config(data, total_steps=40)
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 5
    config.data.augment.temporal = False
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 40
    train_lib.train(config, str(workdir))
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


def _query(*argv) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert search_cli.main(["query", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def test_each_prompt_finds_its_sign_first(demo):
    workdir, index_path, words, sign_of = demo
    assert len(words) == 4 and len(sign_of) == 12
    prompts = [f"<en> <ase> {word}" for word in words]
    # Every prompt, through the library (one model load) ...
    index = search_lib.load_index(index_path)
    embedder = embedder_lib.Embedder(run_lib.load_run(workdir), batch_size=8)
    _, rows = search_lib.search(index, embedder.embed_texts(prompts), k=1, backend="numpy")
    assert [sign_of[str(index.files[r])] for r in rows[:, 0]] == words
    # ... and through the command line.
    got = _query(f"--index={index_path}", "--text", prompts[1], "--k=3", "--backend=numpy")
    assert got["query"] == {"text": prompts[1]} and len(got["results"]) == 3
    first = got["results"][0]
    assert sign_of[first["file"]] == words[1], got["results"]
    assert first["label"] == prompts[1] and first["rank"] == 1
    assert got["model"]["checkpoint"] == str(workdir / "checkpoints" / "40")
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


def test_evaluate_equals_brute_force(demo, tmp_path, capsys):
    workdir, index_path, words, _ = demo
    out = tmp_path / "metrics.json"
    assert search_cli.main(["evaluate", f"--index={index_path}", "--k", "1", "2", "--json",
                            f"--out={out}"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == got

    index = search_lib.load_index(index_path)
    e = index.embeddings / np.linalg.norm(index.embeddings, axis=1, keepdims=True)
    labels = list(index.labels)
    texts = [f"<en> <ase> {w}" for w in words]
    embedder = embedder_lib.Embedder(run_lib.load_run(workdir), batch_size=8)
    t = embedder.embed_texts(texts)
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
    with pytest.raises(UserError, match=r"is not the one the index was built with, .*step 40"):
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


def test_usage_errors(tmp_path):
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
    for argv, message in cases:
        r = _cli(*argv)
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
