import numpy as np
import pytest

from signclip_jax import metrics

# Worked example of reference section 7.2 (checked there by running the original classes).
TEXTS = ["a", "a", "b", "c"]
ROWS = {"a": [0.9, 0.1, 0.5, 0.0], "b": [0.2, 0.8, 0.9, 0.1], "c": [0.0, 0.0, 0.3, 0.7]}
SCORES = np.array([ROWS[t] for t in TEXTS])


def test_worked_example_from_the_original():
    t2v = metrics.text_to_video(SCORES, TEXTS)
    v2t = metrics.video_to_text(SCORES, TEXTS)
    assert t2v["R@1"] == pytest.approx(0.75)
    assert t2v["P@1"] == pytest.approx(1.0)
    assert t2v["P@5"] == pytest.approx(4 / 15)
    assert v2t["R@1"] == pytest.approx(0.75)
    assert v2t["MeanR"] == pytest.approx(1.25)


def test_ties_keep_index_order():
    # Two unique texts with identical scores for every video: the earlier text wins ties.
    texts = ["x", "y"]
    scores = np.ones((2, 2))
    v2t = metrics.video_to_text(scores, texts)
    assert v2t["R@1"] == pytest.approx(0.5)  # video 0 (gold x) ranks first, video 1 second
    t2v = metrics.text_to_video(scores, texts)
    assert t2v["R@1"] == pytest.approx(0.5)  # both queries see video 0 first


def _brute_force_v2t(scores, texts, k):
    uniq = list(dict.fromkeys(texts))
    hits = []
    for j, gold in enumerate(texts):
        per_text = [(scores[texts.index(u), j], -i, u) for i, u in enumerate(uniq)]
        ranked = [u for _, _, u in sorted(per_text, reverse=True)]
        hits.append(gold in ranked[:k])
    return np.mean(hits)


def test_v2t_matches_brute_force_with_duplicates_and_singletons():
    rng = np.random.default_rng(0)
    texts = [str(t) for t in rng.integers(0, 7, size=30)]
    emb_t = {t: rng.normal(size=8) for t in set(texts)}
    pose = rng.normal(size=(30, 8))
    scores = np.stack([emb_t[t] for t in texts]) @ pose.T
    for k in (1, 5, 10):
        assert metrics.video_to_text(scores, texts)[f"R@{k}"] == pytest.approx(
            _brute_force_v2t(scores, texts, k)
        )


def test_perfect_embeddings_give_perfect_retrieval():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(12, 16)) * 10
    out = metrics.retrieval_metrics(emb, emb, [f"t{i}" for i in range(12)])
    assert out["t2v/R@1"] == 1.0 and out["v2t/R@1"] == 1.0
    assert out["v2t/MedianR"] == 1.0
