"""The Pallas flash attention with hash dropout (interpret mode here) vs its XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from signclip_jax.model import attention_dropout as ad
from signclip_jax.model import flash_dropout as fd

RATE = 0.3


def inputs(b=2, s=20, heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, heads, dim)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=(b, s, heads, dim)), jnp.float32)  # output cotangent
    return q, k, v, w


def compare(padding: dict, valid: np.ndarray, *, s: int, block_q: int, block_k: int, rate=RATE):
    """Forward and q/k/v gradients of flash vs reference on the valid queries (fp32)."""
    q, k, v, w = inputs(s=s)
    seed = ad.seed_words(jax.random.key(5))
    w = w * valid[:, :, None, None]  # padded queries' outputs are not used by the model
    kw = dict(padding, seed=seed, rate=rate)

    def output_and_grads(f):  # one compile for both
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, **kw), q, k, v)
        return out, vjp(w)

    flash = lambda q, k, v, **a: fd.attention(q, k, v, block_q=block_q, block_k=block_k, **a)
    with jax.default_matmul_precision("float32"):
        out, g = jax.jit(lambda: output_and_grads(flash))()
        ref, g_ref = output_and_grads(fd.reference)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    return out, ref


def test_lengths_with_dropout():
    s = 20  # not a multiple of the tiles: padded inside
    lengths = jnp.asarray([20, 7], jnp.int32)
    valid = np.arange(s)[None] < np.asarray(lengths)[:, None]
    out, _ = compare(dict(lengths=lengths), valid, s=s, block_q=8, block_k=16)
    # dropout is on: rate 0 gives another output
    no_drop = fd.reference(*inputs(s=s)[:3], lengths=lengths)
    assert not np.allclose(np.asarray(out)[valid], np.asarray(no_drop)[valid], atol=1e-3)


def test_segments_with_dropout():
    s = 40
    segments = np.zeros((2, s), np.int32)
    segments[0, :13], segments[0, 13:30], segments[1, :40] = 1, 2, 3  # row 0 ends in padding
    compare(dict(segments=jnp.asarray(segments)), np.ones((2, s), bool), s=s, block_q=16,
            block_k=8)  # fmt: skip


def test_dense_mask_and_no_mask():
    s = 16
    mask = np.ones((2, s), bool)
    mask[0, 3:6] = False  # holes: not a prefix
    mask[1, :] = False  # a row with no key at all: the uniform average, as the XLA path
    compare(dict(mask=jnp.asarray(mask)), np.ones((2, s), bool), s=s, block_q=8, block_k=8)
    compare({}, np.ones((2, s), bool), s=s, block_q=16, block_k=8, rate=0.0)  # no dropout


def test_same_seed_same_output_and_bf16():
    q, k, v, _ = inputs(s=16)
    a, b = (ad.seed_words(jax.random.key(i)) for i in (1, 2))
    f = jax.jit(lambda q, k, v, seed: fd.attention(q, k, v, seed=seed, rate=RATE, block_q=8,
                                                    block_k=8))  # fmt: skip
    np.testing.assert_array_equal(f(q, k, v, a), f(q, k, v, a))
    assert not np.allclose(f(q, k, v, a), f(q, k, v, b))
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = f(*bf, a)
    assert out.dtype == jnp.bfloat16
    ref = fd.reference(*bf, seed=a, rate=RATE)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2)  # fmt: skip


def test_bert_pallas_equals_the_xla_dropout_path():
    # model.attention = "pallas": in eval mode the same outputs as XLA attention; in train mode
    # the same dropout masks as the XLA dropout path (both hash the same per-call key), so the
    # same outputs and parameter gradients. Packed rows (segments); the kernel tests above
    # cover lengths and masks.
    from flax import nnx

    from signclip_jax.model.bert import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.2,
    )  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 50, (2, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)
    models = {
        name: BertModel(config, attention=name, rngs=nnx.Rngs(params=0, dropout=3))
        for name in ("xla", "pallas")
    }

    def loss(m):
        out = m(ids, segment_ids=segments)
        return jnp.sum(out**2), out

    with jax.default_matmul_precision("float32"):
        evals = {n: nnx.jit(lambda m: m(ids, segment_ids=segments))(m) for n, m in models.items()}
        np.testing.assert_allclose(evals["pallas"], evals["xla"], atol=1e-5)
        for m in models.values():
            m.train()
        grads, train = {}, {}
        for n, m in models.items():
            grads[n], train[n] = nnx.jit(nnx.grad(loss, has_aux=True))(m)
    np.testing.assert_allclose(train["pallas"], train["xla"], atol=1e-5)
    assert np.abs(train["xla"] - evals["xla"]).max() > 1e-3  # dropout is on
    flat = [nnx.to_flat_state(grads[n]) for n in ("xla", "pallas")]
    for (p1, g1), (p2, g2) in zip(*flat, strict=True):
        assert p1 == p2
        np.testing.assert_allclose(g1.get_value(), g2.get_value(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ids", ["lengths", "segments"])
def test_kernels_lower_to_triton_for_cuda(monkeypatch, ids):
    """Without a GPU: the forward and both backward kernels lower through Pallas' Triton
    backend for CUDA (jax.export's cross-platform lowering), at bert-base's head size and a
    258-token row in bf16. This checks the kernels' Triton IR, not PTX compilation or speed."""
    monkeypatch.setattr(fd, "_interpret", lambda: False)
    b, s, n, hd = 2, 258, 2, 64
    q = jax.ShapeDtypeStruct((b, s, n, hd), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((b,) if ids == "lengths" else (b, s), jnp.int32)
    seed = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def loss(q, k, v, m, seed):
        out = fd.attention(q, k, v, **{ids: m}, seed=seed, rate=0.1)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(grads, platforms=("cuda",), disabled_checks=[triton])(
        q, q, q, mask, seed
    )
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3  # fwd, dK/dV, dQ
