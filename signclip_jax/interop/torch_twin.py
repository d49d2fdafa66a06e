"""PyTorch twin of SignCLIP, built on transformers' BertModel, with the original's state_dict keys.

`TorchSignCLIP(config).state_dict()` has exactly the keys of the original `MMFusionSeparate`
(reference section 8.2): `video_encoder.videomlp.*`, `video_encoder.bert.*` (a BertModel fed
`inputs_embeds`), `text_encoder.*` (a BertModel), and `{video,text}_projection.linear.weight`
for projection variants. It needs only torch, transformers and numpy: a release can ship it
without JAX. The JAX <-> torch copies (`jax_to_torch_state_dict`, `load_torch_state_dict`)
import JAX lazily.

Release folders (`python -m signclip_jax.convert to-pytorch --format=hf`, or
`TorchSignCLIP.save_pretrained`): `model.safetensors` (the original state_dict keys, no
`mmmodel.` prefix), `config.json` (format tag and version, the model config with its BERT
config, the input settings), the tokenizer files and the model card (README.md). The format
and its torch-free reading live in interop/release.py. `TorchSignCLIP.from_pretrained(DIR)`
(or `"hf-hub:ORG/NAME[@REVISION]"`) reads them back and `.embed_texts` / `.embed_poses` embed
with plain PyTorch (no JAX import).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from signclip_jax import __version__, models
from signclip_jax.data.pose import PoseSpec, load_features
from signclip_jax.data.text import encode_texts, load_tokenizer
from signclip_jax.errors import DataError, UserError

# The release folder format and its torch-free helpers live in interop/release.py (the JAX side
# reads releases without torch); the names stay importable from here.
from signclip_jax.interop.release import (  # noqa: F401 (re-exported)
    HF_CONFIG,
    HF_FORMAT,
    HF_FORMAT_VERSION,
    HF_WEIGHTS,
    MODEL_CARD,
    TOKENIZER_FILES,
    check_floating,
    check_output,
    check_state_dict,
    has_tokenizer,
    read_pretrained_config,
    staged_output,
)

TORCH_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}

log = logging.getLogger("signclip_jax.torch_twin")

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
        # What `embed_texts` / `embed_poses` need; `from_pretrained` fills them from the folder.
        self.tokenizer = None
        self.inputs = default_inputs(c)

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

    # -- release folders ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        attn_implementation: str = "eager",
        dtype: str | torch.dtype = torch.float32,
    ) -> TorchSignCLIP:
        """A release folder (model.safetensors + config.json + tokenizer) -> twin in eval mode.

        `path`: the folder, or `hf-hub:ORG/NAME[@REVISION]`, a release on the Hugging Face Hub
        (fetched through huggingface_hub: its cache, HF_HUB_OFFLINE, proxies, token).
        Loads strictly (every tensor of the original layout, nothing else; float tensors only).
        fp16 weights are upcast to `dtype` (fp32 by default). The tokenizer is the folder's;
        a folder without one gets its text model's (a warning says which), or none (a warning:
        `embed_texts` then refuses, `embed_poses` works).
        """
        if models.is_hub_ref(path):
            path = models.hub_snapshot(str(path))
        config = read_pretrained_config(path)
        twin = cls(config["model"], attn_implementation)
        weights = read_pretrained_weights(path)
        check_state_dict(twin.state_dict(), weights, source=str(Path(path) / HF_WEIGHTS))
        twin.load_state_dict(weights, strict=True)
        twin = twin.to(torch_dtype(dtype)).eval()
        twin.inputs = {**twin.inputs, **config.get("inputs", {})}
        if has_tokenizer(path):
            twin.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        else:
            twin.tokenizer = _fallback_tokenizer(path, config["model"].get("text_model"))
        return twin

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "fp32",
        tokenizer=None,
        force: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Writes a release folder (atomically; an existing `path` only with force=True)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        config = pretrained_config(self.config, inputs=self.inputs, dtype=dtype, extra=extra)
        return write_pretrained(path, self.state_dict(), config, tokenizer=tokenizer, force=force)

    # -- embedding ----------------------------------------------------------------------------

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Strings used as given (write the prompt yourself, e.g. "<en> <ase> house")
        -> [N, H] float32, tokenised as in training (`inputs["text_max_len"]`)."""
        if self.tokenizer is None:
            raise UserError("this twin has no tokenizer (load it with from_pretrained(DIR))")
        texts = [str(t) for t in texts]
        device = next(self.parameters()).device
        out = np.zeros((len(texts), self.config["bert"]["hidden_size"]), np.float32)
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_texts(
                self.tokenizer, texts[start : start + batch_size], int(self.inputs["text_max_len"])
            )
            emb = self.forward_text(
                torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            )
            out[start : start + len(ids)] = emb.float().cpu().numpy()
        return out

    @torch.no_grad()
    def embed_features(self, features: Sequence[np.ndarray], *, batch_size: int = 16) -> np.ndarray:
        """Pose features [T_i, D] each -> [N, H] float32. The first max_frames frames of each;
        every pose has its own mask, so its embedding does not depend on its batch-mates."""
        max_frames = int(self.config["max_frames"])
        dim = int(self.config["pose_dim"])
        device = next(self.parameters()).device
        out = np.zeros((len(features), self.config["bert"]["hidden_size"]), np.float32)
        for start in range(0, len(features), batch_size):
            chunk = [
                np.asarray(f, np.float32)[:max_frames] for f in features[start : start + batch_size]
            ]
            for i, f in enumerate(chunk):
                if f.ndim != 2 or f.shape[1] != dim or f.shape[0] == 0:
                    raise DataError(
                        f"pose {start + i}: features of shape {f.shape}, expected [T >= 1, {dim}]"
                    )
            length = max(f.shape[0] for f in chunk)
            pose = np.zeros((len(chunk), length, dim), np.float32)
            mask = np.zeros((len(chunk), length), bool)
            for i, f in enumerate(chunk):
                pose[i, : len(f)] = f
                mask[i, : len(f)] = True
            pose_t = torch.from_numpy(pose).to(device=device, dtype=self._param_dtype())
            emb = self.forward_video(pose_t, torch.from_numpy(mask).to(device))
            out[start : start + len(chunk)] = emb.float().cpu().numpy()
        return out

    def embed_poses(
        self, sources: Sequence[str | os.PathLike | bytes], *, batch_size: int = 16
    ) -> np.ndarray:
        """`.pose` paths or bytes -> [N, H] float32 (features as in training: `inputs`)."""
        spec = PoseSpec(
            components=str(self.inputs["pose_components"]),
            include_z=bool(self.inputs["include_z"]),
            max_frames=int(self.config["max_frames"]),
        )
        return self.embed_features([load_features(s, spec) for s in sources], batch_size=batch_size)


