"""Packed layout (issue 16, `data.packing`): several clips per row of the video tower, block-
diagonal attention by segment, pooling per segment; captions cut to the batch's longest.
The embeddings equal the unpacked ones (fp32, <= 1e-5), on generated clips (tiny random
model) and on real recordings with MiniLM's weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signclip_jax.data import clip_packing
from signclip_jax.data.pose import load_features, pad_frames
from signclip_jax.model import bert as bert_lib
from tests.model.test_prefix_layout import minilm_model, mixed_batch, prompts
from tests.model.test_signclip import TINY_BERT, tiny_model

MAX_DIFF = 1e-5  # fp32, pooled embeddings


@nnx.jit
def forward(model, batch):
    return model(batch)


def compare(model, batch, **pack):
    """(max |pose diff|, max |text diff|) of the packed batch against the padded one."""
    packed = clip_packing.pack_batch(batch, max_frames=model.config.max_frames, **pack)
    with jax.default_matmul_precision("float32"):
        pose, text = forward(model, batch)
        ppose, ptext = forward(model, packed)
    assert ppose.shape == pose.shape and ptext.shape == text.shape
    assert np.isfinite(ppose).all() and np.isfinite(ptext).all()
    return float(jnp.abs(ppose - pose).max()), float(jnp.abs(ptext - text).max()), packed


def as_batch(pose, pose_mask, ids, text_mask):
    return {"pose": pose, "pose_mask": pose_mask, "text_ids": ids, "text_mask": text_mask}


@pytest.mark.parametrize("projection,row_len", [("none", 34), ("linear_l2", 70)])
def test_generated_packed_equals_unpacked(projection, row_len):
    """Full-length, one-frame and zero-frame clips; one and several clips per row."""
    model = tiny_model(seed=7, projection=projection)  # max_frames 32
    rng = np.random.default_rng(row_len)
    lengths = [32, 9, 1, 0, 31, 5, 20, 7, 14, 3]
    text_lengths = [9, 3, 2, 8, 1, 5, 6, 7, 9, 4]
    batch = as_batch(*mixed_batch(rng, 32, lengths, 15, text_lengths, 120))
    dp, dt, packed = compare(model, batch, row_len=row_len, text_multiple=4)
    assert (packed["packed_segments"].max(axis=1) > 1).any()  # rows really hold several clips
    assert packed["text_ids"].shape[1] == 12  # 15 cut to the longest caption, 9, rounded up
    assert dp <= MAX_DIFF and dt <= MAX_DIFF, (dp, dt)


# Four clips in 2 rows of 40 tokens (6 + 32, 13 + 8 tokens): one compiled forward serves the
# tests below (same shapes, same graph).
SMALL = dict(lengths=[4, 30, 11, 6], text_lengths=[3, 4, 5, 6], row_len=40, rows=2)


def small_batch(seed):
    rng = np.random.default_rng(seed)
    return as_batch(*mixed_batch(rng, 32, SMALL["lengths"], 8, SMALL["text_lengths"], 120))


def small_pack(batch):
    return clip_packing.pack_batch(batch, row_len=40, max_frames=32, rows=2)


def test_packed_pooling_follows_the_clip_order():
    """Swapping two clips in the batch swaps their embeddings, packed as unpacked."""
    model = tiny_model(seed=1)
    batch = small_batch(2)
    swap = {k: v[[1, 0, 2, 3]] for k, v in batch.items()}
    a = forward(model, small_pack(batch))[0]
    b = forward(model, small_pack(swap))[0]
    np.testing.assert_allclose(b, a[jnp.array([1, 0, 2, 3])], atol=MAX_DIFF)
    assert float(jnp.abs(a[0] - a[1]).max()) > 1e-3


def test_non_finite_values_outside_frames_do_not_leak():
    model = tiny_model(seed=3)
    packed = small_pack(small_batch(3))
    clean = forward(model, packed)[0]
    frame_slot = (
        (packed["packed_segments"] > 0)
        & (packed["packed_positions"] > 0)
        & (packed["packed_positions"] <= 32)
    )
    dirty = dict(packed)
    dirty["packed_pose"] = np.where(frame_slot[..., None], packed["packed_pose"], np.nan)
    np.testing.assert_array_equal(forward(model, dirty)[0], clean)


@nnx.jit
def _bert_segments(model, ids, segments, positions):
    packed = model(ids, segment_ids=segments, position_ids=positions)
    alone = [model(ids[:, a:b], lengths=jnp.array([b - a])) for a, b in ((0, 5), (5, 8), (8, 10))]
    return packed, alone


def test_segments_confine_attention_in_bert():
    """BertModel with segment_ids: each segment's hidden states equal the segment run alone."""
    config = TINY_BERT.replace(num_hidden_layers=1)
    model = bert_lib.BertModel(config, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 120, size=(1, 12)).astype(np.int32)
    segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 0]], np.int32)
    with jax.default_matmul_precision("float32"):
        packed, alone = _bert_segments(model, jnp.asarray(ids), segments, positions)
    for (start, stop), one in zip(((0, 5), (5, 8), (8, 10)), alone):
        np.testing.assert_allclose(packed[:, start:stop], one, atol=MAX_DIFF)
    with pytest.raises(ValueError, match="exactly one"):
        model(jnp.asarray(ids), lengths=jnp.array([3]), segment_ids=segments)


