"""The train step lowers for CUDA and TPU without either (jax.export's cross-platform
lowering). CUDA: bf16, the recipe's attention dropout, padded and packed batches, with XLA
attention and with our Pallas flash kernel through its Triton backend (one forward and two
backward kernels per attention layer). TPU: packed rows through Pallas splash attention with
segment ids (Mosaic). This catches trace-time platform errors before an accelerator session;
it compiles and runs nothing (cuDNN attention cannot be lowered here: jax asks the local
backend for cuDNN's version)."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax import export

from signclip_jax.model import bert, flash_dropout, splash
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import step as step_lib
from tests.helpers import tiny_config


def _step_and_batch(attention: str, packing: bool, attention_dropout: float):
    """The tiny model's bf16 train step on one device, and the shapes of a batch of 8 clips."""
    config = tiny_config(Path("unused"), total_steps=2)
    config.model.dtype = "bfloat16"
    config.model.attention = attention
    config.model.attention_dropout = attention_dropout
    config.data.packing = packing
    mcfg = signclip_model.model_config(config)
    model = signclip_model.SignCLIP(mcfg, rngs=nnx.Rngs(0, dropout=1))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    fns = step_lib.make_train_step(config, model, mesh, ("data", "fsdp"), 2)

    b, length, text = 8, mcfg.max_frames, 24
    frames = np.random.default_rng(0).integers(10, length, b)
    batch = {
        "pose": np.zeros((b, length, mcfg.pose_dim), np.float32),
        "pose_mask": np.arange(length)[None] < frames[:, None],
        "text_ids": np.ones((b, text), np.int32),
        "text_mask": np.repeat(np.arange(text)[None] < 6, b, axis=0),
    }
    layout = step_lib.InputLayout.from_config(config, mcfg.max_frames, local_shards=1)
    batch = layout.inputs(batch)

    def spec(x):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)

    return fns.step, (jax.tree.map(spec, fns.state), jax.tree.map(spec, batch)), mcfg


@pytest.mark.parametrize("attention,packing", [("xla", False), ("pallas", False), ("pallas", True)])
def test_train_step_lowers_for_cuda(monkeypatch, attention, packing):
    monkeypatch.setattr(flash_dropout, "_interpret", lambda: False)  # as on a GPU
    step, args, mcfg = _step_and_batch(attention, packing, attention_dropout=0.1)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(step, platforms=("cuda",), disabled_checks=[triton])(*args)
    kernels = exported.mlir_module().count("__gpu$xla.gpu.triton")
    layers = mcfg.video_layers + mcfg.bert.num_hidden_layers
    assert kernels == (3 * layers if attention == "pallas" else 0)


def test_packed_train_step_lowers_for_tpu_with_splash_attention(monkeypatch):
    monkeypatch.setattr(splash, "_interpret", lambda: False)  # as on a TPU
    monkeypatch.setattr(bert, "_segment_kernel", lambda implementation: "splash")
    step, args, mcfg = _step_and_batch("xla", packing=True, attention_dropout=0.0)
    exported = export.export(step, platforms=("tpu",))(*args)
    # Packed rows are the video tower's: its layers' forward, dQ and dK/dV kernels.
    assert exported.mlir_module().count("tpu_custom_call") == 3 * mcfg.video_layers
