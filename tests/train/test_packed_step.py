"""train/step.py on packed batches (data/clip_packing.py): with dropout off, a step on the
packed layout gives the padded layout's loss, gradient norm and updated parameters (fp32),
single-device and sharded with GradCache microbatches."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from signclip_jax.data import clip_packing
from signclip_jax.model.bert import TINY_BERT
from signclip_jax.model.signclip import SignCLIP, model_config
from signclip_jax.tools.bench.plan import caption_lengths, spreadthesign_lengths
from signclip_jax.train import sharding
from signclip_jax.train import step as train_step_lib
from tests.helpers import load_config

B, MAX_FRAMES, TEXT = 8, 40, 24


def _config(microbatches: int):
    config = load_config("demo", "tiny")
    config.model.pretrained = False
    config.model.bert = dict(TINY_BERT)
    config.model.video_layers = 1
    config.model.hidden_dropout = 0.0  # deterministic: the two layouts are comparable
    config.model.attention_dropout = 0.0
    config.data.max_frames = MAX_FRAMES
    config.batch_size = B
    config.microbatches = microbatches
    return config


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = spreadthesign_lengths(rng, B, MAX_FRAMES) // 3 + 1  # short: several per row
    frames[0], frames[1] = MAX_FRAMES, 0  # a full-length clip and an empty one
    pose = rng.normal(size=(B, MAX_FRAMES, 609)).astype(np.float32)
    pose_mask = np.arange(MAX_FRAMES)[None] < frames[:, None]
    texts = caption_lengths(rng, B, TEXT)
    ids = rng.integers(1000, 30000, size=(B, TEXT)).astype(np.int32)
    text_mask = np.arange(TEXT)[None] < texts[:, None]
    ids[~text_mask] = 0
    return {"pose": pose, "pose_mask": pose_mask, "text_ids": ids, "text_mask": text_mask}


def _one_step(config, devices: int, batch: dict[str, np.ndarray]):
    mesh = sharding.make_mesh((devices, 1), devices=jax.devices()[:devices])
    axes = ("data", "fsdp")
    model = SignCLIP(model_config(config), rngs=nnx.Rngs(config.seed))
    fns = train_step_lib.make_train_step(config, model, mesh, axes, total_steps=10)
    inputs = sharding.shard_batch(train_step_lib.model_inputs(batch), mesh, axes)
    with jax.default_matmul_precision("float32"):
        # XLA optimisation level 0: compiles several times faster; numerics are still fp32.
        step = fns.step.lower(fns.state, inputs).compile({"xla_backend_optimization_level": 0})
        state, metrics = step(fns.state, inputs)
    return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("devices,microbatches", [(1, 1), (2, 2)])
def test_packed_step_equals_padded_step(devices, microbatches):
    config = _config(microbatches)
    batch = _batch()
    packed = clip_packing.pack_batch(
        batch, row_len=2 * (MAX_FRAMES + 2), max_frames=MAX_FRAMES, shards=devices,
        microbatches=microbatches, text_multiple=8,
    )  # fmt: skip
    assert packed["packed_pose"].shape[0] < B and packed["text_ids"].shape[1] < TEXT
    params, metrics = _one_step(config, devices, batch)
    pparams, pmetrics = _one_step(config, devices, packed)
    assert abs(float(pmetrics["loss"]) - float(metrics["loss"])) <= 1e-5
    assert float(metrics["grad_norm"]) > 0
    assert abs(float(pmetrics["grad_norm"]) - float(metrics["grad_norm"])) <= 1e-4 * float(
        metrics["grad_norm"]
    )
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pparams))
    )
    assert diff <= 1e-5, diff


def test_model_inputs_keeps_a_packed_batch():
    batch = _batch()
    packed = clip_packing.pack_batch(batch, row_len=MAX_FRAMES + 2, max_frames=MAX_FRAMES)
    packed["index"] = np.arange(B)
    inputs = train_step_lib.model_inputs(packed)
    assert set(inputs) == set(clip_packing.PACKED_INPUTS)
    with pytest.raises(ValueError, match="processes"):
        train_step_lib.model_inputs(packed, length=64)
