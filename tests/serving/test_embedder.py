"""signclip_jax.serving.embedder: row buckets, batch-independent pose embeddings, bad features."""


import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.data import pose as pose_lib
from signclip_jax.errors import DataError
from signclip_jax.serving import embedder as embedder_lib


def test_row_buckets():
    assert embedder_lib.row_buckets(64, 8) == (8, 16, 32, 64)
    assert embedder_lib.row_buckets(20, 8) == (8, 16, 24)
    assert embedder_lib.row_buckets(1, 1) == (1,)
    assert embedder_lib.row_buckets(5, 1) == (1, 2, 4, 5)


@pytest.fixture(scope="module")
def run(tiny_workdir):
    return run_lib.load_run(tiny_workdir)


def _clips(settings, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(t, settings.spec.feature_dim)).astype(np.float32) for t in lengths]


def test_pose_embedding_is_independent_of_batch_mates(run):
    embedder = embedder_lib.Embedder(run, batch_size=16)
    clips = _clips(run.settings, [30, 95, 7, 60, 200])
    together = embedder.embed_features(clips)
    for i, clip in enumerate(clips):
        alone = embedder.embed_features([clip])
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5, err_msg=str(i))
    # Longer than max_frames: the first max_frames frames, as the original's truncation.
    np.testing.assert_allclose(
        together[4], embedder.embed_features([clips[4][: run.settings.spec.max_frames]])[0],
        atol=1e-6,
    )  # fmt: skip


def test_embedder_equals_the_model_padded_to_max_frames(run):
    embedder = embedder_lib.Embedder(run, batch_size=8)
    clips = _clips(run.settings, [12, 40], seed=1)
    pose = np.zeros((2, run.settings.spec.max_frames, run.settings.spec.feature_dim), np.float32)
    mask = np.zeros(pose.shape[:2], bool)
    for i, c in enumerate(clips):
        pose[i], mask[i] = pose_lib.pad_frames(c, pose.shape[1])
    direct = np.asarray(run.model.embed_pose(pose, mask))
    np.testing.assert_allclose(embedder.embed_features(clips), direct, atol=1e-5)

    texts = ["<en> <ase> house", "<en> <ase> a much longer prompt about a tree"] * 5
    from signclip_jax.data import text as text_lib

    ids, tmask = text_lib.encode_texts(run.tokenizer, texts, run.settings.text_max_len)
    direct = np.asarray(run.model.embed_text(ids, tmask))
    np.testing.assert_allclose(embedder.embed_texts(texts), direct, atol=1e-5)
    assert embedder.embed_texts([]).shape == (0, 32)


def test_bad_features_are_data_errors(run):
    embedder = embedder_lib.Embedder(run, batch_size=8)
    with pytest.raises(DataError, match="pose 1"):
        embedder.embed_features([np.zeros((3, 609), np.float32), np.zeros((0, 609), np.float32)])
    with pytest.raises(DataError, match="expected"):
        embedder.embed_features([np.zeros((3, 5), np.float32)])
    with pytest.raises(DataError):
        embedder.pose_features(b"not a pose file", name="upload.pose")
