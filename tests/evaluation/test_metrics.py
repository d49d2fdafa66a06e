import random
import statistics
import warnings
from math import sqrt

import numpy as np
import pytest

from signclip_jax.evaluation import metrics

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


# ---------------------------------------------------------------------------------------------
# Block-wise metrics, per-example ("standard") ranks, recognition protocols.

# Hand-computed case: duplicate text (b), singletons (a, c), ties inside a row (c) and between
# classes (video 3: b and c both 0.4). Row i is the text of example i.
HAND_TEXTS = ["a", "b", "b", "c"]
HAND_ROWS = {"a": [0.5, 0.5, 0.1, 0.2], "b": [0.3, 0.9, 0.3, 0.4], "c": [0.4, 0.4, 0.4, 0.4]}
HAND_SCORES = np.array([HAND_ROWS[t] for t in HAND_TEXTS])
# T2V (stable descending sorts): a -> [0,1,3,2], gold {0}: rank 0; b -> [1,3,0,2], gold {1,2}:
# ranks 0 and 3; c -> [0,1,2,3], gold {3}: rank 3.
HAND_T2V = {"R@1": 2 / 4, "R@5": 4 / 4, "P@1": 2 / 3, "P@5": 4 / 15, "MedianR": 1.0, "MeanR": 2.0}
# V2T over unique texts [a, b, c]: v0 a wins; v1 b wins; v2 c (.4) beats b (.3): rank 1;
# v3 b and c tie at .4, b comes first: rank 1.
HAND_V2T = {"R@1": 0.5, "R@5": 1.0, "MedianR": 1.5, "MeanR": 1.5}
# Per-example: T2V ranks [0, 0, 3, 3]; V2T against all 4 rows [0, 0, 2, 2] (v2: row 3 higher,
# row 1 ties before row 2; v3: rows 1 and 2 tie before row 3).
HAND_STD_T2V = {"R@1": 0.5, "R@5": 1.0, "MedianR": 2.5, "MeanR": 2.5}
HAND_STD_V2T = {"R@1": 0.5, "R@5": 1.0, "MedianR": 2.0, "MeanR": 2.0}


def _subset(d, keys):
    return {k: d[k] for k in keys}


@pytest.mark.parametrize("block_elems", [1, 4, 5, 1 << 20])
def test_hand_computed_matrix_dense_and_blocked(block_elems):
    for fn, blocked, want in (
        (metrics.text_to_video, metrics.text_to_video_blocked, HAND_T2V),
        (metrics.video_to_text, metrics.video_to_text_blocked, HAND_V2T),
    ):
        dense = fn(HAND_SCORES, HAND_TEXTS)
        assert _subset(dense, want) == pytest.approx(want)
        assert blocked(HAND_SCORES, HAND_TEXTS, block_elems=block_elems) == dense


def test_hand_computed_standard_metrics_from_embeddings():
    # text rows @ identity = the score matrix itself (exact in float64).
    text_emb = HAND_SCORES.astype(np.float32)
    pose_emb = np.eye(4, dtype=np.float32)
    out = metrics.retrieval_metrics_blocked(pose_emb, text_emb, HAND_TEXTS, block_elems=3)
    assert _subset({k[4:]: v for k, v in out.items() if k.startswith("t2v/")}, HAND_T2V) == (
        pytest.approx(HAND_T2V)
    )
    got = {k[8:]: v for k, v in out.items() if k.startswith("std/t2v/")}
    assert _subset(got, HAND_STD_T2V) == pytest.approx(HAND_STD_T2V)
    got = {k[8:]: v for k, v in out.items() if k.startswith("std/v2t/")}
    assert _subset(got, HAND_STD_V2T) == pytest.approx(HAND_STD_V2T)


def test_worked_example_blocked():
    assert metrics.text_to_video_blocked(SCORES, TEXTS, block_elems=2) == metrics.text_to_video(
        SCORES, TEXTS
    )
    assert metrics.video_to_text_blocked(SCORES, TEXTS, block_elems=2) == metrics.video_to_text(
        SCORES, TEXTS
    )


