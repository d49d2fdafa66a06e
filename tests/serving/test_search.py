"""signclip_jax.serving.search: exact top-k, mAP / precision@k against brute force, the index
file, and the model check."""

import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.extras import MissingExtra
from signclip_jax.serving import embedder as embedder_lib
from signclip_jax.serving import search
from tests.helpers import write_pose


def _index(emb, labels=None, metric="cosine", probe=None):
    n = len(emb)
    return search.SearchIndex(
        embeddings=np.asarray(emb, np.float32),
        files=np.array([f"p{i}.pose" for i in range(n)]),
        labels=np.array(labels if labels is not None else [""] * n),
        probe=np.zeros((len(search.PROBE_TEXTS), emb.shape[1]), np.float32) if probe is None
        else probe,
        meta={"format": 1, "model": {"checkpoint": "ckpt/7", "step": 7, "dtype": None},
              "metric": metric, "long_poses": "truncate", "hidden": emb.shape[1], "count": n},
    )  # fmt: skip


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_search_is_exact(metric):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    index = _index(emb, metric=metric)
    scores, rows = search.search(index, queries, k=5, backend="numpy")
    e, q = (_unit(emb), _unit(queries)) if metric == "cosine" else (emb, queries)
    for i in range(3):
        brute = sorted(range(50), key=lambda j: -float(q[i] @ e[j]))[:5]
        assert list(rows[i]) == brute
        np.testing.assert_allclose(scores[i], [q[i] @ e[j] for j in brute], rtol=1e-5)
    scores, rows = search.search(index, queries[0], k=500, backend="numpy")
    assert rows.shape == (1, 50)  # k is capped at the index size


def test_ties_keep_row_order():
    emb = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    _, rows = search.search(_index(emb), np.array([[1, 0]], np.float32), k=4, backend="numpy")
    assert list(rows[0]) == [0, 2, 3, 1]
    with pytest.raises(UserError, match="--k must be >= 1"):
        search.search(_index(emb), emb, k=0)
    with pytest.raises(UserError, match="--backend 'annoy'"):
        search.search(_index(emb), emb, backend="annoy")


def _brute_ap(order, relevant):
    hits, precisions = 0, []
    for rank, j in enumerate(order, 1):
        if relevant[j]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def _brute_force(emb, labels, texts, text_emb, ks, metric):
    """mAP and P@k by the definitions, one query at a time, in plain Python."""
    e = _unit(emb) if metric == "cosine" else emb
    t = _unit(text_emb) if metric == "cosine" else text_emb
    n = len(labels)
    p2p = {"ap": [], **{k: [] for k in ks}}
    for i in range(n):
        if not labels[i] or sum(labels[j] == labels[i] for j in range(n) if j != i) == 0:
            continue
        others = [j for j in range(n) if j != i]
        order = sorted(others, key=lambda j: (-float(e[i] @ e[j]), j))
        relevant = {j: labels[j] == labels[i] for j in others}
        p2p["ap"].append(_brute_ap(order, relevant))
        for k in ks:
            p2p[k].append(sum(relevant[j] for j in order[:k]) / k)
    t2p = {"ap": [], **{k: [] for k in ks}}
    for text, q in zip(texts, t):
        order = sorted(range(n), key=lambda j: (-float(q @ e[j]), j))
        relevant = {j: labels[j] == text for j in range(n)}
        t2p["ap"].append(_brute_ap(order, relevant))
        for k in ks:
            t2p[k].append(sum(relevant[j] for j in order[:k]) / k)
    return [
        {"queries": len(d["ap"]), "mAP": float(np.mean(d["ap"])),
         **{f"P@{k}": float(np.mean(d[k])) for k in ks}}
        for d in (p2p, t2p)
    ]  # fmt: skip


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_evaluate_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    labels = ["<en> <ase> a"] * 6 + ["<en> <ase> b"] * 5 + ["<en> <ase> c"] * 4 + ["<x> lone"]
    labels += [""] * 4  # unlabelled: candidates, never queries or relevant
    n = len(labels)
    centres = {name: rng.normal(size=6) for name in set(labels)}
    emb = np.stack([centres[label] + 1.5 * rng.normal(size=6) for label in labels])
    index = _index(emb.astype(np.float32), labels, metric)
    texts = search.label_texts(index)
    assert texts == ["<en> <ase> a", "<en> <ase> b", "<en> <ase> c", "<x> lone"]
    text_emb = rng.normal(size=(len(texts), 6)).astype(np.float32)
    got = search.evaluate(index, text_emb, ks=(1, 3, 10), block=4)  # several blocks
    p2p, t2p = _brute_force(index.embeddings, labels, texts, text_emb, (1, 3, 10), metric)
    assert got["items"] == n and got["labelled"] == n - 4 and got["labels"] == 4
    assert got["pose_to_pose"]["queries"] == 15  # "<x> lone" has no other row to find
    for name, want in (("pose_to_pose", p2p), ("text_to_pose", t2p)):
        assert got[name].keys() == want.keys()
        for key, value in want.items():
            assert got[name][key] == pytest.approx(value, abs=1e-6), (name, key)
    # The metrics are informative here: neither perfect nor chance.
    assert 0.3 < got["pose_to_pose"]["mAP"] < 1.0
    with pytest.raises(UserError, match="no labels"):
        search.evaluate(_index(emb), None)


