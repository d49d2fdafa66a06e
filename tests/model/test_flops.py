"""The analytic FLOP count (model/flops.py) against a hand count and the original recipe."""

from __future__ import annotations

import pytest

from signclip_jax.model import flops
from signclip_jax.model.bert import PRESETS, TINY_BERT, BertConfig
from signclip_jax.model.signclip import SignCLIPConfig


def test_train_flops_per_sample():
    # Hand count: H 32, I 64, D 609, 1 video layer over 32 + 2 tokens, 2 text layers over 63.
    tiny = SignCLIPConfig(bert=BertConfig(**TINY_BERT), video_layers=1)
    layer_per_token = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # QKV + output + FFN
    frame_mlp = 2 * 32 * (609 * 32 + 32 * 32)
    video = 1 * 34 * layer_per_token + 1 * 2 * 2 * 34 * 34 * 32  # dense + scores and values
    text = 2 * 63 * layer_per_token + 2 * 2 * 2 * 63 * 63 * 32
    assert flops.train_flops_per_sample(tiny, 32, 63) == 3 * (frame_mlp + video + text)
    parts = flops.forward_flops_per_sample(tiny, 32, 63)
    assert parts["frame_mlp"] == frame_mlp and parts["projection"] == 0
    assert parts["video_dense"] + parts["video_attention"] == video
    assert parts["text_dense"] + parts["text_attention"] == text

    # Projection heads add 2 H^2 per tower.
    proj = SignCLIPConfig(bert=BertConfig(**TINY_BERT), video_layers=1, projection="linear")
    assert (
        flops.train_flops_per_sample(proj, 32, 63) - flops.train_flops_per_sample(tiny, 32, 63)
        == 3 * 2 * 2 * 32 * 32
    )

    # The original recipe: bert-base-cased, 12 video layers, 256 frames, 63 text tokens.
    base = SignCLIPConfig(bert=PRESETS["bert-base-cased"], video_layers=12)
    assert flops.train_flops_per_sample(base, 256, 63) == pytest.approx(173e9, rel=0.02)
    # Fewer frames, fewer FLOPs; attention grows faster than linearly.
    assert flops.train_flops_per_sample(base, 128, 63) < flops.train_flops_per_sample(base, 256, 63)


def test_packed_flops_count_the_rows_and_captions_that_run():
    """A packed step: the video tower over R rows of T tokens (every slot goes through the
    frame MLP), the text tower over B captions of the cut length. One clip of L frames per
    row of L + 2 tokens is the padded count, but for the frame MLP's 2 extra slots."""
    tiny = SignCLIPConfig(bert=BertConfig(**TINY_BERT), video_layers=1, projection="linear")
    rows, clips = 3, 3
    packed = flops.packed_forward_flops(tiny, rows, 34, clips, 16)
    per_clip = flops.forward_flops_per_sample(tiny, 32, 16)
    for part in ("video_dense", "video_attention", "text_dense", "text_attention", "projection"):
        assert packed[part] == clips * per_clip[part], part
    assert packed["frame_mlp"] == clips * per_clip["frame_mlp"] * 34 // 32
    assert flops.packed_train_flops(tiny, rows, 34, clips, 16) == 3 * sum(packed.values())
    # Packing 8 clips into 3 rows costs the rows, not the clips.
    eight = flops.packed_forward_flops(tiny, 3, 34, 8, 16)
    assert eight["video_dense"] == packed["video_dense"]
    assert eight["text_dense"] == 8 * per_clip["text_dense"]
