"""Isolated-sign recognition on embeddings: zero-shot against class prompts, few-shot k-NN
(reference 7.4) and the linear probe (reference 7.5).

Zero-shot needs only the model (the class names rendered with the data's prompt template);
few-shot and the probe fit scikit-learn classifiers on a support split's pose embeddings
(the `eval` extra: `pip install 'signclip-jax[eval]'`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from signclip_jax import extras
from signclip_jax.data import pipeline
from signclip_jax.errors import UserError
from signclip_jax.evaluation import metrics

DEFAULT_SHOTS = (1, 5, 10, 100)


def prompt_renderer(settings: pipeline.InputSettings) -> Callable[[str, str, str], str]:
    """f(text, spoken, signed) -> the prompt the input pipeline builds for such a record."""
    # The pipeline's own per-record prompt (template, gloss clean-up, language names), so a
    # class prompt equals the prompt of a training/validation example with that caption.
    prepare = pipeline._Prepare([], settings, None, seed=0, train=False)

    def render(text: str, spoken: str, signed: str) -> str:
        return prepare.prompt({"text": text, "spoken_language": spoken, "sign_language": signed})

    return render


def zero_shot(
    pose_emb: np.ndarray,
    gold_keys: Sequence[str],
    groups: Sequence[tuple[str, str]],
    vocab: Sequence[str],
    render: Callable[[str, str, str], str],
    embed_prompts: Callable[[list[str]], dict[str, np.ndarray]],
    key_fn: Callable[[Sequence[str]], list[str]] = list,
    *,
    ks: Sequence[int] = metrics.KS,
    block_elems: int | None = None,
) -> dict[str, Any]:
    """Zero-shot recognition: each pose against every class in `vocab` (raw class names).

    For the poses of one (spoken, signed) language pair, the candidates are the class names
    rendered into prompts for that pair, merged by class key (first occurrence kept); a pose's
    gold is its own class key. Ties rank the earlier class first (as V2T). Returns top-k
    accuracy, median/mean rank (1-based), classes, examples; per language pair too when there
    are several; "notes" (a list of str, only when there is one) when some number is trivial
    (metrics.recognition_notes: one pose, one class, k >= classes; per pair prefixed "<pair>: ").
    pose_emb [N, H]; `embed_prompts(list of prompts) -> {prompt: [H] embedding}`.
    """
    block = block_elems or metrics.DEFAULT_BLOCK_ELEMS
    pose = np.asarray(pose_emb, np.float64)
    ranks = np.zeros(len(gold_keys), np.int64)
    per_group: dict[str, dict] = {}
    n_classes = 0
    several = len(set(groups)) > 1
    notes: list[str] = []
    for group in sorted(set(groups)):
        rows = np.array([i for i, g in enumerate(groups) if g == group], np.int64)
        prompts = [render(t, *group) for t in vocab]
        keys = key_fn(prompts)
        first: dict[str, str] = {}
        for k, p in zip(keys, prompts):
            first.setdefault(k, p)
        cand_keys = list(first)
        emb = embed_prompts(list(first.values()))
        cand = np.stack([emb[p] for p in first.values()]).astype(np.float64)
        index = {k: i for i, k in enumerate(cand_keys)}
        missing = [gold_keys[i] for i in rows if gold_keys[i] not in index]
        if missing:
            raise UserError(f"zero-shot: class {missing[0]!r} is not in the class list")
        gold = np.array([index[gold_keys[i]] for i in rows], np.int64)
        sub = pose[rows]
        r = metrics.video_to_text_ranks(
            lambda v, sub=sub, cand=cand: sub[v] @ cand.T, gold, len(cand_keys), block_elems=block
        )
        ranks[rows] = r
        n_classes = max(n_classes, len(cand_keys))
        name = "/".join(group)
        per_group[name] = _accuracy(r, ks) | {"classes": len(cand_keys), "examples": len(rows)}
        sub_notes = metrics.recognition_notes(len(rows), len(cand_keys), ks, what="pose")
        notes += [f"{name}: {n}" if several else n for n in sub_notes]
    out: dict[str, Any] = _accuracy(ranks, ks) | {"classes": n_classes, "examples": len(ranks)}
    if several:
        out["by_language"] = per_group
    if notes:
        out["notes"] = notes
    return out


def _accuracy(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    rec = metrics.recall_from_ranks(ranks, ks)
    out = {f"top{k}": rec[f"R@{k}"] for k in ks}
    out["MedianR"], out["MeanR"] = rec["MedianR"], rec["MeanR"]
    return out


def default_shots(train_keys: Sequence[str], test_keys: Sequence[str]) -> tuple[int, ...]:
    """1, 5, 10, and 100 when some test class has more than 10 training examples."""
    wanted = set(test_keys)
    counts = Counter(k for k in train_keys if k in wanted)
    most = max(counts.values(), default=0)
    return tuple(s for s in DEFAULT_SHOTS if s <= 10 or most > 10)


def few_shot(
    train_emb: np.ndarray,
    train_keys: Sequence[str],
    test_emb: np.ndarray,
    test_keys: Sequence[str],
    *,
    shots: Sequence[int] | None = None,
    draws: int = 5,
    neighbors: str | int = "sqrt",
    seed: int = 42,
) -> dict[str, Any]:
    """Few-shot k-NN (metrics.few_shot_knn): {"seed", "draws", "neighbors", "shots": {...}}.

    shots: None = default_shots; neighbors: sqrt, classes or an integer (also as a string).
    """
    extras.require("sklearn", "eval", "few-shot k-NN")
    rule = int(neighbors) if str(neighbors).isdigit() else neighbors
    return {
        "seed": seed,
        "draws": draws,
        "neighbors": neighbors,
        "shots": metrics.few_shot_knn(
            train_emb,
            train_keys,
            test_emb,
            test_keys,
            shots=shots or default_shots(train_keys, test_keys),
            seed=seed,
            draws=draws,
            n_neighbors=rule,
        ),
    }


def probe(
    train_emb: np.ndarray,
    train_keys: Sequence[str],
    test_emb: np.ndarray,
    test_keys: Sequence[str],
    *,
    max_iter: int = 100,
    filter_train: bool = False,
    seed: int = 42,
) -> dict[str, Any]:
    """The logistic-regression probe (metrics.linear_probe): train split -> eval split."""
    extras.require("sklearn", "eval", "the linear probe")
    return metrics.linear_probe(
        train_emb,
        train_keys,
        test_emb,
        test_keys,
        seed=seed,
        max_iter=max_iter,
        filter_train=filter_train,
    )


__all__ = ["DEFAULT_SHOTS", "default_shots", "few_shot", "probe", "prompt_renderer", "zero_shot"]
