"""evaluation/retrieval.py: test-time flip, retrieval metrics per language, the validation loss."""

import numpy as np
import pytest

from signclip_jax.config import base_config
from signclip_jax.data import augment
from signclip_jax.data import text as text_lib
from signclip_jax.data.pose import RIGHT_HAND, PoseArray, PoseSpec, layout
from signclip_jax.evaluation import metrics
from signclip_jax.evaluation import retrieval as ev
from signclip_jax.train import losses


def _pose_array(rng, spec, *, right_hand: bool, frames=12):
    lay = layout(spec.components)
    points = rng.normal(size=(frames, len(lay.points), 3)).astype(np.float32)
    observed = np.ones(points.shape[:2], bool)
    points[:, lay.legs] = 0
    if not right_hand:
        slots = [i for i, (c, _) in enumerate(lay.points) if c == RIGHT_HAND]
        points[:, slots] = 0
        observed[:, slots] = False
    return PoseArray(points=points, observed=observed, fps=25.0)


class _ListSource:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return dict(self.records[i])


def test_mirrored_source_flips_poses_without_a_right_hand():
    spec = PoseSpec()
    rng = np.random.default_rng(0)
    left_handed = _pose_array(rng, spec, right_hand=False)
    right_handed = _pose_array(rng, spec, right_hand=True)
    assert ev.right_hand_missing(left_handed, spec)
    assert not ev.right_hand_missing(right_handed, spec)
    records = [
        {"id": "l", "text": "a", "points": left_handed.points,
         "observed": left_handed.observed, "fps": 25.0},
        {"id": "r", "text": "b", "points": right_handed.points,
         "observed": right_handed.observed, "fps": 25.0},
        {"id": "f", "text": "c", "features": np.zeros((3, spec.feature_dim), np.float32)},
    ]  # fmt: skip
    src = ev.MirroredSource(_ListSource(records), spec, "right")
    out = [src[i] for i in range(3)]
    assert src.flipped == {0}
    want = augment.flip_horizontal(left_handed, spec)
    np.testing.assert_array_equal(out[0]["points"], want.points)
    np.testing.assert_array_equal(out[1]["points"], right_handed.points)
    assert out[0]["text"] == "a" and out[0]["id"] == "l"
    assert "cannot be mirrored" in out[2]["error"]  # counted as a skipped example downstream
    always = ev.MirroredSource(_ListSource(records[:2]), spec, "always")
    np.testing.assert_array_equal(
        always[1]["points"], augment.flip_horizontal(right_handed, spec).points
    )
    assert always.flipped == {1}


def test_evaluate_retrieval_per_language_equals_subsets():
    rng = np.random.default_rng(0)
    n = 30
    langs = ["ase" if i % 3 else "bfi" for i in range(n)]
    texts = [f"<en> <{lang}> w{rng.integers(0, 5)}" for lang in langs]
    pose, text = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    out = ev.evaluate_retrieval(pose, text, texts, languages=langs, block_elems=7)
    assert {k: out[k] for k in metrics.retrieval_metrics(pose, text, texts)} == (
        metrics.retrieval_metrics(pose, text, texts)
    )
    for lang in ("ase", "bfi"):
        rows = [i for i in range(n) if langs[i] == lang]
        sub = metrics.retrieval_metrics(pose[rows], text[rows], [texts[i] for i in rows])
        assert {k: out[f"lang/{lang}/{k}"] for k in sub} == sub
        assert out[f"lang/{lang}/examples"] == len(rows)
    assert not any(k.startswith("lang/") for k in ev.evaluate_retrieval(pose, text, texts))


def test_validation_loss_is_the_mean_over_training_sized_chunks():
    rng = np.random.default_rng(3)
    pose, text = rng.normal(size=(11, 8)), rng.normal(size=(11, 8))
    params = losses.init_loss_params("signclip", {})
    want = np.mean(
        [float(losses.reference_loss("signclip", pose[s : s + 4], text[s : s + 4], params))
         for s in (0, 4)]  # the last chunk has 3 rows: it counts; a single row would not
        + [float(losses.reference_loss("signclip", pose[8:], text[8:], params))]
    )  # fmt: skip
    assert ev.validation_loss(pose, text, "signclip", params, 4) == pytest.approx(want)
    assert np.isnan(ev.validation_loss(pose[:1], text[:1], "signclip", params, 4))


