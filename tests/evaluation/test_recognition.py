"""evaluation/recognition.py: zero-shot ranks, default shot counts, the scikit-learn extra."""

import sys

import numpy as np
import pytest

from signclip_jax import extras
from signclip_jax.evaluation import metrics
from signclip_jax.evaluation import recognition as ev


def test_zero_shot_ranks_each_pose_against_its_languages_class_prompts():
    rng = np.random.default_rng(1)
    vocab = ["house", "sun", "tree"]
    groups = [("en", "ase")] * 5 + [("en", "bfi")] * 4
    gold_text = [vocab[i] for i in rng.integers(0, 3, size=len(groups))]

    def render(text, spoken, signed):
        return f"<{spoken}> <{signed}> {text}"

    table = {render(t, *g): rng.normal(size=4) for t in vocab for g in set(groups)}
    pose = rng.normal(size=(len(groups), 4))
    gold = [render(t, *g) for t, g in zip(gold_text, groups)]
    out = ev.zero_shot(pose, gold, groups, vocab, render, lambda ps: {p: table[p] for p in ps})
    ranks = []
    for j, g in enumerate(groups):  # brute force: stable sort of the group's class scores
        scores = [table[render(t, *g)] @ pose[j] for t in vocab]
        order = np.argsort(-np.array(scores), kind="stable")
        ranks.append(int(np.nonzero(order == vocab.index(gold_text[j]))[0][0]))
    assert out["top1"] == pytest.approx(np.mean(np.array(ranks) < 1))
    assert out["MeanR"] == pytest.approx(np.mean(ranks) + 1)
    assert out["classes"] == 3 and out["examples"] == 9
    assert set(out["by_language"]) == {"en/ase", "en/bfi"}
    assert out["by_language"]["en/bfi"]["examples"] == 4
    # One language, vocabulary = the split's texts: zero-shot top-k is V2T R@k.
    one = [("en", "ase")] * len(groups)
    gold1 = [render(t, "en", "ase") for t in gold_text]
    vocab1 = list(dict.fromkeys(gold_text))
    z = ev.zero_shot(pose, gold1, one, vocab1, render, lambda ps: {p: table[p] for p in ps})
    text_emb = np.stack([table[p] for p in gold1])
    v2t = metrics.retrieval_metrics(pose, text_emb, gold1)
    assert [z[f"top{k}"] for k in (1, 5, 10)] == [v2t[f"v2t/R@{k}"] for k in (1, 5, 10)]


def test_default_shots():
    assert ev.default_shots(["a"] * 11 + ["b"], ["a", "b"]) == (1, 5, 10, 100)
    assert ev.default_shots(["a"] * 10 + ["c"] * 30, ["a", "b"]) == (1, 5, 10)


def test_few_shot_and_probe_without_scikit_learn_name_the_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ModuleNotFoundError
    emb, keys = np.zeros((4, 3)), ["a", "b", "a", "b"]
    with pytest.raises(extras.MissingExtra, match=r"few-shot .*pip install 'signclip-jax\[eval\]'"):
        ev.few_shot(emb, keys, emb, keys)
    with pytest.raises(extras.MissingExtra, match=r"probe .*signclip-jax\[eval\]"):
        ev.probe(emb, keys, emb, keys)


def test_zero_shot_notes_one_class_and_k_over_the_classes():
    rng = np.random.default_rng(2)

    def render(text, spoken, signed):
        return f"<{spoken}> <{signed}> {text}"

    vocab = [f"w{i}" for i in range(12)]
    table = {render(t, "en", g): rng.normal(size=4) for t in vocab for g in ("ase", "bfi")}

    def embed(ps):
        return {p: table[p] for p in ps}

    pose = rng.normal(size=(6, 4))
    groups = [("en", "ase")] * 6
    gold = [render(vocab[i], "en", "ase") for i in range(6)]
    assert "notes" not in ev.zero_shot(pose, gold, groups, vocab, render, embed)
    few = ev.zero_shot(pose, gold, groups, vocab[:6], render, embed)  # 6 classes: top10 trivial
    assert few["notes"] == [
        "top10 over 6 candidate classes: k exceeds the number of candidates, so it is trivially 1"
    ]
    assert few["top10"] == 1.0
    single = ev.zero_shot(pose[:3], [gold[0]] * 3, groups[:3], vocab[:1], render, embed)
    assert single["top1"] == 1.0 and single["notes"] == [
        "only 1 class: every example is classified correctly, trivially"
    ]
    # Several language pairs: each pair's notes under its name.
    mixed = [("en", "ase")] * 5 + [("en", "bfi")]
    gold_m = [render(vocab[i], *g) for i, g in enumerate(mixed)]
    out = ev.zero_shot(pose, gold_m, mixed, vocab, render, embed)
    assert out["notes"] == ["en/bfi: only 1 pose example: each score is 0 or 1, not an average"]
