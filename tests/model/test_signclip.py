"""SignCLIP two-tower model: sizes, keys, sharding metadata, padding invariance, precision."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from signclip_jax.data.text import encode_texts, load_tokenizer
from signclip_jax.errors import UserError
from signclip_jax.model.bert import BertConfig, hf_key, read_checkpoint
from signclip_jax.model.signclip import (
    SignCLIPConfig,
    build_model,
    count_params,
    init_from_pretrained,
    model_config,
    to_state_dict,
)

TINY_BERT = BertConfig(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)


def tiny_cfg(**kw):
    base = dict(
        text_model="tiny",
        video_layers=2,
        projection="none",
        pose_dim=609,
        max_frames=32,
        cls_token_id=101,
        sep_token_id=102,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def tiny_model(seed=0, **kw):
    return build_model(tiny_cfg(**kw), rngs=nnx.Rngs(seed), bert_config=TINY_BERT)


def random_pose(rng, batch, frames, dim=609):
    """Features of real-looking scale (normalised keypoints: mostly within +-2, z smaller)."""
    return (rng.normal(size=(batch, frames, dim)) * np.tile([0.6, 0.6, 0.2], dim // 3)).astype(
        np.float32
    )


def pad(pose, length, value=0.0):
    b, t, d = pose.shape
    out = np.full((b, length, d), value, np.float32)
    out[:, :t] = pose
    return out


@nnx.jit
def embed_pose(model, pose, mask):
    return model.embed_pose(pose, mask)


@nnx.jit
def embed_text(model, ids, mask):
    return model.embed_text(ids, mask)


def embed_both(model, pose, pose_mask, ids, text_mask):
    """Eagerly (a monkeypatched kernel sees concrete lengths)."""
    return model.embed_pose(pose, pose_mask), model.embed_text(ids, text_mask)


# ---------------------------------------------------------------------------------- sizes
def abstract(cfg):
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    "layers,projection,total,video,text",
    [
        (12, "none", 217_681_152, 109_370_880, 108_310_272),  # baseline_temporal
        (6, "none", 175_153_920, None, 108_310_272),  # baseline
        (12, "linear", 218_860_800, 109_370_880, 108_310_272),  # baseline_proj
    ],
)
def test_parameter_counts_match_the_original(layers, projection, total, video, text):
    cfg = ml_collections.ConfigDict(
        dict(
            text_model="bert-base-cased",
            video_layers=layers,
            projection=projection,
            pose_dim=609,
            max_frames=256,
        )
    )
    counts = count_params(abstract(cfg))  # shapes only: no download, no memory
    assert counts["total"] == total
    assert counts["text"] == text
    if video is not None:
        assert counts["video"] == video
    mlp = 609 * 768 + 768 + 2 * 768 + 768 * 768 + 768
    assert mlp == 1_060_608


def expected_original_keys(video_layers, text_layers, projection):
    """Section 8.2 of the reference, written out from its tables."""
    layer = [
        f"attention.self.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")
    ]
    layer += [
        f"attention.output.{n}.{p}" for n in ("dense", "LayerNorm") for p in ("weight", "bias")
    ]
    layer += ["intermediate.dense.weight", "intermediate.dense.bias"]
    layer += [f"output.{n}.{p}" for n in ("dense", "LayerNorm") for p in ("weight", "bias")]
    assert len(layer) == 16
    emb = [
        f"embeddings.{n}.weight"
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    emb += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    pool = ["pooler.dense.weight", "pooler.dense.bias"]

    def bert(prefix, n):
        return [prefix + k for k in emb + pool] + [
            f"{prefix}encoder.layer.{i}.{k}" for i in range(n) for k in layer
        ]

    keys = [
        f"video_encoder.videomlp.{n}.{p}"
        for n in ("linear1", "LayerNorm", "linear2")
        for p in ("weight", "bias")
    ]
    keys += bert("video_encoder.bert.", video_layers) + bert("text_encoder.", text_layers)
    if projection:
        keys += ["video_projection.linear.weight", "text_projection.linear.weight"]
    return set(keys)


@pytest.mark.parametrize(
    "layers,projection,n", [(12, "none", 404), (6, "none", 308), (12, "linear_l2", 406)]
)
def test_parameter_names_are_the_original_keys(layers, projection, n):
    cfg = ml_collections.ConfigDict(
        dict(text_model="bert-base-cased", video_layers=layers, projection=projection)
    )
    model = abstract(cfg)
    keys = {hf_key(p)[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(keys) == n
    assert keys == expected_original_keys(layers, 12, projection != "none")
    shapes = {
        hf_key(p)[0]: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert shapes["video_encoder.videomlp.linear1.kernel".replace("kernel", "weight")] == (609, 768)
    assert shapes["video_encoder.bert.embeddings.word_embeddings.weight"] == (28996, 768)


# ----------------------------------------------------------------------- sharding metadata
def test_every_param_has_logical_axes():
    model = tiny_model(projection="linear")
    _, state = nnx.split(model)
    expected = {
        "video_encoder.videomlp.linear1.weight": ("pose_in", "embed"),
        "video_encoder.videomlp.linear1.bias": ("embed",),
        "video_encoder.videomlp.LayerNorm.weight": ("embed",),
        "video_encoder.videomlp.linear2.weight": ("embed", "embed_out"),
        "video_encoder.bert.embeddings.word_embeddings.weight": ("vocab", "embed"),
        "video_encoder.bert.pooler.dense.weight": ("embed", "embed_out"),
        "text_encoder.encoder.layer.2.attention.self.key.weight": ("embed", "heads"),
        "text_encoder.encoder.layer.0.intermediate.dense.bias": ("mlp",),
        "video_projection.linear.weight": ("embed", "embed_out"),
        "text_projection.linear.weight": ("embed", "embed_out"),
    }
    for source in (nnx.state(model, nnx.Param), state):
        seen = {}
        for path, var in nnx.to_flat_state(source):
            if isinstance(var, nnx.Param):
                axes = var.get_metadata().get("logical_axes")
                assert axes is not None and len(axes) == np.ndim(var.get_value()), path
                assert all(a is None or isinstance(a, str) for a in axes)
                seen[hf_key(path)[0]] = tuple(axes)
        assert len(seen) == len(to_state_dict(model))
        for key, axes in expected.items():
            assert seen[key] == axes, key


# -------------------------------------------------------------------------------- config
def test_model_config_from_full_training_config():
    cfg = ml_collections.ConfigDict()
    cfg.model = dict(
        text_model="bert-base-cased",
        video_layers=6,
        projection="linear",
        dtype="bfloat16",
        remat=True,
        attention="auto",
        hidden_dropout=0.0,
        attention_dropout=0.2,
    )
    cfg.data = dict(max_frames=128)
    c = model_config(cfg)
    assert (c.video_layers, c.projection, c.max_frames, c.dtype, c.remat) == (
        6,
        "linear",
        128,
        "bfloat16",
        True,
    )
    assert (c.cls_token_id, c.sep_token_id) == (101, 102)  # bert-base-cased, no tokenizer read
    assert c.bert.hidden_dropout_prob == 0.0 and c.bert.attention_probs_dropout_prob == 0.2
    assert SignCLIPConfig.from_dict(c.to_dict()) == c
    assert model_config(c.to_dict()) == c  # what a workdir stores rebuilds without the hub
    assert model_config(ml_collections.ConfigDict(c.to_dict())) == c
    mini = model_config({"text_model": "minilm"})
    tok = load_tokenizer("minilm")
    assert (mini.cls_token_id, mini.sep_token_id) == (tok.cls_token_id, tok.sep_token_id)
    assert mini.bert.hidden_size == 384
    model = nnx.eval_shape(lambda: build_model(mini, rngs=nnx.Rngs(0)))
    bert_json = model.bert_config_dict()
    assert BertConfig.from_hf(bert_json) == mini.bert
    rebuilt = model_config(
        {"text_model": "/nonexistent/folder", "bert": bert_json, "video_layers": 6}
    )
    assert rebuilt.bert == mini.bert and rebuilt.cls_token_id == tok.cls_token_id


def test_with_compute_changes_settings_not_architecture():
    c = model_config(dict(text_model="bert-base-cased", video_layers=2, max_frames=64))
    d = c.with_compute(
        dtype="bfloat16", remat=True, attention="auto", hidden_dropout=0, attention_dropout=0.3
    )
    assert (d.dtype, d.remat, d.attention) == ("bfloat16", True, "auto")
    assert (d.bert.hidden_dropout_prob, d.bert.attention_probs_dropout_prob) == (0.0, 0.3)
    assert d.with_compute() is d  # None keeps every setting
    same_shapes = d.bert.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    assert same_shapes == c.bert
    assert (d.video_layers, d.max_frames, d.projection) == (c.video_layers, 64, c.projection)
    # The section's dropout keys take the same path.
    assert model_config(dict(text_model="bert-base-cased", hidden_dropout=0)).bert == (
        c.bert.replace(hidden_dropout_prob=0.0)
    )
    with pytest.raises(UserError, match="cudnn"):
        c.with_compute(attention="cudnn")  # float32 has no cuDNN kernel: validated again
    assert c.bert_config_dict() == {
        "model_type": "bert",
        **c.bert.to_dict(),
        "cls_token_id": 101,
        "sep_token_id": 102,
    }


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(projection="mlp"), "projection"),
        (dict(video_layers=13), "video_layers"),
        (dict(max_frames=511), "positions"),
        (dict(dtype="float8"), "dtype"),
        (dict(attention="flash"), "attention"),
        (dict(attention="cudnn", dtype="float32"), "cudnn"),
    ],
)
def test_model_config_rejects_bad_values(change, match):
    cfg = dict(text_model="bert-base-cased", **change)
    with pytest.raises(UserError, match=match):
        model_config(cfg)


# ------------------------------------------------------------------------- forward behaviour
@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def test_pose_padding_invariance(tiny):
    rng = np.random.default_rng(0)
    pose = random_pose(rng, 3, 12)
    lengths = np.array([12, 5, 1])
    mask12 = np.arange(12)[None] < lengths[:, None]
    pose = np.where(mask12[..., None], pose, 0)
    full = embed_pose(tiny, pad(pose, 32), np.pad(mask12, ((0, 0), (0, 20))))
    bucket = embed_pose(tiny, pad(pose, 16), np.pad(mask12, ((0, 0), (0, 4))))
    exact = embed_pose(tiny, pose, mask12)
    assert full.shape == (3, 32) and full.dtype == jnp.float32
    for other in (bucket, exact):
        np.testing.assert_allclose(other, full, atol=1e-5, rtol=0)
    # garbage (and non-finite) values in padded frames change nothing
    noisy = pad(pose, 32, value=7.0)
    noisy[~np.pad(mask12, ((0, 0), (0, 20)))] = rng.normal(size=(3 * 32 - 18, 609)) * 50
    noisy[1, 20] = np.nan
    noisy_out = embed_pose(tiny, noisy, np.pad(mask12, ((0, 0), (0, 20))))
    np.testing.assert_allclose(noisy_out, full, atol=1e-5, rtol=0)
    # ...while real frames do matter (the test can fail)
    moved = pose.copy()
    moved[1, 2] += 1.0
    assert np.abs(embed_pose(tiny, moved, mask12) - exact).max() > 1e-3


def test_sep_keeps_position_max_frames_plus_one(tiny):
    """Changing position row max_frames+1 changes every pose embedding; rows after the bucket
    length up to max_frames do not matter."""
    rng = np.random.default_rng(1)
    pose = random_pose(rng, 2, 10)
    mask = np.ones((2, 10), bool)
    base = embed_pose(tiny, pose, mask)
    table = tiny.video_encoder.bert.embeddings.position_embeddings.embedding
    saved = table[...]
    # (not a constant shift: the embedding LayerNorm would remove it)
    bump = jnp.asarray(rng.normal(size=saved.shape[-1]), jnp.float32)
    try:
        table.set_value(saved.at[11:33].add(bump))  # rows between the frames and [SEP]
        np.testing.assert_allclose(embed_pose(tiny, pose, mask), base, atol=1e-6)
        table.set_value(saved.at[33].add(bump))  # the [SEP] row, max_frames + 1
        assert np.abs(embed_pose(tiny, pose, mask) - base).max() > 1e-3
    finally:
        table.set_value(saved)


def test_text_padding_invariance_and_pooling(tiny):
    rng = np.random.default_rng(2)
    lengths = np.array([6, 3, 2])  # [CLS] + words + [SEP]
    ids = rng.integers(1, 120, size=(3, 16)).astype(np.int32)
    mask = np.arange(16)[None] < lengths[:, None]
    ids[~mask] = 0
    full = embed_text(tiny, ids, mask)
    short = embed_text(tiny, ids[:, :8], mask[:, :8])
    np.testing.assert_allclose(short, full, atol=1e-5, rtol=0)
    garbage = np.where(mask, ids, rng.integers(0, 120, size=ids.shape)).astype(np.int32)
    np.testing.assert_allclose(embed_text(tiny, garbage, mask), full, atol=1e-5, rtol=0)
    # pooling: mean over positions 1..len-1 of the last hidden state ([CLS] out, [SEP] in)
    hidden = np.asarray(nnx.jit(lambda m, i, k: m.text_encoder(i, k))(tiny, ids, mask))
    manual = np.stack([hidden[b, 1 : lengths[b]].mean(0) for b in range(3)])
    np.testing.assert_allclose(full, manual, atol=1e-5, rtol=0)


def test_video_pooling_excludes_cls_includes_sep(tiny):
    rng = np.random.default_rng(3)
    pose = random_pose(rng, 1, 6)
    mask = np.array([[True] * 4 + [False] * 2])
    out = embed_pose(tiny, pose, mask)
    # rebuild the sequence by hand from the spec and pool positions 1..4 and the [SEP]
    bert = tiny.video_encoder.bert

    def hidden_fn(m, pose):
        frames = m.video_encoder.videomlp(pose)
        word = m.video_encoder.bert.embeddings.word_embeddings.embedding[...]
        seq = jnp.concatenate([word[None, 101:102], frames, word[None, 102:103]], axis=1)
        pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 33]])
        attn = jnp.array([[True] * 5 + [False] * 2 + [True]])
        return m.video_encoder.bert(None, attn, inputs_embeds=seq, position_ids=pos)

    hidden = np.asarray(nnx.jit(hidden_fn)(tiny, pose))
    manual = hidden[0, [1, 2, 3, 4, 7]].mean(0)
    np.testing.assert_allclose(out[0], manual, atol=1e-5, rtol=0)
    assert bert is tiny.video_encoder.bert


def test_call_and_projection_heads():
    rng = np.random.default_rng(4)
    batch = dict(
        pose=random_pose(rng, 2, 8),
        pose_mask=np.ones((2, 8), bool),
        text_ids=np.array([[101, 5, 6, 102], [101, 7, 102, 0]], np.int32),
        text_mask=np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool),
    )
    l2 = tiny_model(seed=5, projection="linear_l2")
    lin = tiny_model(seed=5, projection="linear")
    pv, tv = nnx.jit(lambda m, b: m(b))(l2, batch)
    np.testing.assert_allclose(np.linalg.norm(pv, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tv, axis=-1), 1.0, rtol=1e-5)
    pv2, _ = nnx.jit(lambda m, b: m(b))(lin, batch)
    np.testing.assert_allclose(pv2 / np.linalg.norm(pv2, axis=-1, keepdims=True), pv, atol=1e-5)
    assert not np.allclose(np.linalg.norm(pv2, axis=-1), 1.0)
    with pytest.raises(ValueError, match="max_frames"):
        lin.embed_pose(random_pose(rng, 1, 33), np.ones((1, 33), bool))


def test_dropout_modes(tiny):
    model = tiny_model(seed=6, hidden_dropout=0.2)
    rng = np.random.default_rng(5)
    pose, mask = random_pose(rng, 2, 8), np.ones((2, 8), bool)
    a = embed_pose(model, pose, mask)
    model.train()
    b, c = embed_pose(model, pose, mask), embed_pose(model, pose, mask)
    model.eval()
    assert not np.allclose(b, c) and not np.allclose(a, b)
    np.testing.assert_array_equal(embed_pose(model, pose, mask), a)


# ------------------------------------------------------------------ pretrained and precision
@pytest.fixture(scope="module")
def minilm_pair():
    cfg = ml_collections.ConfigDict(dict(text_model="minilm", video_layers=3, max_frames=64))
    f32 = build_model(cfg, rngs=nnx.Rngs(0))
    report = init_from_pretrained(f32, "minilm")
    cfg.dtype = "bfloat16"
    bf16 = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    return f32, bf16, report


def test_init_from_pretrained(minilm_pair):
    model, _, report = minilm_pair
    tensors, _ = read_checkpoint("minilm")
    assert report.text.unused == ["embeddings.position_ids"]
    unused_layers = {
        re.match(r"encoder\.layer\.(\d+)\.", k)[1]
        for k in report.video.unused
        if k.startswith("encoder.")
    }
    assert unused_layers == {"3", "4", "5"}
    assert "pooler.dense.weight" in report.video.loaded  # kept for export
    sd = to_state_dict(model)
    for key in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.2.output.dense.weight",
        "pooler.dense.bias",
    ):
        np.testing.assert_array_equal(sd["video_encoder.bert." + key], tensors[key])
        np.testing.assert_array_equal(sd["text_encoder." + key], tensors[key])
    np.testing.assert_array_equal(
        sd["text_encoder.encoder.layer.5.output.dense.weight"],
        tensors["encoder.layer.5.output.dense.weight"],
    )
    assert "video_encoder.videomlp.linear1.weight" in report.not_from_checkpoint
    # frame MLP: HF init N(0, 0.02), zero biases, LayerNorm 1/0
    w = sd["video_encoder.videomlp.linear1.weight"]
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert not sd["video_encoder.videomlp.linear2.bias"].any()
    assert (sd["video_encoder.videomlp.LayerNorm.weight"] == 1).all()
    depth2 = build_model(dict(text_model="minilm", video_layers=2, max_frames=64), rngs=nnx.Rngs(0))
    before = to_state_dict(depth2)["video_encoder.videomlp.linear1.weight"]
    assert len(init_from_pretrained(depth2, "minilm").video.unused) == 4 * 16 + 1
    init_from_pretrained(depth2, "minilm", rng=jax.random.key(9))  # re-draws the frame MLP
    after = to_state_dict(depth2)["video_encoder.videomlp.linear1.weight"]
    assert not np.allclose(before, after) and abs(after.std() - 0.02) < 0.001


def rel_err_and_cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return rel.max(), cos.min()


def test_bfloat16_compute_close_to_float32(minilm_pair):
    f32, bf16, _ = minilm_pair
    assert bf16.text_encoder.encoder.layer[0].attention.self.query.kernel[...].dtype == jnp.float32
    tok = load_tokenizer("minilm")
    ids, mask = encode_texts(tok, ["<en> <ase> house", "<en> <gsg> Haus", "sad", "a " * 70])
    rng = np.random.default_rng(7)
    pose = random_pose(rng, 3, 64)
    pmask = np.arange(64)[None] < np.array([[64], [30], [3]])
    with jax.default_matmul_precision("float32"):
        t32, p32 = embed_text(f32, ids, mask), embed_pose(f32, pose, pmask)
    t16, p16 = embed_text(bf16, ids, mask), embed_pose(bf16, pose, pmask)
    assert t16.dtype == p16.dtype == jnp.float32
    t_rel, t_cos = rel_err_and_cos(t32, t16)
    p_rel, p_cos = rel_err_and_cos(p32, p16)
    print(
        f"bf16 vs fp32 (MiniLM): text rel {t_rel:.2e} cos {t_cos:.6f}; "
        f"pose rel {p_rel:.2e} cos {p_cos:.6f}"
    )
    # measured on CPU: text rel 1.3e-2, cos 0.99993; pose rel 6.5e-3, cos 0.99998
    assert t_rel < 3e-2 and p_rel < 3e-2
    assert t_cos > 0.9995 and p_cos > 0.9995


def test_16_bit_models_embed_16_bit_poses_exactly_as_float32_poses():
    # Why data.pose_dtype "auto" sends a bf16/fp16 model its poses in that dtype: the first
    # thing the model does with them is cast them to it, so nothing changes, bit for bit.
    rng = np.random.default_rng(4)
    pose = random_pose(rng, 3, 32) * 7  # a wide range, so rounding differs between dtypes
    pose[1, 30] = np.nan  # in a padded frame: masked out either way
    mask = np.arange(32)[None] < np.array([[32], [17], [1]])
    for dtype in (jnp.bfloat16,):  # float16 matmuls do not run on CPU
        model = tiny_model(seed=9, dtype=jnp.dtype(dtype).name)
        wide = embed_pose(model, pose, mask)
        narrow = embed_pose(model, pose.astype(dtype), mask)
        assert bool(jnp.isfinite(wide).all())
        np.testing.assert_array_equal(np.asarray(narrow), np.asarray(wide))
        assert not np.array_equal(pose.astype(dtype).astype(np.float32), pose)  # rounding bites


def test_cudnn_attention_path_passes_sequence_lengths(monkeypatch):
    """No GPU here: route the cuDNN call to XLA and check what the model hands it: sequence
    lengths and no mask (the valid-prefix layout), an even length in every layer (the odd
    sequences here, 7 frames + 2 and 5 tokens, are padded once at the input)."""
    xla_model = tiny_model(seed=8, dtype="bfloat16", attention="xla")
    cudnn_model = tiny_model(seed=8, dtype="bfloat16", attention="cudnn")
    real = jax.nn.dot_product_attention
    seen = []

    def fake(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        if implementation == "cudnn":
            assert bias is None and mask is None and q.shape[1] % 2 == 0
            seen.append((q.shape[1], [int(n) for n in kw["key_value_seq_lengths"]]))
            implementation = "xla"
        return real(q, k, v, bias, mask, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    rng = np.random.default_rng(9)
    pose = random_pose(rng, 2, 7)
    mask = np.array([[True] * 7, [True] * 3 + [False] * 4])
    ids = np.array([[101, 5, 6, 8, 102], [101, 7, 102, 0, 0]], np.int32)
    tmask = ids > 0
    for a, b in zip(
        embed_both(xla_model, pose, mask, ids, tmask),
        embed_both(cudnn_model, pose, mask, ids, tmask),
    ):
        np.testing.assert_array_equal(a, b)
    # every layer of both towers went through the cuDNN branch, with the rows' lengths
    assert seen == [(10, [9, 5])] * 2 + [(6, [5, 3])] * 3
