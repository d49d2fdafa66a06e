"""PyTorch twin: original state_dict keys, JAX <-> torch copies, whole-model parity, release
folders (save_pretrained / from_pretrained)."""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from signclip_jax.data.pose import load_features, pad_frames
from signclip_jax.data.text import encode_texts, load_tokenizer, render_prompt
from signclip_jax.errors import DataError, UserError
from signclip_jax.interop.torch_twin import (
    TorchSignCLIP,
    jax_to_torch_state_dict,
    load_torch_state_dict,
    twin_from_jax,
)
from signclip_jax.model.signclip import build_model, init_from_pretrained, to_state_dict
from tests.model.test_signclip import TINY_BERT, expected_original_keys

MAX_DIFF = 1e-4  # pooled embeddings, fp32


def tiny(projection="none", seed=0):
    cfg = ml_collections.ConfigDict(
        dict(
            text_model="tiny",
            video_layers=2,
            projection=projection,
            max_frames=32,
            cls_token_id=101,
            sep_token_id=102,
        )
    )
    return build_model(cfg, rngs=nnx.Rngs(seed), bert_config=TINY_BERT)


def random_pose(rng, batch, frames, dim=609):
    """Features of the scale of real ones (std ~0.3, |x| < ~2)."""
    return (rng.normal(size=(batch, frames, dim)) * np.tile([0.35, 0.35, 0.1], dim // 3)).astype(
        np.float32
    )


@nnx.jit
def jax_embed(model, batch):
    return model(batch)


def torch_embed(twin, batch):
    with torch.no_grad():
        v, t = twin(
            *(
                torch.from_numpy(np.asarray(batch[k]))
                for k in ("pose", "pose_mask", "text_ids", "text_mask")
            )
        )
    return v.numpy(), t.numpy()


def max_diffs(model, twin, batch):
    with jax.default_matmul_precision("float32"):
        jv, jt = jax_embed(model, batch)
    tv, tt = torch_embed(twin, batch)
    return float(np.abs(np.asarray(jv) - tv).max()), float(np.abs(np.asarray(jt) - tt).max())


def tiny_batch(rng, frames=32):
    lengths = np.array([32, 9, 1])[:, None]
    ids = rng.integers(1, 120, size=(3, 12)).astype(np.int32)
    text_len = np.array([12, 4, 2])[:, None]
    mask = np.arange(12)[None] < text_len
    ids[:, 0] = 101
    ids[np.arange(3), text_len[:, 0] - 1] = 102
    return dict(
        pose=random_pose(rng, 3, frames),
        pose_mask=np.arange(frames)[None] < lengths,
        text_ids=np.where(mask, ids, 0).astype(np.int32),
        text_mask=mask,
    )


# ------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("projection", ["none", "linear_l2"])
def test_twin_has_the_original_keys(projection):
    model = tiny(projection)
    twin = TorchSignCLIP(model.config)
    sd = twin.state_dict()
    assert set(sd) == expected_original_keys(2, 3, projection != "none")
    ours = to_state_dict(model)
    assert set(ours) == set(sd)
    for k, v in ours.items():
        assert tuple(sd[k].shape) == v.shape, k


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("projection", ["none", "linear", "linear_l2"])
def test_tiny_model_parity(projection):
    model = tiny(projection, seed=1)
    twin = twin_from_jax(model)
    dv, dt = max_diffs(model, twin, tiny_batch(np.random.default_rng(0)))
    assert dv <= MAX_DIFF and dt <= MAX_DIFF, (dv, dt)
    # a bucket shorter than max_frames: the twin puts [SEP] at max_frames + 1 too
    dv16, _ = max_diffs(model, twin, tiny_batch(np.random.default_rng(0), frames=16))
    assert dv16 <= MAX_DIFF


@pytest.fixture(scope="module")
def minilm():
    cfg = ml_collections.ConfigDict(dict(text_model="minilm", video_layers=3, max_frames=256))
    model = build_model(cfg, rngs=nnx.Rngs(0))
    init_from_pretrained(model, "minilm")
    return model, twin_from_jax(model), load_tokenizer("minilm")


def prompts_batch(tok, poses, masks):
    texts = [
        render_prompt("spreadthesign", text="house", signed="ase"),
        render_prompt("spreadthesign", text="Haus", spoken="de", signed="gsg"),
        render_prompt("isolated", text="SAD", signed="bfi"),
    ]
    ids, mask = encode_texts(tok, texts[: len(poses)])
    assert texts[0] == "<en> <ase> house"
    return dict(pose=poses, pose_mask=masks, text_ids=ids, text_mask=mask)


def test_minilm_model_parity_with_prompts(minilm):
    model, twin, tok = minilm
    rng = np.random.default_rng(2)
    lengths = np.array([256, 90, 5])
    batch = prompts_batch(tok, random_pose(rng, 3, 256), np.arange(256)[None] < lengths[:, None])
    dv, dt = max_diffs(model, twin, batch)
    print(f"MiniLM SignCLIP vs torch twin: pose {dv:.2e}, text {dt:.2e}")
    assert dv <= MAX_DIFF and dt <= MAX_DIFF


def test_padded_to_max_frames_is_the_plain_bert_layout(minilm):
    """Spec check independent of our position logic: padded to max_frames, the video tower is a
    plain BertModel over [CLS] + 256 frames + [SEP] with default positions 0..257 (the HEAD
    layout) and weights [0, mask, 1]."""
    model, twin, _ = minilm
    rng = np.random.default_rng(3)
    pose = random_pose(rng, 2, 256)
    vmask = np.arange(256)[None] < np.array([[256], [40]])
    with torch.no_grad():
        frames = twin.video_encoder.videomlp(torch.from_numpy(pose))
        word = twin.video_encoder.bert.embeddings.word_embeddings.weight
        seq = torch.cat([word[101].expand(2, 1, -1), frames, word[102].expand(2, 1, -1)], 1)
        attn = torch.from_numpy(np.pad(vmask, ((0, 0), (1, 1)), constant_values=True)).long()
        hidden = twin.video_encoder.bert(inputs_embeds=seq, attention_mask=attn).last_hidden_state
        w = torch.from_numpy(np.concatenate([np.zeros((2, 1)), vmask, np.ones((2, 1))], 1))
        ref = ((hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True)).float().numpy()
    with jax.default_matmul_precision("float32"):
        ours = nnx.jit(lambda m, p, k: m.embed_pose(p, k))(model, pose, vmask)
    assert np.abs(np.asarray(ours) - ref).max() <= MAX_DIFF


# ------------------------------------------------------------------------ torch -> JAX copies
def test_torch_to_jax_round_trip():
    source = TorchSignCLIP(tiny("linear").config).eval()  # torch's own random init
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = {"mmmodel." + k: v.half() for k, v in source.state_dict().items()}  # fairseq fp16 style
    sd["mmmodel.video_encoder.bert.embeddings.position_ids"] = torch.arange(40)[None]
    sd["mmmodel.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    model = tiny("linear", seed=7)
    report = load_torch_state_dict(model, sd)
    assert sorted(report.unused) == [
        "mmmodel.text_encoder.embeddings.position_ids",
        "mmmodel.video_encoder.bert.embeddings.position_ids",
    ]
    back = jax_to_torch_state_dict(model)
    for k, v in source.state_dict().items():
        assert back[k].dtype == torch.float32
        torch.testing.assert_close(back[k], v.half().float(), rtol=0, atol=0)
    source.load_state_dict(back, strict=True)
    dv, dt = max_diffs(model, source, tiny_batch(np.random.default_rng(4)))
    assert dv <= MAX_DIFF and dt <= MAX_DIFF


def test_load_errors_name_the_tensor():
    model = tiny()
    sd = jax_to_torch_state_dict(model)
    missing = dict(sd)
    del missing["video_encoder.videomlp.LayerNorm.bias"]
    with pytest.raises(DataError, match=r"video_encoder\.videomlp\.LayerNorm\.bias"):
        load_torch_state_dict(model, missing)
    extra = dict(sd, **{"video_projection.linear.weight": torch.zeros(32, 32)})
    with pytest.raises(DataError, match=r"unexpected.*video_projection\.linear\.weight"):
        load_torch_state_dict(model, extra)
    wrong = dict(sd, **{"text_encoder.pooler.dense.weight": torch.zeros(32, 33)})
    with pytest.raises(DataError, match=r"text_encoder\.pooler\.dense\.weight"):
        load_torch_state_dict(model, wrong)


# ------------------------------------------------------------------------------ real poses
@pytest.mark.shared_data
def test_real_poses_parity_and_padding(minilm, shared_pose):
    model, twin, tok = minilm
    names = ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose"]
    feats = [load_features(shared_pose(n)) for n in names]
    padded = [pad_frames(f, 256) for f in feats]
    poses = np.stack([p for p, _ in padded])
    masks = np.stack([m for _, m in padded])
    batch = prompts_batch(tok, poses, masks)
    dv, dt = max_diffs(model, twin, batch)
    print(f"real poses vs torch twin: pose {dv:.2e}, text {dt:.2e}")
    assert dv <= MAX_DIFF and dt <= MAX_DIFF
    # the same clips in a 128-frame bucket embed the same
    with jax.default_matmul_precision("float32"):
        full = jax_embed(model, batch)[0]
        bucket = jax_embed(model, dict(batch, pose=poses[:, :128], pose_mask=masks[:, :128]))[0]
    assert np.abs(np.asarray(full) - np.asarray(bucket)).max() <= 1e-5


# --------------------------------------------------------------------------- release folders
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_save_and_load_pretrained(tmp_path, dtype):
    model = tiny("linear_l2", seed=3)
    twin = twin_from_jax(model)
    twin.tokenizer = load_tokenizer("minilm")
    twin.inputs["text_max_len"] = 12
    folder = twin.save_pretrained(tmp_path / "release", dtype=dtype)
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "signclip-jax/torch-twin" and config["format_version"] == 1
    assert config["torch_dtype"] == ("float16" if dtype == "fp16" else "float32")
    back = TorchSignCLIP.from_pretrained(folder)
    assert back.inputs["text_max_len"] == 12 and back.config["projection"] == "linear_l2"
    for key, value in twin.state_dict().items():
        want = value.half().float() if dtype == "fp16" else value
        torch.testing.assert_close(back.state_dict()[key], want, rtol=0, atol=0)
    texts = ["<en> <ase> house", "<de> <gsg> Haus"]
    np.testing.assert_array_equal(
        encode_texts(back.tokenizer, texts, 12)[0], encode_texts(twin.tokenizer, texts, 12)[0]
    )
    if dtype == "fp32":  # the loaded twin embeds like the JAX model it came from
        rng = np.random.default_rng(6)
        pose = random_pose(rng, 2, 32)
        mask = np.arange(32)[None] < np.array([[32], [7]])
        with jax.default_matmul_precision("float32"):
            ours = np.asarray(nnx.jit(lambda m, p, k: m.embed_pose(p, k))(model, pose, mask))
        theirs = back.embed_features([pose[0], pose[1, :7]])
        assert np.abs(theirs - ours).max() <= MAX_DIFF
    with pytest.raises(UserError, match="already exists"):
        twin.save_pretrained(folder)
    twin.save_pretrained(folder, force=True)


def test_pretrained_folder_errors(tmp_path):
    twin = twin_from_jax(tiny())
    folder = twin.save_pretrained(tmp_path / "r")
    with pytest.raises(UserError, match=r"no config\.json"):
        TorchSignCLIP.from_pretrained(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="format_version 99"):
        TorchSignCLIP.from_pretrained(folder)
    config["model"]["video_layers"] = 1  # the weights hold 2 video layers
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"unexpected.*video_encoder\.bert\.encoder\.layer\.1\."):
        TorchSignCLIP.from_pretrained(folder)
    with pytest.raises(UserError, match="no tokenizer"):
        twin.embed_texts(["x"])


def test_embed_features_is_independent_of_batch_mates():
    twin = twin_from_jax(tiny(seed=4))
    rng = np.random.default_rng(5)
    feats = [random_pose(rng, 1, t)[0] for t in (32, 5, 40)]  # 40 > max_frames: first 32
    together = twin.embed_features(feats, batch_size=3)
    for i, f in enumerate(feats):
        np.testing.assert_allclose(twin.embed_features([f])[0], together[i], atol=1e-5)
    np.testing.assert_allclose(together[2], twin.embed_features([feats[2][:32]])[0], atol=1e-6)
    with pytest.raises(DataError, match="pose 1"):
        twin.embed_features([feats[0], np.zeros((0, 609), np.float32)])
