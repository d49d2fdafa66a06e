"""Flax NNX BERT vs transformers' PyTorch BertModel, and HF weight loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from signclip_jax.data.text import bundled_minilm_path, encode_texts, load_tokenizer
from signclip_jax.errors import DataError, UserError
from signclip_jax.model import attention_dropout
from signclip_jax.model import bert as bert_lib
from signclip_jax.model.bert import (
    PRESETS,
    BertConfig,
    BertModel,
    hf_key,
    load_hf_weights,
    param_items,
)

TINY = BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)


def torch_bert(config: BertConfig, seed: int = 0) -> transformers.BertModel:
    """A random transformers BertModel with our config (eager attention, as the original)."""
    torch.manual_seed(seed)
    hf = transformers.BertConfig(**{k: v for k, v in config.to_dict().items()})
    hf._attn_implementation = "eager"
    model = transformers.BertModel(hf, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped name would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_folder(model: transformers.BertModel, folder, drop=(), rename=None, extra=None):
    """Writes config.json + model.safetensors (optionally editing the tensors)."""
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items() if k not in drop}
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    sd.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    return str(folder)


def random_inputs(rng, batch, seq, vocab):
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    lengths = rng.integers(2, seq + 1, size=batch)
    lengths[0] = seq
    mask = np.arange(seq)[None] < lengths[:, None]
    ids[~mask] = 0
    return ids, mask


def max_diff_on_valid(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask].max())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    pt = torch_bert(TINY)
    folder = save_folder(pt, tmp_path_factory.mktemp("tiny"))
    model = BertModel(BertConfig.from_hf(folder), rngs=nnx.Rngs(1))
    report = load_hf_weights(model, folder)
    return pt, model, folder, report


def test_tiny_bert_matches_transformers(tiny_pair):
    pt, model, _, _ = tiny_pair
    ids, mask = random_inputs(np.random.default_rng(0), 4, 17, TINY.vocab_size)
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    with jax.default_matmul_precision("float32"):
        out = model(jnp.asarray(ids), jnp.asarray(mask))
        pooled = model.pool(out)
    diff = max_diff_on_valid(out, ref.last_hidden_state.numpy(), mask)
    assert diff <= 1e-5, diff
    assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() <= 1e-5


def test_tiny_bert_embeds_and_positions_match(tiny_pair):
    """The inputs_embeds / position_ids / token_type_ids path used by the video tower."""
    pt, model, _, _ = tiny_pair
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(2, 9, TINY.hidden_size)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 30]] * 2)
    types = rng.integers(0, 2, size=(2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, 4:8] = False
    with torch.no_grad():
        ref = pt(
            inputs_embeds=torch.tensor(embeds),
            attention_mask=torch.tensor(mask).long(),
            position_ids=torch.tensor(positions),
            token_type_ids=torch.tensor(types),
        )
    with jax.default_matmul_precision("float32"):
        out = model(
            None,
            mask,
            inputs_embeds=jnp.asarray(embeds),
            position_ids=jnp.asarray(positions),
            token_type_ids=jnp.asarray(types),
        )
    assert max_diff_on_valid(out, ref.last_hidden_state.numpy(), mask) <= 1e-5


@pytest.fixture(scope="module")
def minilm():
    path = bundled_minilm_path()
    model = BertModel(BertConfig.from_hf(path), rngs=nnx.Rngs(0))
    report = load_hf_weights(model, path)
    return model, report


def test_minilm_matches_transformers(minilm):
    model, _ = minilm
    tok = load_tokenizer("minilm")
    texts = ["<en> <ase> house", "<en> <gsg> Fingerspell the letter SCH.", "", "sad " * 40]
    ids, mask = encode_texts(tok, texts, max_len=64)
    pt = transformers.BertModel.from_pretrained(bundled_minilm_path(), attn_implementation="eager")
    with torch.no_grad():
        ref = pt.eval()(
            input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()
        ).last_hidden_state.numpy()
    with jax.default_matmul_precision("float32"):
        out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    diff = max_diff_on_valid(out, ref, mask)
    print(f"MiniLM last hidden state max abs diff vs transformers: {diff:.2e}")
    assert diff <= 1e-5, diff


def test_minilm_load_report(minilm):
    model, report = minilm
    n_params = len(param_items(model))
    assert len(report.loaded) == n_params == 5 + 6 * 16 + 2
    # the one tensor the model has no use for is listed, not silently dropped
    assert report.unused == ["embeddings.position_ids"]
    assert "position_ids" in str(report)


def test_missing_tensor_is_an_error_naming_it(tmp_path):
    pt = torch_bert(TINY)
    name = "encoder.layer.1.attention.self.key.bias"
    folder = save_folder(pt, tmp_path / "missing", drop=(name,))
    model = BertModel(TINY, rngs=nnx.Rngs(0))
    before = np.asarray(model.embeddings.word_embeddings.embedding[...]).copy()
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_hf_weights(model, folder)
    # all or nothing: nothing was written
    np.testing.assert_array_equal(model.embeddings.word_embeddings.embedding[...], before)


def test_shape_mismatch_is_an_error(tmp_path):
    pt = torch_bert(TINY.replace(vocab_size=50))
    folder = save_folder(pt, tmp_path / "vocab50")
    with pytest.raises(DataError, match=r"word_embeddings\.weight \(50, 32\)"):
        load_hf_weights(BertModel(TINY, rngs=nnx.Rngs(0)), folder)


def test_prefixed_checkpoint_and_unused_heads(tmp_path):
    """BertForPreTraining-style files (bert. prefix, MLM head, old gamma/beta names)."""
    pt = torch_bert(TINY)

    def rename(k):
        k = "bert." + k
        if k.endswith("LayerNorm.weight"):
            return k[: -len("weight")] + "gamma"
        if k.endswith("LayerNorm.bias"):
            return k[: -len("bias")] + "beta"
        return k

    head = {"cls.predictions.bias": np.zeros(TINY.vocab_size, np.float32)}
    folder = save_folder(pt, tmp_path / "pretraining", rename=rename, extra=head)
    model = BertModel(TINY, rngs=nnx.Rngs(0))
    report = load_hf_weights(model, folder)
    assert report.unused == ["cls.predictions.bias"]
    assert "bert.embeddings.LayerNorm.gamma" in report.loaded
    np.testing.assert_array_equal(
        model.embeddings.LayerNorm.scale[...], pt.embeddings.LayerNorm.weight.detach().numpy()
    )


def test_fewer_layers_and_pytorch_bin(tmp_path):
    pt = torch_bert(TINY)
    folder = tmp_path / "bin"
    folder.mkdir()
    sd = {k: v.half() for k, v in pt.state_dict().items()}  # an fp16 file is upcast
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(pt.config.to_dict()))
    model = BertModel(TINY.replace(num_hidden_layers=1), rngs=nnx.Rngs(0))
    report = load_hf_weights(model, str(folder), num_layers=1)
    assert sorted({k.split(".")[2] for k in report.unused if k.startswith("encoder.")}) == [
        "1",
        "2",
    ]
    assert len(report.unused) == 2 * 16
    q = pt.encoder.layer[0].attention.self.query.weight.detach().half().float().numpy()
    np.testing.assert_array_equal(model.encoder.layer[0].attention.self.query.kernel[...], q.T)
    assert model.encoder.layer[0].attention.self.query.kernel[...].dtype == jnp.float32
    with pytest.raises(UserError, match="num_layers"):
        load_hf_weights(model, str(folder), num_layers=3)


def test_model_without_pooler_reports_it_unused(tiny_pair):
    _, _, folder, _ = tiny_pair
    model = BertModel(TINY, add_pooling_layer=False, rngs=nnx.Rngs(0))
    report = load_hf_weights(model, folder)
    assert report.unused == ["pooler.dense.bias", "pooler.dense.weight"]


def test_config_presets_and_sources(tmp_path):
    base = BertConfig.from_hf("bert-base-cased")  # no download: a preset
    assert (base.vocab_size, base.hidden_size, base.num_hidden_layers) == (28996, 768, 12)
    assert (base.intermediate_size, base.max_position_embeddings, base.layer_norm_eps) == (
        3072,
        512,
        1e-12,
    )
    assert PRESETS["bert-base-uncased"].vocab_size == 30522
    mini = BertConfig.from_hf("minilm")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.intermediate_size) == (384, 6, 1536)
    assert BertConfig.from_hf(bundled_minilm_path()) == mini
    assert BertConfig.from_hf(TINY.to_dict()) == TINY
    with pytest.raises(UserError, match="cache"):
        BertConfig.from_hf("signclip-jax-tests/no-such-model-7f3a")
    with pytest.raises(UserError, match="missing BERT config"):
        BertConfig.from_hf({"hidden_size": 8})
    with pytest.raises(UserError, match="multiple"):
        TINY.replace(num_attention_heads=5)


EXPECTED_AXES = {
    "embeddings.word_embeddings.weight": ("vocab", "embed"),
    "embeddings.position_embeddings.weight": (None, "embed"),
    "embeddings.token_type_embeddings.weight": (None, "embed"),
    "embeddings.LayerNorm.weight": ("embed",),
    "encoder.layer.0.attention.self.query.weight": ("embed", "heads"),
    "encoder.layer.0.attention.self.value.bias": ("heads",),
    "encoder.layer.0.attention.output.dense.weight": ("heads", "embed"),
    "encoder.layer.0.attention.output.dense.bias": ("embed",),
    "encoder.layer.0.intermediate.dense.weight": ("embed", "mlp"),
    "encoder.layer.0.output.dense.weight": ("mlp", "embed"),
    "encoder.layer.0.output.dense.bias": ("embed",),
    "encoder.layer.0.output.LayerNorm.bias": ("embed",),
    "pooler.dense.weight": ("embed", "embed_out"),
}


def test_logical_axes_metadata_survives_state_and_split():
    model = BertModel(TINY, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    for source in (nnx.state(model, nnx.Param), state):
        seen = {}
        for path, var in nnx.to_flat_state(source):
            if not isinstance(var, nnx.Param):
                continue
            axes = var.get_metadata()["logical_axes"]
            assert len(axes) == var.get_value().ndim, path
            seen[hf_key(path)[0]] = tuple(axes)
        for key, axes in EXPECTED_AXES.items():
            assert seen[key] == axes, key


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


def loss(model, ids, mask):
    # A fixed, varied weighting: the sum of squares of a LayerNorm output is nearly constant,
    # which left gradients of pure rounding noise (~1e-5) to compare.
    out = model(ids, mask)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape))


grad = nnx.jit(nnx.grad(loss))


def test_dropout_train_eval_and_remat():
    # one layer: XLA:CPU compiles of backward passes are slow (~2 s per layer here)
    config = TINY.replace(
        num_hidden_layers=1, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3
    )
    ids, mask = random_inputs(np.random.default_rng(2), 2, 11, TINY.vocab_size)
    model = BertModel(config, rngs=nnx.Rngs(params=0, dropout=1))
    eval_out = forward(model, ids, mask)  # created in eval mode: deterministic
    np.testing.assert_array_equal(eval_out, forward(model, ids, mask))
    model.train()
    a, b = forward(model, ids, mask), forward(model, ids, mask)
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)
    model.eval()
    np.testing.assert_array_equal(forward(model, ids, mask), eval_out)

    # Rematerialisation changes memory, not values: same dropout masks (same rng streams),
    # same gradients, with dropout on (attention-probability dropout included) under jit.
    plain = BertModel(config, rngs=nnx.Rngs(params=0, dropout=1))
    remat = BertModel(config, remat=True, rngs=nnx.Rngs(params=0, dropout=1))
    plain.train()
    remat.train()
    g1, g2 = grad(plain, ids, mask), grad(remat, ids, mask)
    flat1, flat2 = nnx.to_flat_state(g1), nnx.to_flat_state(g2)
    assert len(flat1) == len(param_items(plain))
    for (p1, v1), (p2, v2) in zip(flat1, flat2, strict=True):
        assert p1 == p2
        assert np.isfinite(v1.get_value()).all()
        np.testing.assert_allclose(v1.get_value(), v2.get_value(), atol=1e-5, rtol=1e-4)


def _qkv(rng: np.random.Generator, b: int = 3, s: int = 9, heads: int = 2, dim: int = 8):
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, heads, dim)), jnp.float32) for _ in range(3))
    lengths = np.array([s, 5, 1])[:b]
    mask = jnp.asarray(np.arange(s)[None] < lengths[:, None])
    return q, k, v, mask


def test_attention_dropout_matches_explicit_dropout_and_its_gradients():
    # The checkpointed attention applies the counter-based hash mask of (seed from the key,
    # b, n, t, s) to the probabilities, so values and gradients equal the plain explicit
    # form with that mask built independently here (keep iff the top 16 hash bits >=
    # round(rate * 65536), kept entries scaled by 1 / the exact keep probability).
    q, k, v, mask = _qkv(np.random.default_rng(0))
    key, rate = jax.random.key(7), 0.3

    def explicit(q, k, v):
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, -1)
        seed = jax.random.bits(key, (2,), jnp.uint32)
        b, n, t, s = np.indices(probs.shape)
        hy = attention_dropout.row_hash(seed[0], seed[1], b, n)
        bits = attention_dropout.element_hash(seed[1], hy, t, s) >> 16
        cut = round(rate * 65536)
        probs = jnp.where(bits >= cut, probs * (65536 / (65536 - cut)), 0.0)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)

    fused = lambda q, k, v: bert_lib._attention_with_dropout(q, k, v, mask, key, rate)
    np.testing.assert_allclose(fused(q, k, v), explicit(q, k, v), atol=1e-6)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    g_fused = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
    g_plain = jax.jit(jax.grad(loss(explicit), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_fused, g_plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # A different key draws a different mask.
    other = bert_lib._attention_with_dropout(q, k, v, mask, jax.random.key(8), rate)
    assert not np.allclose(other, fused(q, k, v))


def cudnn_stand_in(monkeypatch, seen: list):
    """No GPU here: route cuDNN calls to XLA, recording what the kernel was handed."""
    real = jax.nn.dot_product_attention

    def stand_in(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        if implementation == "cudnn":
            seen.append(dict(seq=q.shape[1], mask=None if mask is None else mask.shape, **kw))
            implementation = "xla"
        return real(q, k, v, bias, mask, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)


@pytest.mark.parametrize("seq", [9, 10])
def test_cudnn_path_takes_sequence_lengths_and_pads_once(monkeypatch, seq):
    # The fast path hands cuDNN sequence lengths and no mask or bias; an odd sequence (the
    # text tower's 63 tokens) is padded once at the model input, so every layer's kernel sees
    # the same even length, and the outputs equal XLA's.
    config = TINY.replace(num_hidden_layers=2)
    xla = BertModel(config, rngs=nnx.Rngs(4))
    cudnn = BertModel(config, attention="cudnn", rngs=nnx.Rngs(4))
    ids, mask = random_inputs(np.random.default_rng(seq), 3, seq, TINY.vocab_size)
    lengths = jnp.asarray(mask.sum(-1), jnp.int32)
    seen = []
    cudnn_stand_in(monkeypatch, seen)
    out = nnx.jit(lambda m: m(ids, lengths=lengths))(cudnn)
    assert out.shape == (3, seq, TINY.hidden_size)
    assert [s["seq"] for s in seen] == [seq + seq % 2] * 2
    for s in seen:
        assert s["mask"] is None
        np.testing.assert_array_equal(s["query_seq_lengths"].shape, (3,))
        assert s["key_value_seq_lengths"].dtype == jnp.int32
    reference = nnx.jit(lambda m: m(ids, mask))(xla)
    assert max_diff_on_valid(out, reference, mask) <= 1e-6
    # A dense (non-prefix) mask still works on cuDNN, as the [B, 1, T, S] form it requires.
    seen.clear()
    holes = mask.copy()
    holes[0, 1:3] = False
    out = nnx.jit(lambda m: m(ids, holes))(cudnn)
    assert [s["mask"] for s in seen] == [(3, 1, seq + seq % 2, seq + seq % 2)] * 2
    reference = nnx.jit(lambda m: m(ids, holes))(xla)
    assert max_diff_on_valid(out, reference, holes) <= 1e-6


def test_lengths_path_matches_transformers(tiny_pair):
    """Valid-prefix lengths give HF's hidden states on the valid tokens; padded ones stay
    finite (they are pooled with weight 0, and 0 * NaN would poison the mean)."""
    pt, model, _, _ = tiny_pair
    ids, mask = random_inputs(np.random.default_rng(5), 5, 16, TINY.vocab_size)
    mask[3], ids[3] = False, 0  # a fully padded dummy row
    mask[4, :1] = True
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    lengths = jnp.asarray(mask.sum(-1), jnp.int32)
    with jax.default_matmul_precision("float32"):
        out = nnx.jit(lambda m: m(ids, lengths=lengths))(model)
        dense = nnx.jit(lambda m: m(ids, mask))(model)
    valid = mask.copy()
    valid[3] = False
    assert max_diff_on_valid(out, ref.last_hidden_state.numpy(), valid) <= 1e-5
    assert max_diff_on_valid(out, dense, valid) <= 1e-6
    assert np.isfinite(np.asarray(out)).all()


def test_exactly_one_of_mask_and_lengths():
    model = BertModel(TINY.replace(num_hidden_layers=1), rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, jnp.ones((1, 4), bool), lengths=jnp.array([4], jnp.int32))


def test_attention_dropout_on_the_lengths_path():
    # Training with attention dropout: the lengths path hands the explicit checkpointed
    # attention the same [B, S] key mask as the dense path, so with the same rng streams the
    # outputs are identical; dropout is on (outputs differ from eval and between calls).
    config = TINY.replace(
        num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3
    )
    ids, mask = random_inputs(np.random.default_rng(6), 3, 11, TINY.vocab_size)
    lengths = jnp.asarray(mask.sum(-1), jnp.int32)
    by_lengths, by_mask = (
        BertModel(config, remat=True, rngs=nnx.Rngs(params=0, dropout=1)) for _ in range(2)
    )
    eval_out = nnx.jit(lambda m: m(ids, lengths=lengths))(by_lengths)
    by_lengths.train()
    by_mask.train()
    run_lengths = nnx.jit(lambda m: m(ids, lengths=lengths))
    a, b = run_lengths(by_lengths), run_lengths(by_lengths)
    c = nnx.jit(lambda m: m(ids, mask))(by_mask)
    assert max_diff_on_valid(a, c, mask) == 0.0
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids, lengths=lengths)[mask] ** 2)))(by_lengths)
    assert all(np.isfinite(v.get_value()).all() for _, v in nnx.to_flat_state(g))


def test_attention_dropout_keeps_no_score_sized_residuals(capsys):
    # Gradients keep q, k, v (and the mask and key), never a [B, N, S, S] array: those were
    # ~20 bytes per score at batch 256 x 258 tokens, ~4 GB per layer.
    from jax.ad_checkpoint import print_saved_residuals

    q, k, v, mask = _qkv(np.random.default_rng(3))
    f = lambda q, k, v: bert_lib._attention_with_dropout(q, k, v, mask, jax.random.key(0), 0.1)
    print_saved_residuals(lambda q, k, v: f(q, k, v).sum(), q, k, v)
    saved = capsys.readouterr().out.strip().splitlines()
    b, s, n, _ = q.shape
    assert len(saved) >= 3 and sum("from the argument" in line for line in saved) == 3
    assert not any(f"[{b},{n},{s},{s}]" in line for line in saved), saved