def test_packed_training_forward_with_dropout_is_finite_and_differs_from_eval():
    model = tiny_model(seed=5)  # BERT dropout 0.1: the explicit attention path
    packed = small_pack(small_batch(5))
    evaluated = forward(model, packed)[0]
    model.train()
    trained = forward(model, packed)[0]
    assert np.isfinite(trained).all() and float(jnp.abs(trained - evaluated).max()) > 1e-4


# ------------------------------------------------------------------------ MiniLM weights
@pytest.fixture(scope="module")
def minilm():
    return minilm_model()


@pytest.mark.shared_data
def test_real_recordings_packed_equal_unpacked(minilm, shared_pose):
    """Three real clips (73, 93 and 76 frames) share one row of 258 tokens."""
    model, tok = minilm
    names = ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose"]
    padded = [pad_frames(load_features(shared_pose(n)), 256) for n in names]
    pose = np.stack([p for p, _ in padded])
    pose_mask = np.stack([m for _, m in padded])
    ids, text_mask = prompts(tok, 3)
    dp, dt, packed = compare(model, as_batch(pose, pose_mask, ids, text_mask), row_len=258)
    assert packed["packed_pose"].shape[0] == 1  # 75 + 95 + 78 = 248 tokens: one row
    assert packed["text_ids"].shape[1] == 16  # Spreadthesign prompts: ~11 of 63 tokens
    print(f"packed vs unpacked (real recordings, MiniLM): pose {dp:.1e}, text {dt:.1e}")
    assert dp <= MAX_DIFF and dt <= MAX_DIFF, (dp, dt)


# ------------------------------------------------------------------------ splash (TPU)
def test_splash_kernel_numerics_in_interpret_mode(monkeypatch):
    """The TPU path (Pallas splash attention with segment ids), run by Pallas' interpreter on
    CPU: the packed embeddings still equal the unpacked ones."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    model = tiny_model(seed=8, video_layers=1)
    rng = np.random.default_rng(8)
    batch = as_batch(*mixed_batch(rng, 32, [20, 9, 1], 8, [3, 4, 5], 120))
    with jax.default_matmul_precision("float32"):
        unpacked = forward(model, batch)[0]
    monkeypatch.setattr(bert_lib, "_segment_kernel", lambda implementation: "splash")
    packed = clip_packing.pack_batch(batch, row_len=40, max_frames=32)
    assert packed["packed_pose"].shape[0] == 1  # 22 + 11 + 3 tokens: one row
    with jax.default_matmul_precision("float32"):
        pose = nnx.jit(lambda m, b: m(b))(model, packed)[0]  # a fresh trace: splash
    assert float(jnp.abs(pose - unpacked).max()) <= MAX_DIFF
