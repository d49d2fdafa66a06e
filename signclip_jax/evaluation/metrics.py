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

import dataclasses
import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from signclip_jax import extras

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


# ---------------------------------------------------------------------------------------------
# Notes: evaluations whose numbers say nothing (one example, one class, k >= candidates). The
# scores stay as defined; the notes travel with them ("notes" in the result dicts) so that a
# report never shows a trivially perfect number without saying so.


def _k_over(ks: Sequence[int], n: int, what: str, metric: str, candidates: str) -> str:
    """'' or a note for the ks whose top k holds every one of `n` candidates: "{what}R@5,
    R@10 over 3 candidate texts: ..." (metric "R@{k}")."""
    over = [k for k in ks if k >= n]
    if not over or n < 1:
        return ""
    listed = what + ", ".join(metric.format(k=k) for k in over)
    verb = "exceeds" if min(over) > n else "is at least"
    these = "it is" if len(over) == 1 else "they are"
    return (
        f"{listed} over {n} candidate {candidates}: k {verb} the number of candidates, so "
        f"{these} trivially 1"
    )


def retrieval_notes(
    num_examples: int, num_classes: int, ks: Sequence[int] = KS, *, standard: bool = False
) -> list[str]:
    """Notes on retrieval numbers that are trivially perfect.

    One example: every score is perfect. One class (all texts equal): V2T has one candidate
    text. T2V (and std/*) rank `num_examples` poses (std/v2t: as many text rows), V2T ranks
    `num_classes` texts: R@k with k >= candidates is 1 whatever the model.
    """
    if num_examples == 1:
        return [
            "only 1 example: retrieval scores are trivially perfect (every R@k 1, every rank "
            "1; T2V P@k is 1/k, its best)"
        ]
    if num_examples < 1:
        return []
    notes = []
    if num_classes == 1:
        notes.append(
            f"only 1 class (all {num_examples} examples share one text): V2T has a single "
            "candidate text, so its scores are trivially perfect"
        )
    t2v = "T2V and std " if standard else "T2V "
    notes.append(_k_over(ks, num_examples, t2v, "R@{k}", "poses"))
    if num_classes > 1:
        notes.append(_k_over(ks, num_classes, "V2T ", "R@{k}", "texts"))
    return [n for n in notes if n]


def recognition_notes(
    num_examples: int, num_classes: int, ks: Sequence[int] = KS, *, what: str = "test"
) -> list[str]:
    """Notes on recognition numbers (top-k accuracy over `num_classes` candidate classes,
    `num_examples` scored examples) that are trivial: one class, k >= classes, one example."""
    notes = []
    if num_examples == 1:
        notes.append(f"only 1 {what} example: each score is 0 or 1, not an average")
    if num_classes == 1:
        notes.append("only 1 class: every example is classified correctly, trivially")
    elif num_classes > 1:
        notes.append(_k_over(ks, num_classes, "", "top{k}", "classes"))
    return [n for n in notes if n]


# ---------------------------------------------------------------------------------------------
# Block-wise ranks: the same definitions without ever holding an [N, N] score matrix.
#
# Every retrieval number above is a function of one rank per (query, gold candidate) pair:
# the 0-based position of the gold candidate in the query's stable descending sort, i.e.
#   rank = #{c : s[c] > s[gold]} + #{c < gold : s[c] == s[gold]}.
# T2V: query = the example's (unique) text, gold = its own video; tp@k, R@k, P@k and the rank of
# the first correct video all follow from these ranks. V2T: query = a video, gold = its unique
# text. Scores are produced a block of query rows at a time (`score_rows`), each row whole, so
# a gold score and the scores it is compared with come from the same computation.

ScoreRows = Callable[[np.ndarray], np.ndarray]

# Scores held at once: [rows, candidates] float64 with rows = max(1, BLOCK_ELEMS // candidates).
DEFAULT_BLOCK_ELEMS = 1 << 22


@dataclasses.dataclass
class PairScan:
    """Per (query, gold) pair: candidates strictly above the gold, and exact ties.

    higher: [P] int64 count (or weighted count) of candidates scoring strictly higher.
    tie_pair, tie_cand: [T] every (pair, candidate) with a score equal to the pair's gold
      score, the gold itself excluded.
    """

    higher: np.ndarray
    higher_weighted: np.ndarray | None
    tie_pair: np.ndarray
    tie_cand: np.ndarray

    def stable_ranks(self, gold: np.ndarray) -> np.ndarray:
        """0-based rank of each gold in a stable descending sort (ties: lower index first)."""
        before = self.tie_cand < np.asarray(gold)[self.tie_pair]
        return self.higher + np.bincount(self.tie_pair[before], minlength=len(self.higher))


