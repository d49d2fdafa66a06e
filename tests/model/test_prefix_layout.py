"""Valid-prefix layout (issue 16): [SEP] right after the last frame, attention on sequence
lengths. The embeddings equal those of the original layout ([SEP] after the padding, a dense
key-padding mask), kept here as a reference built from the same modules: BertModel's
`attention_mask` path, itself checked against transformers in test_bert.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from signclip_jax.data.pose import load_features, pad_frames
from signclip_jax.data.text import encode_texts, load_tokenizer, render_prompt
from signclip_jax.model.signclip import build_model, init_from_pretrained, masked_mean
from tests.model.test_signclip import random_pose, tiny_model

MAX_DIFF = 1e-5  # fp32, pooled embeddings


# ----------------------------------------------------------------- the original layout
def original_embed_pose(model, pose, pose_mask):
    """[CLS] + L frames + [SEP] (positions 0..L, max_frames + 1), mask [1, pose_mask, 1],
    pooling weights [0, pose_mask, 1]: the code before issue 16."""
    c = model.config
    b, length, _ = pose.shape
    pose_mask = jnp.asarray(pose_mask, bool)
    pose = jnp.where(pose_mask[..., None], pose, 0)
    frames = model.video_encoder.videomlp(pose).astype(jnp.float32)
    bert = model.video_encoder.bert
    special = bert.embeddings.word_embeddings(jnp.array([c.cls_token_id, c.sep_token_id]))
    special = jnp.broadcast_to(special[None], (b, 2, special.shape[-1]))
    embeds = jnp.concatenate([special[:, :1], frames, special[:, 1:]], axis=1)
    positions = jnp.concatenate(
        [jnp.arange(length + 1, dtype=jnp.int32), jnp.array([c.max_frames + 1], jnp.int32)]
    )[None]
    ones = jnp.ones((b, 1), bool)
    attn_mask = jnp.concatenate([ones, pose_mask, ones], axis=1)
    hidden = bert(None, attn_mask, inputs_embeds=embeds, position_ids=positions)
    weights = jnp.concatenate([jnp.zeros((b, 1), bool), pose_mask, ones], axis=1)
    return model._project(masked_mean(hidden, weights), model.video_projection)


def original_embed_text(model, ids, mask):
    mask = jnp.asarray(mask, bool)
    hidden = model.text_encoder(jnp.asarray(ids), mask)
    return model._project(masked_mean(hidden, mask.at[:, 0].set(False)), model.text_projection)


@nnx.jit
def both_layouts(model, pose, pose_mask, ids, text_mask):
    return (
        model.embed_pose(pose, pose_mask),
        original_embed_pose(model, pose, pose_mask),
        model.embed_text(ids, text_mask),
        original_embed_text(model, ids, text_mask),
    )


def assert_same_embeddings(model, pose, pose_mask, ids, text_mask):
    with jax.default_matmul_precision("float32"):
        new_p, old_p, new_t, old_t = both_layouts(model, pose, pose_mask, ids, text_mask)
    dp, dt = float(np.abs(new_p - old_p).max()), float(np.abs(new_t - old_t).max())
    assert np.isfinite(new_p).all() and np.isfinite(new_t).all()
    assert dp <= MAX_DIFF and dt <= MAX_DIFF, (dp, dt)
    return dp, dt


def mixed_batch(rng, frames, lengths, text_len, text_lengths, vocab):
    pose = random_pose(rng, len(lengths), frames)
    pose_mask = np.arange(frames)[None] < np.asarray(lengths)[:, None]
    ids = rng.integers(1, vocab, size=(len(text_lengths), text_len)).astype(np.int32)
    text_mask = np.arange(text_len)[None] < np.asarray(text_lengths)[:, None]
    ids[~text_mask] = 0
    return pose, pose_mask, ids, text_mask


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("projection", ["none", "linear_l2"])
@pytest.mark.parametrize("frames,text_len", [(32, 15), (13, 8)])
def test_generated_mixed_lengths_match_the_original_layout(projection, frames, text_len):
    """Full, partial, one-frame and zero-frame rows; odd and even sequence lengths."""
    model = tiny_model(seed=5, projection=projection)
    rng = np.random.default_rng(frames)
    lengths = [frames, frames // 2, 1, 0, frames - 1]
    text_lengths = [text_len, 2, 3, text_len - 1, 0]  # the last: a fully padded dummy row
    batch = mixed_batch(rng, frames, lengths, text_len, text_lengths, 120)
    assert_same_embeddings(model, *batch)


def minilm_model():
    """(model, tokenizer): MiniLM's text tower with 3 video layers, 256 frames (also
    test_packed_layout's)."""
    cfg = ml_collections.ConfigDict(dict(text_model="minilm", video_layers=3, max_frames=256))
    model = build_model(cfg, rngs=nnx.Rngs(0))
    init_from_pretrained(model, "minilm")
    return model, load_tokenizer("minilm")