# ------------------------------------------------------------------------------ JAX <-> torch
def jax_to_torch_state_dict(model) -> dict[str, torch.Tensor]:
    """A JAX SignCLIP's parameters as an original-layout PyTorch state_dict (fp32 tensors)."""
    from signclip_jax.model.signclip import to_state_dict  # JAX: the twin runs without it

    return {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(model).items()}


def load_torch_state_dict(
    model, state_dict: Mapping[str, Any], *, source: str = "torch state_dict"
):
    """Copies an original-layout state_dict (torch tensors or arrays; `mmmodel.` prefix and
    position_ids buffers tolerated) into a JAX SignCLIP, strictly. Returns the LoadReport."""
    from signclip_jax.model.signclip import from_state_dict  # JAX: the twin runs without it

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


# ------------------------------------------------------------------------------ release folders
def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "fp32"/"float32"/"fp16"/"float16" or a torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise UserError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def default_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Input settings of the original recipe, for a model config without saved ones."""
    return {
        "max_frames": int(config["max_frames"]),
        "pose_components": "reduced_face",
        "include_z": True,
        "prompt_template": "spreadthesign",
        "text_max_len": 64,
    }


def pretrained_config(
    model_config,
    *,
    inputs: Mapping[str, Any],
    dtype: str | torch.dtype = "fp32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json of a release folder: format tag and version, the model config (with its
    BERT config), the input settings, the weights' dtype, plus `extra` (loss, training config,
    source...)."""
    return {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "architectures": ["TorchSignCLIP"],
        "signclip_jax_version": __version__,
        "torch_dtype": str(torch_dtype(dtype)).removeprefix("torch."),
        "model": _as_dict(model_config),
        "inputs": dict(inputs),
        **dict(extra or {}),
    }


def write_pretrained(
    path: str | os.PathLike,
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    tokenizer=None,
    card: str | None = None,
    force: bool = False,
) -> Path:
    """Writes a release folder: model.safetensors (tensors as given: torch or numpy, in the
    dtype of config["torch_dtype"]), config.json, tokenizer files and, given `card`, the model
    card README.md (interop/model_card.py). Atomic (staged_output)."""
    dtype = torch_dtype(config.get("torch_dtype", "float32"))
    tensors = {}
    for key, value in state_dict.items():
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        t = t.detach().cpu()
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    with staged_output(path, force=force, directory=True) as tmp:
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        (tmp / HF_WEIGHTS).chmod(0o666 & ~umask)  # safetensors writes it private (0600)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if card is not None:
            (tmp / MODEL_CARD).write_text(card)
    return Path(path)


def read_pretrained_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """model.safetensors of a release folder as torch tensors (dtype as stored).

    Every tensor of a release is a float parameter: an integer one is a DataError naming it.
    """
    file = Path(path) / HF_WEIGHTS
    if not file.is_file():
        raise UserError(f"{path} has no {HF_WEIGHTS}")
    try:
        weights = load_file(str(file))
    except Exception as e:
        raise DataError(f"cannot read {file}: {e}") from None
    check_floating(weights, source=str(file))
    return weights


def _fallback_tokenizer(path: str | os.PathLike, text_model: str | None):
    """The tokenizer of the release's text model (a warning says so), or None with a warning."""
    missing = f"{path} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})"
    try:
        if not text_model:
            raise UserError("its config names no text model")
        tokenizer = load_tokenizer(str(text_model))
    except UserError as e:
        log.warning("%s, nor one of its text model (%s): set .tokenizer to embed texts", missing, e)
        return None
    log.warning("%s: using the tokenizer of its text model %r instead", missing, text_model)
    return tokenizer