def scan_pairs(
    score_rows: ScoreRows,
    pair_query: np.ndarray,
    pair_gold: np.ndarray,
    num_candidates: int,
    *,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    weights: np.ndarray | None = None,
) -> PairScan:
    """Scans the score rows of every pair's query in blocks of rows.

    score_rows(queries [q] int64, ascending, unique) -> scores [q, num_candidates].
    pair_query / pair_gold [P]: each pair's query row and gold candidate column.
    weights [num_candidates] (optional): also count higher candidates with these weights.
    NaN scores sort last, as in the original's argsort of the negated scores.
    """
    pair_query = np.asarray(pair_query, np.int64)
    pair_gold = np.asarray(pair_gold, np.int64)
    n_pairs = len(pair_query)
    higher = np.zeros(n_pairs, np.int64)
    higher_w = None if weights is None else np.zeros(n_pairs, np.int64)
    w = None if weights is None else np.asarray(weights, np.float64)
    ties_p, ties_c = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    order = np.argsort(pair_query, kind="stable")  # pairs of one query share its score row
    step = max(1, int(block_elems) // max(int(num_candidates), 1))
    for start in range(0, n_pairs, step):
        sel = order[start : start + step]
        queries, inv = np.unique(pair_query[sel], return_inverse=True)
        block = np.asarray(score_rows(queries), np.float64)
        if block.shape != (len(queries), num_candidates):
            raise ValueError(
                f"score_rows gave shape {block.shape}, expected {(len(queries), num_candidates)}"
            )
        if np.isnan(block).any():
            block = np.where(np.isnan(block), -np.inf, block)
        rows = block if len(queries) == len(sel) else block[inv]
        arange = np.arange(len(sel))
        gold = rows[arange, pair_gold[sel]][:, None]
        above = rows > gold
        higher[sel] = np.count_nonzero(above, axis=1)
        if w is not None:
            higher_w[sel] = np.rint(above @ w).astype(np.int64)  # exact: integer counts < 2**53
        equal = rows == gold
        equal[arange, pair_gold[sel]] = False
        p, c = np.nonzero(equal)
        ties_p.append(sel[p])
        ties_c.append(c.astype(np.int64))
    return PairScan(higher, higher_w, np.concatenate(ties_p), np.concatenate(ties_c))


def text_to_video_ranks(
    score_rows: ScoreRows, labels: np.ndarray, *, block_elems: int = DEFAULT_BLOCK_ELEMS
) -> np.ndarray:
    """[N] rank of video j in the score row of its own text (class labels[j]).

    score_rows(class ids [q]) -> [q, N] scores of those unique texts against all N videos.
    """
    labels = np.asarray(labels, np.int64)
    videos = np.arange(len(labels))
    scan = scan_pairs(score_rows, labels, videos, len(labels), block_elems=block_elems)
    return scan.stable_ranks(videos)


def video_to_text_ranks(
    score_rows: ScoreRows,
    labels: np.ndarray,
    num_classes: int,
    *,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    per_example: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """[N] rank of video j's unique text among the `num_classes` unique texts.

    score_rows(video ids [q]) -> [q, num_classes] scores of those videos against the unique
    texts. With `per_example`, also the rank of text row j among all N text rows (duplicates
    included, a stable sort: the "standard" diagonal rank), from the same scores.
    """
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    counts = np.bincount(labels, minlength=num_classes) if per_example else None
    scan = scan_pairs(
        score_rows, np.arange(n), labels, num_classes, block_elems=block_elems, weights=counts
    )
    ranks = scan.stable_ranks(labels)
    if not per_example:
        return ranks
    # Row i ranks above row j when its class scores higher, or ties and i < j. Rows of j's own
    # class tie with it; those before j are its occurrence index within the class.
    keys = np.sort(labels * (n + 1) + np.arange(n))

    def rows_before(cls: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.searchsorted(keys, cls * (n + 1) + j) - np.searchsorted(keys, cls * (n + 1))

    videos = np.arange(n)
    per_row = scan.higher_weighted + rows_before(labels, videos)
    tie_rows = rows_before(scan.tie_cand, scan.tie_pair)
    per_row += np.bincount(scan.tie_pair, weights=tie_rows, minlength=n).astype(np.int64)
    return ranks, per_row


def t2v_from_ranks(
    ranks: np.ndarray, labels: np.ndarray, num_classes: int, ks: Sequence[int] = KS
) -> dict:
    """The original T2V metrics (`text_to_video`) from `text_to_video_ranks`."""
    ranks = np.asarray(ranks, np.int64)
    labels = np.asarray(labels, np.int64)
    out = {}
    for k in ks:
        tp = int(np.count_nonzero(ranks < k))
        out[f"R@{k}"] = tp / max(len(ranks), 1)
        out[f"P@{k}"] = tp / max(num_classes * k, 1)
    first = np.full(num_classes, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, labels, ranks)  # rank of the first correct video of each text
    out["MedianR"] = float(np.median(first)) + 1 if num_classes else float("nan")
    out["MeanR"] = float(np.mean(first)) + 1 if num_classes else float("nan")
    return out


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """R@k = share of queries whose gold ranks in the top k; median/mean rank (1-based)."""
    ranks = np.asarray(ranks)
    empty = len(ranks) == 0
    out = {f"R@{k}": float("nan") if empty else float(np.mean(ranks < k)) for k in ks}
    out["MedianR"] = float("nan") if empty else float(np.median(ranks)) + 1
    out["MeanR"] = float("nan") if empty else float(np.mean(ranks)) + 1
    return out


def _first_rows(texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    uniq, labels = unique_in_order(texts)
    first = np.zeros(len(uniq), np.int64)
    seen = np.zeros(len(uniq), bool)
    for i, c in enumerate(labels):
        if not seen[c]:
            seen[c], first[c] = True, i
    return uniq, labels, first


def text_to_video_blocked(
    scores, texts: Sequence[str], ks: Sequence[int] = KS, *, block_elems: int = DEFAULT_BLOCK_ELEMS
) -> dict:
    """`text_to_video` reading `scores` [N, N] (array or memmap) a block of rows at a time."""
    uniq, labels, first = _first_rows(list(texts))
    ranks = text_to_video_ranks(lambda q: scores[first[q]], labels, block_elems=block_elems)
    return t2v_from_ranks(ranks, labels, len(uniq), ks)


def video_to_text_blocked(
    scores, texts: Sequence[str], ks: Sequence[int] = KS, *, block_elems: int = DEFAULT_BLOCK_ELEMS
) -> dict:
    """`video_to_text` reading `scores` [N, N] a block of video columns at a time."""
    uniq, labels, first = _first_rows(list(texts))
    ranks = video_to_text_ranks(
        lambda v: np.asarray(scores[np.ix_(first, v)]).T,
        labels,
        len(uniq),
        block_elems=block_elems,
    )
    return recall_from_ranks(ranks, ks)


def retrieval_metrics_blocked(
    pose_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: Sequence[str],
    ks: Sequence[int] = KS,
    *,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
    standard: bool = True,
) -> dict[str, float]:
    """`retrieval_metrics` (same keys, same values) without an [N, N] matrix; plus, with
    `standard`, the per-example ("diagonal") metrics under std/t2v/* and std/v2t/*.

    pose_emb, text_emb [N, H]: row i is example i; a text's score row is that of its first
    occurrence, as in `retrieval_metrics`. Dot-product scores in float64.
    std/t2v: query = every text row, gold = its own video (R@k equals t2v/R@k; the median and
    mean are over all N rows). std/v2t: query = every video, candidates = all N text rows
    (duplicate texts compete; ties keep row order), gold = its own row.
    """
    texts = list(texts)
    uniq, labels, first = _first_rows(texts)
    pose = np.asarray(pose_emb, np.float64)
    classes = np.asarray(text_emb, np.float64)[first]
    if len(pose) != len(texts) or len(np.asarray(text_emb)) != len(texts):
        n_text = len(np.asarray(text_emb))
        raise ValueError(f"{len(pose)} pose and {n_text} text embeddings for {len(texts)} texts")
    t2v_ranks = text_to_video_ranks(lambda q: classes[q] @ pose.T, labels, block_elems=block_elems)
    v2t = video_to_text_ranks(
        lambda v: pose[v] @ classes.T,
        labels,
        len(uniq),
        block_elems=block_elems,
        per_example=standard,
    )
    v2t_ranks, v2t_rows = v2t if standard else (v2t, None)
    out = {f"t2v/{k}": v for k, v in t2v_from_ranks(t2v_ranks, labels, len(uniq), ks).items()}
    out.update({f"v2t/{k}": v for k, v in recall_from_ranks(v2t_ranks, ks).items()})
    if standard:
        out.update({f"std/t2v/{k}": v for k, v in recall_from_ranks(t2v_ranks, ks).items()})
        out.update({f"std/v2t/{k}": v for k, v in recall_from_ranks(v2t_rows, ks).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Recognition from embeddings: top-k with scikit-learn's tie rule, few-shot k-NN, linear probe.


def topk_hits_sklearn(y_score: np.ndarray, y_true: np.ndarray, k: int) -> np.ndarray:
    """[n] bool: gold class among the top k, ties as `sklearn.metrics.top_k_accuracy_score`
    (stable ascending sort reversed: among equal scores the higher class index wins)."""
    order = np.argsort(y_score, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return (order == np.asarray(y_true)[:, None]).any(axis=1)


def _original_median_rank(y_score: np.ndarray, y_true: np.ndarray) -> float:
    """Median 1-based position of the gold class in `np.argsort(-y_score)` (the scripts')."""
    order = np.argsort(-y_score)  # default kind, as the original scripts
    positions = [int(np.nonzero(row == t)[0][0]) for row, t in zip(order, y_true)]
    return float(statistics.median(positions) + 1)


def _score_classifier(y_score, y_test, ks) -> dict:
    out = {f"top{k}": float(np.mean(topk_hits_sklearn(y_score, y_test, k))) for k in ks}
    out["MedianR"] = _original_median_rank(y_score, y_test)
    return out


def few_shot_sample(
    train_labels: Sequence[str], test_labels: Sequence[str], shots: int, rng
) -> list[int]:
    """Training rows of one few-shot draw (reference 7.4), `rng` a `random.Random`.

    Rows grouped by label in first-occurrence order, only labels present in the test set; a
    group larger than `shots` is replaced by `rng.sample(group, shots)`; groups concatenated.
    """
    wanted = set(test_labels)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(train_labels):
        if t in wanted:
            groups.setdefault(t, []).append(i)
    for t, ids in groups.items():
        if len(ids) > shots:
            groups[t] = rng.sample(ids, shots)
    return [i for ids in groups.values() for i in ids]


def knn_neighbors(rule: str | int, n_train: int, n_test_classes: int) -> int:
    """k of the k-NN: "sqrt" = round(sqrt(N_train)) (reference 7.4); "classes" = the number of
    test classes (the public script's current choice); an integer as given. At most N_train."""
    if rule == "sqrt":
        k = round(math.sqrt(n_train))
    elif rule == "classes":
        k = n_test_classes
    else:
        k = int(rule)
    return max(1, min(k, n_train))


def few_shot_knn(
    train_emb: np.ndarray,
    train_labels: Sequence[str],
    test_emb: np.ndarray,
    test_labels: Sequence[str],
    *,
    shots: Sequence[int] = (1, 5, 10, 100),
    seed: int = 42,
    draws: int = 1,
    n_neighbors: str | int = "sqrt",
    ks: Sequence[int] = KS,
) -> dict[str, dict]:
    """Few-shot k-NN of the original (`test_recognition_few_shot_knn.py`, reference 7.4).

    Draw r uses `random.Random(seed + r)` for all `shots` in order (draw 0 = the original's
    single run: seed 42, one stream across the shot counts). Per draw and shot count: sample
    the support set, drop test rows whose label is not in it, LabelEncoder classes (sorted),
    StandardScaler + KNeighborsClassifier(n_neighbors), predict_proba, top-k accuracy with
    scikit-learn's tie rule, median rank as the script. Returns {str(shots): {"top1": mean
    over draws, "top1_std": population std, ..., "MedianR", "MedianR_std", "protocol": draw 0's
    numbers, "n_neighbors", "train_examples", "test_examples", "classes", "draws", and "notes"
    (`recognition_notes`) when the numbers are trivial}}.
    """
    neighbors = extras.require("sklearn.neighbors", "eval", "few-shot k-NN")
    sk_pipeline = extras.require("sklearn.pipeline", "eval", "few-shot k-NN")
    preprocessing = extras.require("sklearn.preprocessing", "eval", "few-shot k-NN")

    train_emb, test_emb = np.asarray(train_emb), np.asarray(test_emb)
    train_labels, test_labels = list(train_labels), list(test_labels)
    per_shot: dict[int, list[dict]] = {s: [] for s in shots}
    for r in range(max(int(draws), 1)):
        rng = random.Random(seed + r)
        for s in shots:
            support = few_shot_sample(train_labels, test_labels, s, rng)
            sup_labels = [train_labels[i] for i in support]
            known = set(sup_labels)
            test_rows = [i for i, t in enumerate(test_labels) if t in known]
            if not support or not test_rows:
                per_shot[s].append({"skipped": "no test example has a class seen in training"})
                continue
            classes = sorted(known)  # LabelEncoder order
            index = {c: i for i, c in enumerate(classes)}
            y_train = np.array([index[t] for t in sup_labels])
            y_test = np.array([index[test_labels[i]] for i in test_rows])
            k = knn_neighbors(n_neighbors, len(support), len(set(y_test.tolist())))
            clf = sk_pipeline.Pipeline(
                [
                    ("scaler", preprocessing.StandardScaler()),
                    ("knn", neighbors.KNeighborsClassifier(k)),
                ]
            )
            clf.fit(train_emb[support], y_train)
            y_score = clf.predict_proba(test_emb[test_rows])
            res = _score_classifier(y_score, y_test, ks)
            res.update(
                n_neighbors=k,
                train_examples=len(support),
                test_examples=len(test_rows),
                classes=len(classes),
            )
            per_shot[s].append(res)
    return {str(s): _summarise_draws(results, ks) for s, results in per_shot.items()}


def _summarise_draws(results: list[dict], ks: Sequence[int]) -> dict:
    done = [r for r in results if "skipped" not in r]
    if not done:
        return {"skipped": results[0]["skipped"], "draws": len(results)}
    out: dict = {}
    for key in [f"top{k}" for k in ks] + ["MedianR"]:
        values = np.array([r[key] for r in done])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    first = results[0]
    out["protocol"] = {k: v for k, v in first.items()}
    for key in ("n_neighbors", "train_examples", "test_examples", "classes"):
        out[key] = first.get(key)
    out["draws"] = len(done)
    notes = recognition_notes(done[0]["test_examples"], done[0]["classes"], ks)
    if notes:
        out["notes"] = notes
    return out


def linear_probe(
    train_emb: np.ndarray,
    train_labels: Sequence[str],
    test_emb: np.ndarray,
    test_labels: Sequence[str],
    *,
    seed: int = 42,
    max_iter: int = 100,
    filter_train: bool = False,
    ks: Sequence[int] = KS,
) -> dict:
    """Supervised linear probe of the original (`test_recognition_supervised.py`, ref. 7.5).

    Test rows with a label unseen in training are dropped (and, with `filter_train`, training
    rows with a label absent from the test set, as the script does for sem_lex); then
    LogisticRegression(random_state=seed, max_iter=max_iter) (lbfgs, L2, C=1) on the raw
    embeddings; top-k accuracy (scikit-learn ties) and the script's median rank; "notes"
    (`recognition_notes`) when some number is trivial (one test example, k >= classes).
    """
    exceptions = extras.require("sklearn.exceptions", "eval", "the linear probe")
    linear_model = extras.require("sklearn.linear_model", "eval", "the linear probe")

    train_emb, test_emb = np.asarray(train_emb), np.asarray(test_emb)
    train_labels, test_labels = list(train_labels), list(test_labels)
    seen = set(train_labels)
    test_rows = [i for i, t in enumerate(test_labels) if t in seen]
    train_rows = list(range(len(train_labels)))
    if filter_train:
        wanted = {test_labels[i] for i in test_rows}
        train_rows = [i for i in train_rows if train_labels[i] in wanted]
    classes = sorted({train_labels[i] for i in train_rows})
    if len(classes) < 2 or not test_rows:
        reason = (
            "needs >= 2 training classes and a test example of one of them (got "
            f"{len(classes)} classes, {len(test_rows)} test examples)"
        )
        return {"skipped": reason}
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[train_labels[i]] for i in train_rows])
    y_test = np.array([index[test_labels[i]] for i in test_rows])
    clf = linear_model.LogisticRegression(random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", exceptions.ConvergenceWarning)
        clf.fit(train_emb[train_rows], y_train)
    y_score = clf.predict_proba(test_emb[test_rows])
    out = _score_classifier(y_score, y_test, ks)
    out.update(
        train_examples=len(train_rows),
        test_examples=len(test_rows),
        classes=len(classes),
        converged=not any(issubclass(w.category, exceptions.ConvergenceWarning) for w in caught),
    )
    notes = recognition_notes(len(test_rows), len(classes), ks)
    if notes:
        out["notes"] = notes
    return out