@pytest.fixture(scope="module")
def minilm():
    return minilm_model()


def prompts(tok, n):
    texts = [
        render_prompt("spreadthesign", text="house", signed="ase"),
        render_prompt("spreadthesign", text="Haus", spoken="de", signed="gsg"),
        render_prompt("isolated", text="SAD", signed="bfi"),
        "a " * 70,  # fills all 63 tokens
    ]
    return encode_texts(tok, texts[:n])


def test_minilm_weights_generated_clips_match_the_original_layout(minilm):
    model, tok = minilm
    rng = np.random.default_rng(11)
    pose = random_pose(rng, 4, 96)
    pose_mask = np.arange(96)[None] < np.array([[96], [41], [7], [90]])
    ids, text_mask = prompts(tok, 4)
    dp, dt = assert_same_embeddings(model, pose, pose_mask, ids, text_mask)
    print(f"prefix vs original layout (MiniLM, generated): pose {dp:.1e}, text {dt:.1e}")


@pytest.mark.shared_data
def test_real_recordings_match_the_original_layout(minilm, shared_pose):
    model, tok = minilm
    names = ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose"]
    feats = [load_features(shared_pose(n)) for n in names]
    for frames in (256, 128):  # the recipe's padding and a bucket
        padded = [pad_frames(f, frames) for f in feats]
        pose = np.stack([p for p, _ in padded])
        pose_mask = np.stack([m for _, m in padded])
        ids, text_mask = prompts(tok, 3)
        dp, dt = assert_same_embeddings(model, pose, pose_mask, ids, text_mask)
        print(f"prefix vs original layout (real, {frames} frames): pose {dp:.1e}, text {dt:.1e}")


def test_sep_follows_the_last_frame_with_position_max_frames_plus_one(monkeypatch):
    """What the video BERT is fed: [CLS], the frames, [SEP] at index n + 1 (position
    max_frames + 1), then padding; lengths n + 2."""
    model = tiny_model(seed=2)
    c, bert = model.config, model.video_encoder.bert
    seen = {}

    def spy(ids, attention_mask=None, *, lengths=None, inputs_embeds=None, position_ids=None):
        seen.update(lengths=lengths, embeds=inputs_embeds, positions=position_ids)
        return jnp.zeros(inputs_embeds.shape, jnp.float32)

    rng = np.random.default_rng(4)
    pose = random_pose(rng, 3, 6)
    mask = np.arange(6)[None] < np.array([[6], [2], [0]])
    monkeypatch.setattr(type(bert), "__call__", lambda self, *a, **k: spy(*a, **k))
    model.embed_pose(pose, mask)
    np.testing.assert_array_equal(seen["lengths"], [8, 4, 2])
    word = np.asarray(bert.embeddings.word_embeddings.embedding[...])
    embeds, positions = np.asarray(seen["embeds"]), np.asarray(seen["positions"])
    for row, n in enumerate([6, 2, 0]):
        np.testing.assert_array_equal(embeds[row, 0], word[c.cls_token_id])
        np.testing.assert_array_equal(embeds[row, n + 1], word[c.sep_token_id])
        np.testing.assert_array_equal(positions[row, : n + 1], np.arange(n + 1))
        assert positions[row, n + 1] == c.max_frames + 1
