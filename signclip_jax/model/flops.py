"""Analytic FLOP count of the SignCLIP model: the matmul work of one example, by part.

The benchmark's TFLOP/s and MFU divide these counts by measured step times (see
BENCHMARKS.md, "FLOP count"). Pure arithmetic on the model config: no JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module needs no JAX
    from signclip_jax.model.signclip import SignCLIPConfig


def forward_flops_per_sample(
    model_config: SignCLIPConfig, frames: int, text_len: int
) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one example's forward pass, by part.

    model_config: a SignCLIPConfig. frames: padded pose length L (every padded frame is
    computed); the video BERT sees L + 2 tokens ([CLS], frames, [SEP]). text_len: padded
    caption length S. Per BERT layer and token of a T-token sequence: 2 (4 H^2 + 2 H I) for the
    Q, K, V, output and feed-forward projections, plus 4 T H for the attention scores and
    the probability-weighted values (all heads). Embedding lookups, LayerNorm, GELU, softmax
    and the pooling are not matmuls; the loss (4 B H per example) is negligible and left out.
    """
    bert = model_config.bert
    h, inter = bert.hidden_size, bert.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)

    def tower(tokens: int, layers: int) -> tuple[int, int]:
        return layers * tokens * per_token_layer, layers * 4 * tokens * tokens * h

    video_dense, video_attention = tower(frames + 2, model_config.video_layers)
    text_dense, text_attention = tower(text_len, bert.num_hidden_layers)
    return {
        "frame_mlp": 2 * frames * (model_config.pose_dim * h + h * h),
        "video_dense": video_dense,
        "video_attention": video_attention,
        "text_dense": text_dense,
        "text_attention": text_attention,
        "projection": 2 * 2 * h * h if model_config.projection != "none" else 0,
    }


def train_flops_per_sample(model_config: SignCLIPConfig, frames: int, text_len: int) -> int:
    """Model FLOPs of one training example: 3 x the forward matmul FLOPs (the backward pass
    costs two forwards: gradients w.r.t. activations and w.r.t. weights). Re-computation
    (GradCache's extra forward with microbatches > 1, remat) is not counted: MFU convention.

    bert-base-cased, 12 video layers, 256 frames, 63 text tokens: 173.0 GFLOP.
    """
    return 3 * sum(forward_flops_per_sample(model_config, frames, text_len).values())


def packed_forward_flops(
    model_config: SignCLIPConfig, rows: int, row_len: int, clips: int, text_len: int
) -> dict[str, int]:
    """Matmul FLOPs of one packed batch's forward pass (data/clip_packing.py), by part: the
    video tower over `rows` rows of `row_len` tokens (every slot is computed: [CLS], [SEP]
    and padding go through the frame MLP too), the text tower over `clips` captions of
    `text_len` tokens. Same conventions as `forward_flops_per_sample`; attention is counted
    over the whole row (the kernels compute the block-diagonal mask's zeros too)."""
    bert = model_config.bert
    h, inter = bert.hidden_size, bert.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)
    video_layers, text_layers = model_config.video_layers, bert.num_hidden_layers
    return {
        "frame_mlp": rows * 2 * row_len * (model_config.pose_dim * h + h * h),
        "video_dense": rows * video_layers * row_len * per_token_layer,
        "video_attention": rows * video_layers * 4 * row_len * row_len * h,
        "text_dense": clips * text_layers * text_len * per_token_layer,
        "text_attention": clips * text_layers * 4 * text_len * text_len * h,
        "projection": clips * 2 * 2 * h * h if model_config.projection != "none" else 0,
    }


def packed_train_flops(
    model_config: SignCLIPConfig, rows: int, row_len: int, clips: int, text_len: int
) -> int:
    """Model FLOPs of one packed training step: 3 x `packed_forward_flops`."""
    return 3 * sum(packed_forward_flops(model_config, rows, row_len, clips, text_len).values())


__all__ = [
    "forward_flops_per_sample",
    "packed_forward_flops",
    "packed_train_flops",
    "train_flops_per_sample",
]
