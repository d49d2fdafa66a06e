"""The counter-based attention-dropout mask: its statistics, determinism and use in BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signclip_jax.model import attention_dropout as ad
from signclip_jax.model import bert as bert_lib
from signclip_jax.model.bert import BertConfig, BertModel

SHAPE = (4, 4, 256, 256)  # 1,048,576 decisions


def seed(i: int) -> jax.Array:
    return ad.seed_words(jax.random.key(i))


@pytest.fixture(scope="module")
def mask():
    return np.asarray(jax.jit(ad.keep_mask, static_argnums=(1, 2))(seed(0), SHAPE, 0.1))


def test_threshold_and_scale():
    assert ad.threshold(0.1) == 6554 and ad.threshold(0.0) == 0 and ad.threshold(0.5) == 32768
    for rate in (0.1, 0.3, 0.013):
        assert abs(ad.threshold(rate) / 65536 - rate) <= 2.0**-17
        assert ad.keep_scale(rate) * (1 - ad.threshold(rate) / 65536) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rate"):
        ad.threshold(1.0)


def test_keep_fraction_is_binomial(mask):
    n = mask.size
    p_keep = 1 - ad.threshold(0.1) / 65536
    sigma = np.sqrt(p_keep * (1 - p_keep) / n)  # 2.9e-4
    assert abs(mask.mean() - p_keep) < 5 * sigma
    # Every (b, n) block and every query row holds about the same fraction: no dead heads.
    per_head = mask.mean(axis=(2, 3))
    assert np.abs(per_head - p_keep).max() < 5 * np.sqrt(p_keep * (1 - p_keep) / 256**2)
    # Other rates: the 16-bit comparison gives the intended fraction.
    for rate in (0.5, 0.9):
        m = np.asarray(ad.keep_mask(seed(1), (2, 2, 128, 128), rate))
        p = 1 - ad.threshold(rate) / 65536
        assert abs(m.mean() - p) < 5 * np.sqrt(p * (1 - p) / m.size)


def test_no_correlation_between_neighbours(mask):
    # Pearson correlation of the decisions at neighbouring keys, queries, heads and rows,
    # each over >= 786k pairs: |r| < 5 / sqrt(pairs) (~0.0056) when independent.
    x = mask.astype(np.float64)
    pairs = {
        "key": (x[..., :-1], x[..., 1:]),
        "query": (x[:, :, :-1], x[:, :, 1:]),
        "head": (x[:, :-1], x[:, 1:]),
        "row": (x[:-1], x[1:]),
    }
    above = np.triu_indices(SHAPE[-1], 1)
    pairs["transpose"] = (x[..., above[0], above[1]], x[..., above[1], above[0]])  # (t,s), (s,t)
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.size), (name, r)


def test_same_key_same_mask_other_key_other_mask(mask):
    np.testing.assert_array_equal(np.asarray(ad.keep_mask(seed(0), SHAPE, 0.1)), mask)
    small = (2, 3, 32, 32)
    a = np.asarray(ad.keep_mask(seed(0), small, 0.1))
    for other in (seed(1), jnp.array([ad.seed_words(jax.random.key(0))[0], 7], jnp.uint32)):
        b = np.asarray(ad.keep_mask(other, small, 0.1))
        # independent masks differ in ~2 p (1 - p) = 18 % of the places
        assert 0.15 < (a != b).mean() < 0.21
    # A function of (seed, b, n, t, s) only: a smaller batch / sequence is a slice.
    np.testing.assert_array_equal(a, mask[:2, :3, :32, :32])


def test_apply_scales_kept_entries():
    probs = jnp.full((2, 2, 16, 16), 0.25, jnp.float32)
    out = np.asarray(ad.apply(probs, seed(3), 0.3))
    keep = np.asarray(ad.keep_mask(seed(3), probs.shape, 0.3))
    np.testing.assert_allclose(out[keep], 0.25 * ad.keep_scale(0.3), rtol=1e-7)
    assert (out[~keep] == 0).all()
    assert ad.apply(probs, seed(3), 0.0) is probs


def _qkv(b=3, s=9, heads=2, dim=8):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, heads, dim)), jnp.float32) for _ in range(3))
    return q, k, v, jnp.asarray([s, 5, 1][:b], jnp.int32)


def test_rate_zero_equals_fused_attention():
    q, k, v, lengths = _qkv()
    mask = bert_lib.key_mask(lengths, q.shape[1])
    with jax.default_matmul_precision("float32"):
        ref = bert_lib._attention(q, k, v, lengths=lengths, mask=None, implementation="xla")
        out = bert_lib._attention_with_dropout(q, k, v, mask, jax.random.key(0), 0.0)
        # with dropout on, the output changes
        dropped = bert_lib._attention_with_dropout(q, k, v, mask, jax.random.key(0), 0.3)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not np.allclose(dropped, ref, atol=1e-3)


def test_bert_train_mode_masks_follow_the_step_key():
    # Training derives each step's dropout key from (seed, step, microbatch): two step keys
    # give different outputs, a replay of the same key (a resumed step) the same output.
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 50, (2, 12)), jnp.int32)
    lengths = jnp.asarray([12, 7], jnp.int32)
    run = nnx.jit(lambda m: m(ids, lengths=lengths))

    def step(key: int):
        model = BertModel(config, rngs=nnx.Rngs(params=0, dropout=key))
        model.train()
        return np.asarray(run(model))

    a, b, a_again = step(100), step(101), step(100)
    np.testing.assert_array_equal(a, a_again)
    valid = np.arange(12)[None] < np.asarray(lengths)[:, None]
    assert np.abs(a - b)[valid].max() > 1e-3
