"""PyTorch twin of SignCLIP, built on transformers' BertModel, with the original's state_dict keys.

`TorchSignCLIP(config).state_dict()` has exactly the keys of the original `MMFusionSeparate`
(reference section 8.2): `video_encoder.videomlp.*`, `video_encoder.bert.*` (a BertModel fed
`inputs_embeds`), `text_encoder.*` (a BertModel), and `{video,text}_projection.linear.weight`
for projection variants. It needs only torch, transformers and numpy: a release can ship it
without JAX. The JAX <-> torch copies (`jax_to_torch_state_dict`, `load_torch_state_dict`)
import JAX lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "hidden_act",
    "initializer_range",
    "pad_token_id",
)


def _as_dict(config) -> dict[str, Any]:
    """A SignCLIPConfig or its `to_dict()` form -> plain dict."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    config = dict(config)
    bert = config["bert"]
    config["bert"] = dict(bert.to_dict() if hasattr(bert, "to_dict") else bert)
    return config


def hf_bert_config(
    bert: Mapping[str, Any], num_layers: int | None = None, attn_implementation: str = "eager"
) -> transformers.BertConfig:
    """transformers.BertConfig from our BertConfig fields."""
    kwargs = {k: bert[k] for k in _BERT_FIELDS if k in bert}
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    hf = transformers.BertConfig(**kwargs)
    hf._attn_implementation = attn_implementation
    return hf


class VideoTokenMLP(nn.Module):
    """Linear(D->H), exact GELU, LayerNorm(eps 1e-5), Linear(H->H)."""

    def __init__(self, pose_dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(pose_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-5)
        self.linear2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.LayerNorm(nn.functional.gelu(self.linear1(x))))


class VideoEncoder(nn.Module):
    def __init__(self, config: Mapping[str, Any], attn_implementation: str = "eager"):
        super().__init__()
        hidden = config["bert"]["hidden_size"]
        self.videomlp = VideoTokenMLP(config["pose_dim"], hidden)
        self.bert = transformers.BertModel(
            hf_bert_config(config["bert"], config["video_layers"], attn_implementation),
            add_pooling_layer=True,
        )


class Projection(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _masked_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(hidden.dtype)
    return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


class TorchSignCLIP(nn.Module):
    """The SignCLIP network in PyTorch (eval-mode numerics of the original MMFusionSeparate)."""

    def __init__(self, config, attn_implementation: str = "eager"):
        super().__init__()
        c = _as_dict(config)
        self.config = c
        self.video_encoder = VideoEncoder(c, attn_implementation)
        self.text_encoder = transformers.BertModel(
            hf_bert_config(c["bert"], None, attn_implementation), add_pooling_layer=True
        )
        if c["projection"] != "none":
            self.video_projection = Projection(c["bert"]["hidden_size"])
            self.text_projection = Projection(c["bert"]["hidden_size"])
        else:
            self.video_projection = None
            self.text_projection = None

    def _project(self, x: torch.Tensor, head: Projection | None) -> torch.Tensor:
        if head is None:
            return x
        x = head(x)
        if self.config["projection"] == "linear_l2":
            x = nn.functional.normalize(x, p=2, dim=1)
        return x

    def forward_video(self, vfeats: torch.Tensor, vmasks: torch.Tensor) -> torch.Tensor:
        """vfeats [B, L, D], vmasks [B, L] bool -> [B, H]; [SEP] at position max_frames + 1."""
        c = self.config
        b, length, _ = vfeats.shape
        vmasks = vmasks.bool()
        frames = self.video_encoder.videomlp(vfeats)
        bert = self.video_encoder.bert
        word = bert.embeddings.word_embeddings.weight
        cls = word[c["cls_token_id"]].expand(b, 1, -1)
        sep = word[c["sep_token_id"]].expand(b, 1, -1)
        embeds = torch.cat([cls, frames, sep], dim=1)
        positions = (
            torch.cat([torch.arange(length + 1), torch.tensor([c["max_frames"] + 1])])
            .to(vfeats.device)[None]
            .expand(b, -1)
        )
        ones = torch.ones(b, 1, dtype=torch.bool, device=vfeats.device)
        mask = torch.cat([ones, vmasks, ones], dim=1)
        hidden = bert(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=positions,
            token_type_ids=torch.zeros_like(mask, dtype=torch.long),
        ).last_hidden_state
        weights = torch.cat([torch.zeros_like(ones), vmasks, ones], dim=1)
        return self._project(_masked_mean(hidden, weights), self.video_projection)

    def forward_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, S] ([CLS] tokens [SEP] [PAD]...), mask [B, S] -> [B, H]."""
        ids = ids.long()
        hidden = self.text_encoder(
            input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        weights = mask.bool().clone()
        weights[:, 0] = False
        return self._project(_masked_mean(hidden, weights), self.text_projection)

    def forward(self, pose, pose_mask, text_ids, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_video(pose, pose_mask), self.forward_text(text_ids, text_mask)


# ------------------------------------------------------------------------------ JAX <-> torch
def jax_to_torch_state_dict(model) -> dict[str, torch.Tensor]:
    """A JAX SignCLIP's parameters as an original-layout PyTorch state_dict (fp32 tensors)."""
    from signclip_jax.model.signclip import to_state_dict

    return {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(model).items()}


def load_torch_state_dict(
    model, state_dict: Mapping[str, Any], *, source: str = "torch state_dict"
):
    """Copies an original-layout state_dict (torch tensors or arrays; `mmmodel.` prefix and
    position_ids buffers tolerated) into a JAX SignCLIP, strictly. Returns the LoadReport."""
    from signclip_jax.model.signclip import from_state_dict

    def to_np(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            return (v.float() if v.is_floating_point() else v).numpy()
        return np.asarray(v)

    return from_state_dict(model, {k: to_np(v) for k, v in state_dict.items()}, source=source)


def twin_from_jax(model, attn_implementation: str = "eager") -> TorchSignCLIP:
    """A TorchSignCLIP (eval mode) holding the JAX model's parameters."""
    twin = TorchSignCLIP(model.config, attn_implementation)
    twin.load_state_dict(jax_to_torch_state_dict(model), strict=True)
    return twin.eval()