class _CountingSource(_ListSource):
    def __init__(self, records):
        super().__init__(records)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_embed_split_keeps_source_order_skips_unusable_and_reads_metadata_lazily():
    config = base_config()
    config.data.max_frames = 16
    config.data.max_bad_fraction = 0.5
    config.data.workers = 0
    config.data.prompt_template = "isolated"
    spec_dim = 609  # reduced_face with z
    records = [
        {"id": f"r{i}", "text": f"w{i % 3}", "sign_language": "bfi" if i == 4 else None,
         "features": np.full((3 + i, spec_dim), float(i), np.float32)}
        for i in range(7)
    ]  # fmt: skip
    records[2] = {"id": "r2", "text": "w2", "error": "unreadable"}
    source = _CountingSource(records)
    tokenizer = text_lib.load_tokenizer(text_lib.resolve_text_model("minilm"))
    seen_batches = []

    def embed_batch(batch):  # pose embedding = (value of the features, frames)
        seen_batches.append(len(batch["valid"]))
        rows = np.nonzero(batch["valid"])[0]
        lengths = batch["pose_mask"][rows].sum(axis=1)
        pose = np.stack([batch["pose"][rows, 0, 0], lengths], axis=1).astype(np.float32)
        return {"pose": pose, "index": batch["index"][rows], "prompt": batch["prompt"][rows]}

    data = ev.embed_split(
        source, config.data, tokenizer=tokenizer, embed_batch=embed_batch, batch_size=4,
        split="val",
    )  # fmt: skip
    assert seen_batches == [4, 4]
    assert list(data.source_index) == [0, 1, 3, 4, 5, 6] and len(data) == 6
    np.testing.assert_array_equal(data.pose[:, 0], [0, 1, 3, 4, 5, 6])
    np.testing.assert_array_equal(data.pose[:, 1], [3, 4, 6, 7, 8, 9])
    assert data.text is None and data.skipped == 1 and data.examined == 7
    assert data.prompts[0] == "<en> <ase> w0" and data.prompts[3] == "<en> <bfi> w1"
    reads = source.reads
    assert data.sign_languages == ["ase", "ase", "ase", "bfi", "ase", "ase"]
    assert source.reads == reads + 6  # metadata read back once, on first use
    assert data.texts == ["w0", "w1", "w0", "w1", "w2", "w0"] and source.reads == reads + 6
    assert data.ids[2] == "r3" and list(data.labels) == [-1] * 6


def test_evaluate_retrieval_notes_degenerate_splits():
    rng = np.random.default_rng(5)
    pose, text = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    texts = [f"w{i}" for i in range(30)]
    assert "notes" not in ev.evaluate_retrieval(pose, text, texts)  # 30 distinct: nothing trivial
    one = ev.evaluate_retrieval(pose[:1], text[:1], texts[:1])
    assert one["notes"] == metrics.retrieval_notes(1, 1, standard=True)
    assert one["v2t/R@1"] == one["t2v/R@1"] == 1.0  # what the note warns about
    small = ev.evaluate_retrieval(pose[:5], text[:5], texts[:5], standard=False)
    assert small["notes"] == [
        "T2V R@5, R@10 over 5 candidate poses: k is at least the number of candidates, so they "
        "are trivially 1",
        "V2T R@5, R@10 over 5 candidate texts: k is at least the number of candidates, so they "
        "are trivially 1",
    ]
    assert small["t2v/R@5"] == small["v2t/R@10"] == 1.0
    same = ev.evaluate_retrieval(pose[:20], text[:20], ["w"] * 20)
    assert same["notes"][0].startswith("only 1 class (all 20 examples share one text)")
    assert same["v2t/R@1"] == 1.0
    # Per language: a language with one example says so, under its code.
    langs = ["ase"] * 29 + ["bfi"]
    out = ev.evaluate_retrieval(pose, text, texts, languages=langs)
    assert out["notes"] == [f"bfi: {n}" for n in metrics.retrieval_notes(1, 1, standard=True)]
