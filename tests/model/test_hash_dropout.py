"""Any-rank counter-hash dropout and the HashDropout module BERT's hidden dropout uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signclip_jax.model import attention_dropout as ad
from signclip_jax.model import hash_dropout as hd
from signclip_jax.model.bert import BertConfig, BertModel
from signclip_jax.train.step import _fresh_rngs

SHAPE = (16, 64, 1024)  # [B, S, H]: 1,048,576 decisions


def seed(i: int) -> jax.Array:
    return ad.seed_words(jax.random.key(i))


@pytest.fixture(scope="module")
def mask():
    return np.asarray(jax.jit(hd.keep_mask_nd, static_argnums=(1, 2))(seed(0), SHAPE, 0.1))


def test_flat_index_is_row_major():
    for shape in [(3, 4, 5), (1, 7), (2, 1, 3), (6,)]:
        expect = np.arange(np.prod(shape)).reshape(shape)
        np.testing.assert_array_equal(hd._flat_index(shape), expect)


def test_keep_fraction_is_binomial(mask):
    p_keep = 1 - ad.threshold(0.1) / 65536
    sigma = lambda n, p=p_keep: np.sqrt(p * (1 - p) / n)
    assert abs(mask.mean() - p_keep) < 5 * sigma(mask.size)
    # every batch row and every hidden unit drops about the same fraction
    assert np.abs(mask.mean(axis=(1, 2)) - p_keep).max() < 5 * sigma(64 * 1024)
    assert np.abs(mask.mean(axis=(0, 1)) - p_keep).max() < 5 * sigma(16 * 64)
    for rate in (0.5, 0.9):
        m = np.asarray(hd.keep_mask_nd(seed(1), (4, 33, 512), rate))
        p = 1 - ad.threshold(rate) / 65536
        assert abs(m.mean() - p) < 5 * sigma(m.size, p)


def test_no_correlation_between_neighbours(mask):
    # Pearson correlation of decisions at neighbouring hidden units, positions, batch rows
    # and flat indices (across row ends too), and of elements 2**k apart in the flat index
    # (counter bits): |r| < 5 / sqrt(pairs) when independent.
    x = mask.astype(np.float64)
    flat = x.ravel()
    pairs = {
        "hidden": (x[..., :-1], x[..., 1:]),
        "position": (x[:, :-1], x[:, 1:]),
        "row": (x[:-1], x[1:]),
        "flat": (flat[:-1], flat[1:]),
    }
    for k in (8, 16, 19):
        pairs[f"flat+2**{k}"] = (flat[: -(1 << k)], flat[1 << k :])
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.size), (name, r)


def test_same_key_same_mask_other_key_other_mask(mask):
    np.testing.assert_array_equal(np.asarray(hd.keep_mask_nd(seed(0), SHAPE, 0.1)), mask)
    small = (2, 66, 384)
    a = np.asarray(hd.keep_mask_nd(seed(0), small, 0.1))
    # the mask is a function of (seed, flat index): the leading flat block of a larger array
    np.testing.assert_array_equal(a.ravel(), mask.ravel()[: a.size])
    for other in (seed(1), jnp.array([seed(0)[0], 7], jnp.uint32), jnp.array([7, seed(0)[1]])):
        b = np.asarray(hd.keep_mask_nd(other, small, 0.1))
        assert 0.16 < (a != b).mean() < 0.20  # independent masks: 2 p (1 - p) = 18 %


def test_apply_nd_scales_kept_entries_and_rate_zero_is_identity():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 32)), jnp.bfloat16)
    out = np.asarray(hd.apply_nd(x, seed(3), 0.3).astype(jnp.float32))
    keep = np.asarray(hd.keep_mask_nd(seed(3), x.shape, 0.3))
    expect = np.asarray((x * np.asarray(ad.keep_scale(0.3), jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_array_equal(out[keep], expect[keep])
    assert (out[~keep] == 0).all()
    assert hd.apply_nd(x, seed(3), 0.0) is x


def test_index_limit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"2\*\*32"):
        hd.keep_mask_nd(seed(0), (1 << 16, 1 << 16, 2), 0.1)
    with pytest.raises(ValueError, match="rate"):
        hd.HashDropout(1.0)


def test_module_train_eval_rate_zero_and_key_stream():
    x = jnp.ones((2, 5, 8), jnp.float32)
    m = hd.HashDropout(0.5, deterministic=True, rngs=nnx.Rngs(dropout=5))
    assert m(x) is x  # eval
    m.train()
    assert m.deterministic is False
    a, b = np.asarray(m(x)), np.asarray(m(x))
    assert not np.array_equal(a, b)  # one key drawn per call
    assert set(np.unique(a)) <= {0.0, ad.keep_scale(0.5)}
    assert m(x, deterministic=True) is x
    # Its keys are nnx.Dropout's (same fork of the same stream), so the model's RNG state
    # and training's per-step key reset are unchanged; the mask comes from the drawn key.
    ref = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=5))
    key0 = ref.rngs()
    np.testing.assert_array_equal(a, hd.apply_nd(x, ad.seed_words(key0), 0.5))
    np.testing.assert_array_equal(b, hd.apply_nd(x, ad.seed_words(ref.rngs()), 0.5))
    np.testing.assert_array_equal(m(x, rngs=key0), a)
    m.eval()
    assert m(x) is x
    zero = hd.HashDropout(0.0, rngs=nnx.Rngs(dropout=5))
    assert zero(x) is x


def test_bert_hidden_dropout_follows_the_step_key():
    # As train/step.py runs it: the model's RNG state reset to fold_in(step key, i) inside
    # the traced step. Two step keys give different outputs, the same key the same output.
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertModel(config, rngs=nnx.Rngs(params=0, dropout=1))
    assert isinstance(model.embeddings.dropout, hd.HashDropout)
    model.train()
    graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 50, (2, 12)), jnp.int32)
    lengths = jnp.asarray([12, 7], jnp.int32)

    @jax.jit
    def step(key):
        m = nnx.merge(graphdef, params, _fresh_rngs(rngs, key), rest)
        return m(ids, lengths=lengths)

    a, b = np.asarray(step(jax.random.key(100))), np.asarray(step(jax.random.key(101)))
    np.testing.assert_array_equal(a, np.asarray(step(jax.random.key(100))))
    valid = np.arange(12)[None] < np.asarray(lengths)[:, None]
    assert np.abs(a - b)[valid].max() > 1e-3
    model.eval()
    eval_out = np.asarray(model(ids, lengths=lengths))
    assert np.abs(a - eval_out)[valid].max() > 1e-3