def _random_case(rng, tied: bool):
    n = int(rng.integers(1, 30))
    texts = [f"t{c}" for c in rng.integers(0, max(1, n // 2 + 1), size=n)]
    if tied:  # few distinct values: many exact ties, rows of duplicate texts identical
        rows = {t: rng.integers(0, 4, size=n).astype(float) for t in set(texts)}
        scores = np.stack([rows[t] for t in texts])
    else:  # arbitrary matrix: rows of duplicate texts differ (only the first counts)
        scores = rng.normal(size=(n, n))
        scores[rng.random((n, n)) < 0.2] = 0.0
    return scores, texts


@pytest.mark.parametrize("seed", range(40))
def test_blocked_equals_dense_exactly_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    scores, texts = _random_case(rng, tied=seed % 2 == 0)
    for block_elems in (1, 3, int(rng.integers(2, 60)), 1 << 20):
        assert metrics.text_to_video_blocked(
            scores, texts, block_elems=block_elems
        ) == metrics.text_to_video(scores, texts)
        assert metrics.video_to_text_blocked(
            scores, texts, block_elems=block_elems
        ) == metrics.video_to_text(scores, texts)


def _stable_rank(row, gold):
    order = np.argsort(-np.asarray(row), kind="stable")
    return int(np.nonzero(order == gold)[0][0])


@pytest.mark.parametrize("seed", range(25))
def test_blocked_embeddings_equal_dense_and_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n, h = int(rng.integers(1, 25)), 5
    texts = [f"t{c}" for c in rng.integers(0, max(1, n // 2), size=n)]
    # Small integer embeddings: exact arithmetic in any order, so ties are real ties.
    table = {t: rng.integers(-2, 3, size=h).astype(np.float32) for t in set(texts)}
    text_emb = np.stack([table[t] for t in texts])
    pose_emb = rng.integers(-2, 3, size=(n, h)).astype(np.float32)
    if n > 2:
        pose_emb[-1] = pose_emb[0]  # a duplicated video
    out = metrics.retrieval_metrics_blocked(
        pose_emb, text_emb, texts, block_elems=int(rng.integers(1, 40))
    )
    dense = metrics.retrieval_metrics(pose_emb, text_emb, texts)
    assert {k: out[k] for k in dense} == dense
    scores = text_emb.astype(np.float64) @ pose_emb.astype(np.float64).T
    t2v = np.array([_stable_rank(scores[i], i) for i in range(n)])
    v2t = np.array([_stable_rank(scores[:, j], j) for j in range(n)])
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        want = metrics.recall_from_ranks(ranks)
        assert {k: out[f"std/{name}/{k}"] for k in want} == want


def test_t2v_r_at_k_equals_standard_r_at_k():
    # Both count, over all N examples, the videos ranked in the top k of their own text's row.
    rng = np.random.default_rng(7)
    texts = [f"t{c}" for c in rng.integers(0, 6, size=40)]
    out = metrics.retrieval_metrics_blocked(
        rng.normal(size=(40, 8)), np.stack([np.full(8, hash(t) % 7) for t in texts]), texts
    )
    for k in (1, 5, 10):
        assert out[f"t2v/R@{k}"] == out[f"std/t2v/R@{k}"]


def test_blocked_reads_only_blocks_of_rows():
    # The matrix is only indexed a few rows (T2V) / columns (V2T) at a time.
    rng = np.random.default_rng(3)
    scores, texts = _random_case(rng, tied=False)
    n = len(texts)

    class Spy:
        shape = scores.shape
        biggest = 0

        def __getitem__(self, idx):
            block = scores[idx]
            Spy.biggest = max(Spy.biggest, block.size)
            return block

    metrics.text_to_video_blocked(Spy(), texts, block_elems=2 * n)
    assert 0 < Spy.biggest <= 2 * n


def test_nan_scores_rank_last():
    scores = np.array([[np.nan, 1.0, 0.5], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    t2v = metrics.text_to_video_blocked(scores, ["x", "y", "z"])
    # Row x: video 0 (its own) is NaN -> last (rank 2); y -> video 1 ranks 1; z -> all tie: 2.
    assert t2v["MedianR"] == 3.0 and t2v["R@1"] == 0.0


@pytest.mark.filterwarnings("ignore:.*meaningless")
def test_topk_hits_tie_rule_equals_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, c = 30, int(rng.integers(3, 8))
        y_score = rng.integers(0, 3, size=(n, c)) / 3  # many ties
        y_true = rng.integers(0, c, size=n)
        for k in (1, 2, 5):
            want = top_k_accuracy_score(y_true, y_score, k=k, labels=list(range(c)))
            assert np.mean(metrics.topk_hits_sklearn(y_score, y_true, k)) == pytest.approx(want)


def test_few_shot_sample_groups_and_limits():
    train = ["a", "b", "a", "x", "c", "a", "b"]
    test = ["a", "b", "c", "d"]
    support = metrics.few_shot_sample(train, test, 1, random.Random(0))
    assert sorted(train[i] for i in support) == ["a", "b", "c"]  # x not a test class
    assert support[-1] == 4  # the one-example class c is kept whole, in group order
    assert metrics.few_shot_sample(train, test, 5, random.Random(0)) == [0, 2, 5, 1, 6, 4]


def test_knn_neighbors_rules():
    assert metrics.knn_neighbors("sqrt", 20, 3) == 4
    assert metrics.knn_neighbors("sqrt", 1, 1) == 1
    assert metrics.knn_neighbors("classes", 50, 7) == 7
    assert metrics.knn_neighbors("classes", 5, 7) == 5  # at most the support size
    assert metrics.knn_neighbors(3, 10, 2) == 3


def _script_knn(train_emb, train_text, test_emb, test_text, shots, seed=42):
    """An independent walk through reference 7.4: the global `random` seeded once, then the
    shot counts in order; sklearn's own LabelEncoder / top_k_accuracy_score."""

    from sklearn.metrics import top_k_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import LabelEncoder, StandardScaler

    random.seed(seed)
    results = {}
    for shot in shots:
        groups = {}
        for i, t in enumerate(train_text):
            if t in test_text:
                groups.setdefault(t, []).append(i)
        for t in list(groups):
            if len(groups[t]) > shot:
                groups[t] = random.sample(groups[t], shot)
        idx = [i for ids in groups.values() for i in ids]
        tr_text = [train_text[i] for i in idx]
        keep = [i for i, t in enumerate(test_text) if t in tr_text]
        enc = LabelEncoder().fit(tr_text)
        y_train, y_test = enc.transform(tr_text), enc.transform([test_text[i] for i in keep])
        clf = Pipeline(
            [("s", StandardScaler()), ("k", KNeighborsClassifier(round(sqrt(len(idx)))))]
        )
        clf.fit(train_emb[idx], y_train)
        proba = clf.predict_proba(test_emb[keep])
        labels = sorted(set(y_train))
        res = {
            f"top{k}": top_k_accuracy_score(y_test, proba, k=k, labels=labels) for k in (1, 5, 10)
        }
        order = np.argsort(-proba)
        res["MedianR"] = statistics.median(list(o).index(t) for o, t in zip(order, y_test)) + 1
        results[str(shot)] = res
    return results


def _classes_data(seed, n_classes=12, n_train=150, n_test=60, dim=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 2
    names = [f"class {i}" for i in range(n_classes)]
    ytr = rng.integers(0, n_classes, size=n_train)
    yte = rng.integers(0, n_classes - 1, size=n_test)  # the last class never tested
    xtr = centres[ytr] + rng.normal(size=(n_train, dim))
    xte = centres[yte] + rng.normal(size=(n_test, dim))
    return xtr, [names[i] for i in ytr], xte, [names[i] for i in yte]


def test_few_shot_knn_follows_the_original_protocol():
    xtr, ttr, xte, tte = _classes_data(0)
    shots = (1, 5, 10, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: k >= n_classes makes top-k meaningless
        want = _script_knn(xtr, ttr, xte, tte, shots)
    got = metrics.few_shot_knn(xtr, ttr, xte, tte, shots=shots, draws=3)
    for s in want:
        assert {k: got[s]["protocol"][k] for k in want[s]} == pytest.approx(want[s])
        assert got[s]["draws"] == 3
    # Draws 1 and 2 are the same protocol with seeds 43 and 44; the mean and std cover all 3.
    others = [_script_knn(xtr, ttr, xte, tte, shots, seed=42 + r) for r in (1, 2)]
    for s in want:
        values = [want[s]["top1"]] + [o[s]["top1"] for o in others]
        assert got[s]["top1"] == pytest.approx(np.mean(values))
        assert got[s]["top1_std"] == pytest.approx(np.std(values))
    assert got["1"]["train_examples"] == 11  # one per test class
    assert got["1"]["n_neighbors"] == 3  # round(sqrt(11))


def test_linear_probe_equals_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import top_k_accuracy_score

    xtr, ttr, xte, tte = _classes_data(1)
    tte = [*tte, "unseen"]
    xte = np.concatenate([xte, xte[:1]])
    got = metrics.linear_probe(xtr, ttr, xte, tte)
    classes = sorted(set(ttr))
    y = np.array([classes.index(t) for t in ttr])
    keep = [i for i, t in enumerate(tte) if t in classes]
    yt = np.array([classes.index(tte[i]) for i in keep])
    proba = LogisticRegression(random_state=42, max_iter=100).fit(xtr, y).predict_proba(xte[keep])
    for k in (1, 5, 10):
        want = top_k_accuracy_score(yt, proba, k=k, labels=list(range(len(classes))))
        assert got[f"top{k}"] == pytest.approx(want)
    assert got["test_examples"] == len(keep) and got["classes"] == 12
    filtered = metrics.linear_probe(xtr, ttr, xte, tte, filter_train=True)
    assert filtered["classes"] == 11  # the never-tested class left out of training
    assert "skipped" in metrics.linear_probe(xtr[:3], ["a"] * 3, xte, tte)


def test_notes_name_trivially_perfect_retrieval():
    assert metrics.retrieval_notes(1, 1)[0].startswith(
        "only 1 example: retrieval scores are trivially perfect"
    )
    assert metrics.retrieval_notes(50, 20) == []  # nothing trivial
    notes = metrics.retrieval_notes(5, 3, standard=True)
    assert notes == [
        "T2V and std R@5, R@10 over 5 candidate poses: k is at least the number of "
        "candidates, so they are trivially 1",
        "V2T R@5, R@10 over 3 candidate texts: k exceeds the number of candidates, so they "
        "are trivially 1",
    ]
    one_class = metrics.retrieval_notes(8, 1)
    assert one_class[0].startswith("only 1 class (all 8 examples share one text): V2T")
    assert one_class[1:] == [
        "T2V R@10 over 8 candidate poses: k exceeds the number of candidates, so it is trivially 1"
    ]
    # The notes describe the numbers: one example really scores 1 everywhere.
    pose, text = np.eye(3)[:1], np.eye(3)[1:2]  # even an orthogonal (useless) pair
    single = metrics.retrieval_metrics(pose, text, ["a"])
    assert {v for k, v in single.items() if "/P@" not in k} == {1.0}
    assert [single[f"t2v/P@{k}"] for k in (1, 5, 10)] == [1.0, 1 / 5, 1 / 10]


def test_notes_name_trivial_recognition_numbers():
    assert metrics.recognition_notes(40, 20) == []
    assert metrics.recognition_notes(1, 20) == [
        "only 1 test example: each score is 0 or 1, not an average"
    ]
    assert metrics.recognition_notes(9, 1) == [
        "only 1 class: every example is classified correctly, trivially"
    ]
    assert metrics.recognition_notes(9, 7) == [
        "top10 over 7 candidate classes: k exceeds the number of candidates, so it is trivially 1"
    ]


def test_few_shot_and_probe_carry_notes_when_trivial():
    xtr, ttr, xte, tte = _classes_data(2, n_classes=4, n_train=40, n_test=1)
    probe = metrics.linear_probe(xtr, ttr, xte, tte)
    assert probe["notes"] == metrics.recognition_notes(1, 4)
    assert any("only 1 test example" in n for n in probe["notes"])
    fs = metrics.few_shot_knn(xtr, ttr, xte, tte, shots=(1,), draws=2)["1"]
    assert fs["classes"] == 1 and fs["notes"][-1].startswith("only 1 class")
    big = _classes_data(3, n_classes=12, n_train=150, n_test=60)
    assert "notes" not in metrics.linear_probe(*big)  # 11 classes tested, k <= 10: nothing trivial