def test_index_file_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    index = _index(rng.normal(size=(4, 3)), ["a", "", "b", "a"], "dot")
    path = tmp_path / "idx.npz"
    search.save_index(path, index)
    back = search.load_index(path)
    np.testing.assert_array_equal(back.embeddings, index.embeddings)
    assert list(back.files) == list(index.files) and list(back.labels) == ["a", "", "b", "a"]
    assert back.meta == index.meta and back.metric == "dot"
    assert back.describe_model() == "ckpt/7 at step 7"
    with pytest.raises(UserError, match="cannot read"):
        search.load_index(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"bad\.npz: not a search index"):
        search.load_index(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="not a search index"):
        search.load_index(tmp_path / "other.npz")


class _FakeEmbedder:
    def __init__(self, probe, hidden):
        self.probe, self.hidden_size = probe, hidden

    def embed_texts(self, texts):
        assert list(texts) == list(search.PROBE_TEXTS)
        return self.probe


def test_check_model_refuses_another_model():
    rng = np.random.default_rng(3)
    probe = rng.normal(size=(len(search.PROBE_TEXTS), 4)).astype(np.float32)
    index = _index(rng.normal(size=(2, 4)), probe=probe)
    search.check_model(index, _FakeEmbedder(probe + 1e-6, 4), "same")  # same model: accepted
    with pytest.raises(UserError, match=r"the model other is not the one .* ckpt/7 at step 7"):
        search.check_model(index, _FakeEmbedder(probe + 0.1, 4), "other")
    with pytest.raises(UserError, match="gives 8-d embeddings"):
        search.check_model(index, _FakeEmbedder(np.zeros((3, 8)), 8), "wide")


def test_faiss_backend():
    rng = np.random.default_rng(4)
    index = _index(rng.normal(size=(30, 8)))
    queries = rng.normal(size=(2, 8)).astype(np.float32)
    if not search.faiss_available():
        with pytest.raises(MissingExtra, match=r"pip install 'signclip-jax\[search\]'"):
            search.search(index, queries, backend="faiss")
        # auto falls back to numpy
        _, rows = search.search(index, queries, backend="auto")
        np.testing.assert_array_equal(rows, search.search(index, queries, backend="numpy")[1])
        pytest.skip("faiss is not installed: its backend is not checked")
    s_np, r_np = search.search(index, queries, k=5, backend="numpy")
    s_fa, r_fa = search.search(index, queries, k=5, backend="faiss")
    np.testing.assert_array_equal(r_fa, r_np)
    np.testing.assert_allclose(s_fa, s_np, rtol=1e-5, atol=1e-6)


def test_build_index(tiny_workdir, tmp_path):
    run = run_lib.load_run(tiny_workdir)
    embedder = embedder_lib.Embedder(run, batch_size=8)
    a, b = write_pose(tmp_path / "a.pose", 30, 1), write_pose(tmp_path / "b.pose", 40, 2)
    paths = [str(a), str(tmp_path / "missing.pose"), str(b)]
    index, failed = search.build_index(
        embedder, paths, model=search.model_record(run), labels=["x", "y", ""]
    )
    assert list(index.files) == [str(a), str(b)] and list(index.labels) == ["x", ""]
    assert [f for f, _ in failed] == [str(tmp_path / "missing.pose")]
    np.testing.assert_allclose(index.embeddings, embedder.embed_poses([a, b]), atol=1e-6)
    assert index.meta["model"]["checkpoint"] == str(run.step_dir)
    search.check_model(index, embedder, "itself")
