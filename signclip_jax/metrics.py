"""Retrieval metrics with the original SignCLIP definitions (reference section 7.2).

Inputs: `scores` [N_texts_rows, N_videos] where row i is the text of example i and column j
is the pose (video) of example j, and `texts` [N] (one caption per example; duplicates allowed).

- T2V: queries are the unique texts (first-occurrence order); candidates are all N videos,
  each labelled with its own text. R@k is micro recall over all relevant videos, P@k micro
  precision, median/mean rank of the first correct video (1-based). Ties keep index order
  (stable sort), as the original's argsort does.
- V2T: queries are all N videos; candidates are the unique texts. R@k is top-k accuracy;
  median/mean rank of the gold text (1-based).

Identical texts are one class. The original decodes token ids back to strings and uses
those as labels, so callers should pass decoded strings when they want its exact grouping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def unique_in_order(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique texts in first-occurrence order, and each example's index into them ([N])."""
    index: dict[str, int] = {}
    labels = np.empty(len(texts), np.int64)
    for i, t in enumerate(texts):
        labels[i] = index.setdefault(t, len(index))
    return list(index), labels


def text_to_video(scores: np.ndarray, texts: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """T2V metrics. `scores` [N, N]: row i = text of example i, column j = video j."""
    scores = np.asarray(scores, np.float64)
    uniq, labels = unique_in_order(texts)
    first_row = np.array([texts.index(t) for t in uniq]) if uniq else np.zeros(0, int)
    tp = {k: 0 for k in ks}
    positives = 0
    ranks = []
    for q, row in enumerate(first_row):
        order = np.argsort(-scores[row], kind="stable")
        correct = labels[order] == q
        positives += int(correct.sum())
        for k in ks:
            tp[k] += int(correct[:k].sum())
        ranks.append(int(np.argmax(correct)))
    n_queries = len(uniq)
    out = {}
    for k in ks:
        out[f"R@{k}"] = tp[k] / max(positives, 1)
        out[f"P@{k}"] = tp[k] / max(n_queries * k, 1)
    out["MedianR"] = float(np.median(ranks)) + 1 if ranks else float("nan")
    out["MeanR"] = float(np.mean(ranks)) + 1 if ranks else float("nan")
    return out


def video_to_text(scores: np.ndarray, texts: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """V2T metrics over unique texts. `scores` [N, N]: row i = text i, column j = video j.

    Rows of identical texts hold identical scores (same embedding), so the unique texts'
    first-occurrence rows give each class's score, as the original's adjacent-duplicate
    removal does.
    """
    scores = np.asarray(scores, np.float64)
    uniq, labels = unique_in_order(texts)
    first_row = np.array([list(texts).index(t) for t in uniq], dtype=np.int64)
    class_scores = scores[first_row].T  # [N videos, U texts]
    gold = class_scores[np.arange(len(labels)), labels]
    # Rank = number of classes scoring strictly higher, plus ties that come earlier in the
    # original's stable descending sort (ties broken by text row order).
    higher = (class_scores > gold[:, None]).sum(1)
    ties_before = (
        (class_scores == gold[:, None]) & (np.arange(len(uniq))[None] < labels[:, None])
    ).sum(1)
    ranks = higher + ties_before
    out = {f"R@{k}": float(np.mean(ranks < k)) if len(ranks) else float("nan") for k in ks}
    out["MedianR"] = float(np.median(ranks)) + 1 if len(ranks) else float("nan")
    out["MeanR"] = float(np.mean(ranks)) + 1 if len(ranks) else float("nan")
    return out


def retrieval_metrics(
    pose_emb: np.ndarray, text_emb: np.ndarray, texts: Sequence[str], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Both directions from embeddings ([N, H] each, row i one example). Dot-product scores."""
    scores = np.asarray(text_emb, np.float64) @ np.asarray(pose_emb, np.float64).T
    t2v = text_to_video(scores, list(texts), ks)
    v2t = video_to_text(scores, list(texts), ks)
    out = {f"t2v/{k}": v for k, v in t2v.items()}
    out.update({f"v2t/{k}": v for k, v in v2t.items()})
    return out
