"""SignCLIP: the two towers of the original `MMFusionSeparate` (reference section 1).

video: pose [B, L, D] -> frame MLP -> [CLS] + frames + [SEP] -> BERT (first N layers) -> mean
text:  ids [B, S] ([CLS] tokens [SEP] [PAD]...) -> BERT -> mean
Both means exclude [CLS] and include [SEP]; optional bias-free projections (+ L2 norm).

Valid-prefix layout: in both towers the valid tokens of a row are a prefix ([SEP] of the video
tower sits right after the last frame, with the position id the original gives it), so the
padding is described by one length per row: attention takes sequence lengths and pooling
follows from them. The result equals the original layout's ([SEP] after the padding).

Packed layout (training, data/clip_packing.py): several clips share a row of the video
tower, each with its own [CLS], frames and [SEP] and the position ids above; attention is
block-diagonal by segment id and pooling is per segment (`embed_pose_packed`), giving the
same [B, H] as `embed_pose`. Evaluation, serving and export keep the unpacked path.

Parameter paths mirror the original state_dict keys (section 8.2), e.g.
`video_encoder.videomlp.linear1.weight`, `video_encoder.bert.encoder.layer.0...`,
`text_encoder.embeddings.word_embeddings.weight`, `video_projection.linear.weight`, so
`to_state_dict`/`from_state_dict` are a rename plus a transpose of Linear weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from signclip_jax import config as config_lib
from signclip_jax.data.text import load_tokenizer
from signclip_jax.errors import DataError, UserError
from signclip_jax.model.bert import (
    PRESET_SPECIAL_IDS,
    PRESETS,
    BertConfig,
    BertModel,
    Dense,
    LayerNorm,
    LoadReport,
    export_state,
    import_state,
    normalize_bert_keys,
    read_checkpoint,
)

PROJECTIONS = ("none", "linear", "linear_l2")
ATTENTIONS = ("xla", "cudnn", "auto", "pallas")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FRAME_MLP_LN_EPS = 1e-5  # torch.nn.LayerNorm default in VideoTokenMLP, not BERT's 1e-12


@dataclasses.dataclass(frozen=True)
class SignCLIPConfig:
    """Everything needed to build the network, without hub access (JSON-serialisable)."""

    bert: BertConfig
    video_layers: int = 12
    projection: str = "none"
    pose_dim: int = 609
    max_frames: int = 256
    dtype: str = "float32"
    remat: bool = False
    attention: str = "xla"
    cls_token_id: int = 101
    sep_token_id: int = 102
    text_model: str = "bert-base-cased"

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise UserError(
                f"model.projection must be one of {PROJECTIONS}, got {self.projection!r}"
            )
        if self.attention not in ATTENTIONS:
            raise UserError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model.attention='cudnn' needs model.dtype bfloat16 or float16 (cuDNN fused "
                "attention has no float32 kernel); use 'auto' to fall back to XLA"
            )
        if not 1 <= self.video_layers <= self.bert.num_hidden_layers:
            raise UserError(
                f"model.video_layers={self.video_layers}: must be 1..{self.bert.num_hidden_layers} "
                f"(the video tower takes the first layers of {self.text_model!r})"
            )
        if self.max_frames + 2 > self.bert.max_position_embeddings:
            raise UserError(
                f"max_frames={self.max_frames} needs {self.max_frames + 2} positions but "
                f"{self.text_model!r} has {self.bert.max_position_embeddings}"
            )
        if self.pose_dim < 1:
            raise UserError(f"model.pose_dim must be positive, got {self.pose_dim}")
        for name in ("cls_token_id", "sep_token_id"):
            if not 0 <= getattr(self, name) < self.bert.vocab_size:
                raise UserError(f"{name}={getattr(self, name)} outside the vocabulary")

    @property
    def video_bert(self) -> BertConfig:
        return self.bert.replace(num_hidden_layers=self.video_layers)

    @property
    def hidden_size(self) -> int:
        return self.bert.hidden_size

    def with_compute(
        self,
        *,
        dtype: str | None = None,
        remat: bool | None = None,
        attention: str | None = None,
        hidden_dropout: float | None = None,
        attention_dropout: float | None = None,
    ) -> SignCLIPConfig:
        """This architecture with other compute settings (None keeps the current one).

        What a restored or fine-tuned model may change without touching its parameters: the
        compute dtype, rematerialisation, the attention kernel and the BERT dropout rates.
        """
        bert = {
            "hidden_dropout_prob": hidden_dropout,
            "attention_probs_dropout_prob": attention_dropout,
        }
        bert = {k: float(v) for k, v in bert.items() if v is not None}
        changes = {"dtype": dtype, "remat": remat, "attention": attention}
        changes = {k: v for k, v in changes.items() if v is not None}
        if bert:
            changes["bert"] = self.bert.replace(**bert)
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bert"] = self.bert.to_dict()
        return d

    def bert_config_dict(self) -> dict[str, Any]:
        """The text BERT's config (HF config.json field names) plus the [CLS]/[SEP] ids the
        video tower embeds (a run's bert_config.json); `BertConfig.from_hf(d)` reads it back."""
        return {
            "model_type": "bert",
            **self.bert.to_dict(),
            "cls_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SignCLIPConfig:
        """Strict inverse of `to_dict` (an unknown field is a TypeError)."""
        d = dict(d)
        d["bert"] = BertConfig.from_hf(d["bert"])
        return cls(**d)


def model_config(cfg, *, bert_config: BertConfig | None = None, tokenizer=None) -> SignCLIPConfig:
    """SignCLIPConfig of a training config's `model` section: the one parser of that section.

    `cfg` is one of
      - a SignCLIPConfig: returned as is;
      - a whole training config (ConfigDict or dict with a `model` section): that section, with
        `data.max_frames` filling a missing `model.max_frames`;
      - a model section (or plain dict): keys text_model, video_layers, projection, pose_dim,
        max_frames, dtype, remat, attention, optional hidden_dropout / attention_dropout,
        cls_token_id / sep_token_id, bert. `SignCLIPConfig.to_dict()` output is one.
    The BERT: `bert_config`, else the section's `bert` dict (HF config.json field names, as
    `to_dict` / `bert_config_dict` write it: no hub access), else text_model's config.json.
    [CLS]/[SEP] ids: the section's, else the `bert` dict's, else the preset's (bert-base-*),
    else those of `tokenizer` (default: text_model's). Building a model for a run, a step or
    a converted checkpoint goes through signclip_jax/run.py, which calls this.
    """
    if isinstance(cfg, SignCLIPConfig):
        return cfg
    section, data = _model_section(cfg)
    get = lambda key, default=None: config_lib.get(section, key, default)
    text_model = str(get("text_model", "bert-base-cased"))
    bert_dict = get("bert")
    if hasattr(bert_dict, "to_dict"):
        bert_dict = bert_dict.to_dict()
    if bert_config is None:
        bert_config = BertConfig.from_hf(dict(bert_dict) if bert_dict is not None else text_model)
    cls_id, sep_id = _special_ids(section, bert_dict, text_model, tokenizer)
    max_frames = get("max_frames", config_lib.get(data, "max_frames", 256))
    mcfg = SignCLIPConfig(
        bert=bert_config,
        video_layers=int(get("video_layers", bert_config.num_hidden_layers)),
        projection=str(get("projection", "none")),
        pose_dim=int(get("pose_dim", 609)),
        max_frames=int(max_frames),
        dtype=str(get("dtype", "float32")),
        remat=bool(get("remat", False)),
        attention=str(get("attention", "xla")),
        cls_token_id=int(cls_id),
        sep_token_id=int(sep_id),
        text_model=text_model,
    )
    return mcfg.with_compute(
        hidden_dropout=get("hidden_dropout"), attention_dropout=get("attention_dropout")
    )


def _model_section(cfg) -> tuple[Any, Any]:
    """(model section, data section or None) of a whole training config or of a section."""
    model = config_lib.get(cfg, "model")
    if model is not None and hasattr(model, "get"):  # a whole training config
        return model, config_lib.get(cfg, "data")
    return cfg, None


def _special_ids(section, bert_dict, text_model: str, tokenizer) -> tuple[int, int]:
    """[CLS]/[SEP] ids: the section's, the bert dict's, the preset's or the tokenizer's."""
    ids = config_lib.get(section, "cls_token_id"), config_lib.get(section, "sep_token_id")
    if None in ids and bert_dict is not None:  # bert_config_dict() carries them
        ids = config_lib.get(bert_dict, "cls_token_id"), config_lib.get(bert_dict, "sep_token_id")
    if None not in ids:
        return ids
    if tokenizer is None and text_model in PRESET_SPECIAL_IDS:
        return PRESET_SPECIAL_IDS[text_model]
    tok = tokenizer if tokenizer is not None else load_tokenizer(text_model)
    return tok.cls_token_id, tok.sep_token_id


def _attention_impl(name: str, dtype) -> str | None:
    """Config name -> the BERT attention kernel: a `jax.nn.dot_product_attention`
    implementation, or "pallas" (model/flash_dropout.py: our flash kernel with the hash
    dropout mask; Triton on GPU, Pallas interpret mode elsewhere, which is slow).

    "auto": cuDNN fused attention on GPU with a half-precision compute dtype, else XLA.
    """
    if name in ("xla", "cudnn", "pallas"):
        return name
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


# ------------------------------------------------------------------------------------ modules
class FrameMLP(nnx.Module):
    """`VideoTokenMLP`: Linear(D->H), exact GELU, LayerNorm(eps 1e-5), Linear(H->H)."""

    def __init__(
        self, pose_dim: int, hidden: int, *, std: float = 0.02, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.linear1 = Dense(
            pose_dim, hidden, axes=("pose_in", "embed"), std=std, dtype=dtype, rngs=rngs
        )
        self.LayerNorm = LayerNorm(hidden, eps=FRAME_MLP_LN_EPS, dtype=dtype)
        self.linear2 = Dense(
            hidden,
            hidden,
            axes=("embed", "embed_out"),
            bias_axes=("embed",),
            std=std,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, H]."""
        return self.linear2(self.LayerNorm(jax.nn.gelu(self.linear1(x), approximate=False)))


class VideoEncoder(nnx.Module):
    """`MMBertForEncoder`: frame MLP + a BERT fed embeddings (its model lives under `.bert`)."""

    def __init__(self, c: SignCLIPConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[c.dtype]
        self.videomlp = FrameMLP(
            c.pose_dim, c.hidden_size, std=c.bert.initializer_range, dtype=dtype, rngs=rngs
        )
        self.bert = BertModel(
            c.video_bert,
            attention=_attention_impl(c.attention, dtype),
            remat=c.remat,
            dtype=dtype,
            rngs=rngs,
        )


class Projection(nnx.Module):
    """`Multimodal_Projection`: bias-free Linear(H, H) (torch default init U(±1/sqrt(H)))."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.linear = Dense(hidden, hidden, axes=("embed", "embed_out"), use_bias=False, rngs=rngs)
        bound = 1.0 / np.sqrt(hidden)
        self.linear.kernel.set_value(
            jax.random.uniform(rngs.params(), (hidden, hidden), jnp.float32, -bound, bound)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x)


def masked_mean(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i h_i / sum_i w_i in fp32: hidden [B, S, H], weights [B, S] -> [B, H].

    The denominator is floored at 1 (weights are 0/1 and every real row has >= 1), so fully
    padded dummy rows give 0 instead of NaN.
    """
    w = weights.astype(jnp.float32)
    num = jnp.einsum(
        "bs,bsh->bh", w, hidden.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return num / jnp.maximum(w.sum(-1, keepdims=True), 1.0)


def segment_mean(
    hidden: jax.Array,
    segments: jax.Array,
    weights: jax.Array,
    clip_row: jax.Array,
    clip_segment: jax.Array,
    shards: int = 1,
) -> jax.Array:
    """Per-clip weighted mean of packed rows, in fp32: hidden [R, T, H], segments [R, T] int
    (0 = padding), weights [R, T] (0/1), clip_row / clip_segment [C] int -> [C, H] in clip
    order (clip c is segment clip_segment[c] of row clip_row[c]).

    Each token is mapped to its clip through a table indexed by (row, segment id), whose
    size is static (segment ids are < T + 1), then summed per clip (segment_sum). The
    denominator is floored at 1, as in `masked_mean`.

    shards: the batch's device shards (data/clip_packing.py): block d of the rows holds
    exactly block d of the clips, so each block is pooled on its own (a leading shard axis
    that the batch sharding splits), and no hidden state moves between devices.
    """
    if shards > 1:
        r, c = segments.shape[0], clip_row.shape[0]
        if r % shards or c % shards:
            raise ValueError(f"{r} rows and {c} clips do not split into {shards} batch shards")

        def blocks(x):
            return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])

        pooled = jax.vmap(segment_mean)(
            blocks(hidden), blocks(segments), blocks(weights),
            blocks(clip_row % (r // shards)), blocks(clip_segment),
        )  # fmt: skip
        return pooled.reshape(c, -1)
    r, t = segments.shape
    c = clip_row.shape[0]
    slots = t + 1  # segment ids are 0..T
    table = jnp.full((r * slots,), c, jnp.int32)
    table = table.at[clip_row * slots + clip_segment].set(jnp.arange(c, dtype=jnp.int32))
    token_clip = table[jnp.arange(r, dtype=jnp.int32)[:, None] * slots + segments]  # [R, T]
    w = weights.astype(jnp.float32)
    token_clip = jnp.where(w > 0, token_clip, c).reshape(-1)  # c: a discarded bin
    num = jax.ops.segment_sum(
        (hidden.astype(jnp.float32) * w[..., None]).reshape(r * t, -1), token_clip, c + 1
    )[:c]
    den = jax.ops.segment_sum(w.reshape(-1), token_clip, c + 1)[:c]
    return num / jnp.maximum(den, 1.0)[:, None]


def prefix_lengths(mask: jax.Array) -> jax.Array:
    """Valid-prefix mask [B, L] -> lengths [B] int32 (the number of True entries per row)."""
    return jnp.asarray(mask).astype(bool).sum(-1, dtype=jnp.int32)


class SignCLIP(nnx.Module):
    """The two-tower model. Created in eval mode: `.train()` turns dropout on, `.eval()` off."""

    def __init__(self, config: SignCLIPConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dtype = DTYPES[c.dtype]
        self.video_encoder = VideoEncoder(c, rngs=rngs)
        self.text_encoder = BertModel(
            c.bert,
            attention=_attention_impl(c.attention, dtype),
            remat=c.remat,
            dtype=dtype,
            rngs=rngs,
        )
        if c.projection != "none":
            self.video_projection = Projection(c.hidden_size, rngs=rngs)
            self.text_projection = Projection(c.hidden_size, rngs=rngs)
        else:
            self.video_projection = None
            self.text_projection = None

    def config_dict(self) -> dict[str, Any]:
        """The resolved SignCLIPConfig as JSON-able dict; `model_config(d)` rebuilds it offline."""
        return self.config.to_dict()

    def bert_config_dict(self) -> dict[str, Any]:
        """The text BERT's config plus the [CLS]/[SEP] ids (`SignCLIPConfig.bert_config_dict`)."""
        return self.config.bert_config_dict()

    def _project(self, pooled: jax.Array, head: Projection | None) -> jax.Array:
        if head is None:
            return pooled
        x = head(pooled).astype(jnp.float32)
        if self.config.projection == "linear_l2":  # F.normalize(p=2, dim=1, eps=1e-12)
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x

    def embed_pose(self, pose: jax.Array, pose_mask: jax.Array) -> jax.Array:
        """pose [B, L, D] float (L <= max_frames, zero- or any-padded), pose_mask [B, L] bool
        -> [B, H] float32.

        The valid frames of a row are a prefix (pose_mask[b] = arange(L) < n_b, as the data
        pipeline and the embedder pad): only the count n_b is read. Sequence [CLS] (position
        0), frames 1..n (positions 1..n), [SEP] at index n + 1 with position max_frames + 1
        (the paper-era layout), then padding. Attention is permutation-equivariant given the
        positions, so this equals the original [CLS] + L frames + [SEP] with [SEP] after the
        padding, and any padded length L gives the embedding of L = max_frames.
        """
        c = self.config
        b, length, _ = pose.shape
        if length > c.max_frames:
            raise ValueError(f"pose has {length} frames > max_frames={c.max_frames}")
        frames_n = prefix_lengths(pose_mask)  # [B]
        index = jnp.arange(length + 2, dtype=jnp.int32)[None]  # [1, L + 2] sequence slots
        # Padded frames are out of attention and pooling; zero them so that non-finite padding
        # cannot leak through 0 * NaN in the attention sum.
        pose = jnp.where((index[:, 1:-1] <= frames_n[:, None])[..., None], pose, 0)
        frames = self.video_encoder.videomlp(pose)
        bert = self.video_encoder.bert
        special = bert.embeddings.word_embeddings(jnp.array([c.cls_token_id, c.sep_token_id]))
        cls = jnp.broadcast_to(special[0], (b, 1, special.shape[-1]))
        embeds = jnp.concatenate(
            [cls, frames.astype(jnp.float32), jnp.zeros_like(cls)], axis=1
        )  # [B, L + 2, H]
        is_sep = index == frames_n[:, None] + 1  # [B, L + 2]
        embeds = jnp.where(is_sep[..., None], special[1], embeds)
        positions = jnp.where(is_sep, c.max_frames + 1, index)
        hidden = bert(None, lengths=frames_n + 2, inputs_embeds=embeds, position_ids=positions)
        weights = (index >= 1) & (index <= frames_n[:, None] + 1)  # frames and [SEP]
        return self._project(masked_mean(hidden, weights), self.video_projection)

    def embed_pose_packed(
        self,
        pose: jax.Array,
        segments: jax.Array,
        positions: jax.Array,
        clip_row: jax.Array,
        clip_segment: jax.Array,
        shards: int = 1,
    ) -> jax.Array:
        """Packed rows (data/clip_packing.py) -> the clips' embeddings [C, H] float32, in clip
        order; equal to `embed_pose` of the same clips unpacked. shards: `segment_mean`.

        pose [R, T, D] (frames at their slots), segments [R, T] int (0 = padding, k = the
        row's k-th clip), positions [R, T] int ([CLS] 0, frames 1..n, [SEP] max_frames + 1,
        as `embed_pose` gives them), clip_row / clip_segment [C] int: where clip c sits.
        [CLS] and [SEP] are told apart by their position ids. Attention is block-diagonal by
        segment; pooling is the mean over each clip's frames and [SEP] (`segment_mean`).
        """
        c = self.config
        segments = jnp.asarray(segments, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        real = segments > 0
        is_cls = real & (positions == 0)
        is_sep = real & (positions == c.max_frames + 1)
        is_frame = real & ~is_cls & ~is_sep
        # Zero everything but frames, so that non-finite values cannot leak (as embed_pose).
        pose = jnp.where(is_frame[..., None], pose, 0)
        frames = self.video_encoder.videomlp(pose).astype(jnp.float32)
        bert = self.video_encoder.bert
        special = bert.embeddings.word_embeddings(jnp.array([c.cls_token_id, c.sep_token_id]))
        embeds = jnp.where(is_cls[..., None], special[0], frames)
        embeds = jnp.where(is_sep[..., None], special[1], embeds)
        hidden = bert(None, segment_ids=segments, inputs_embeds=embeds, position_ids=positions)
        pooled = segment_mean(
            hidden, segments, is_frame | is_sep, jnp.asarray(clip_row, jnp.int32),
            jnp.asarray(clip_segment, jnp.int32), shards,
        )  # fmt: skip
        return self._project(pooled, self.video_projection)

    def embed_text(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
        """text_ids [B, S] int ([CLS] tokens [SEP] [PAD]...), text_mask [B, S] bool
        -> [B, H] float32.

        The valid tokens of a row are a prefix (right padding, as the tokenizer pads): only
        their count is read."""
        lengths = prefix_lengths(text_mask)  # [B]
        hidden = self.text_encoder(jnp.asarray(text_ids), lengths=lengths)
        index = jnp.arange(hidden.shape[1], dtype=jnp.int32)[None]
        weights = (index >= 1) & (index < lengths[:, None])  # [CLS] out, final [SEP] in
        return self._project(masked_mean(hidden, weights), self.text_projection)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, shards: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """batch {"pose" [B,L,D], "pose_mask" [B,L], "text_ids" [B,S], "text_mask" [B,S]}
        -> (pose embeddings [B, H], text embeddings [B, H]).

        A packed batch (data/clip_packing.py: "packed_pose" [R,T,D], "packed_segments",
        "packed_positions" [R,T], "clip_row", "clip_segment" [B], captions as above) gives
        the same two [B, H] arrays; `shards`: its batch shards (`segment_mean`)."""
        if "packed_pose" in batch:
            pose = self.embed_pose_packed(
                batch["packed_pose"], batch["packed_segments"], batch["packed_positions"],
                batch["clip_row"], batch["clip_segment"], shards,
            )  # fmt: skip
        else:
            pose = self.embed_pose(batch["pose"], batch["pose_mask"])
        return pose, self.embed_text(batch["text_ids"], batch["text_mask"])


# ------------------------------------------------------------------------------- construction
def build_model(cfg, *, rngs: nnx.Rngs, bert_config: BertConfig | None = None) -> SignCLIP:
    """Randomly initialised SignCLIP (HF-style init: N(0, 0.02), biases 0, LayerNorm 1/0).

    Reads no weights. Use `nnx.eval_shape(lambda: build_model(...))` for shapes only.
    """
    return SignCLIP(model_config(cfg, bert_config=bert_config), rngs=rngs)


def abstract_model(mcfg: SignCLIPConfig) -> SignCLIP:
    """A shape-only SignCLIP (jax.ShapeDtypeStruct leaves): nothing is allocated or drawn."""
    return nnx.eval_shape(lambda: SignCLIP(mcfg, rngs=nnx.Rngs(0)))


@dataclasses.dataclass
class InitReport:
    """`init_from_pretrained` accounting, per tower."""

    text: LoadReport
    video: LoadReport
    not_from_checkpoint: list[str]

    def __str__(self) -> str:
        return (
            f"text tower: {self.text}\nvideo tower: {self.video}\n"
            f"initialised here: {', '.join(self.not_from_checkpoint)}"
        )


def init_from_pretrained(
    model: SignCLIP, name_or_path: str, *, rng: jax.Array | None = None
) -> InitReport:
    """Both towers from one BERT checkpoint, as the original `MMFusion.__init__`.

    Text tower: the whole BertModel (pooler included). Video tower: embeddings, the first
    `video_layers` layers and the pooler (kept for export). The frame MLP and projection heads
    are not in the checkpoint: they keep their random init from `build_model`, or, when `rng`
    is given, are re-drawn (frame MLP N(0, 0.02) with zero biases and LayerNorm 1/0).
    """
    raw, source = read_checkpoint(name_or_path)
    tensors, names = normalize_bert_keys(raw)
    text = import_state(model.text_encoder, tensors, source=source, names=names)
    video = import_state(model.video_encoder.bert, tensors, source=source, names=names)
    fresh = [f"video_encoder.videomlp.{k}" for k in export_state(model.video_encoder.videomlp)]
    for head in ("video_projection", "text_projection"):
        if getattr(model, head) is not None:
            fresh.append(f"{head}.linear.weight")
    if rng is not None:
        reinit_frame_mlp(model, rng)
    return InitReport(text=text, video=video, not_from_checkpoint=fresh)


def reinit_frame_mlp(model: SignCLIP, rng: jax.Array) -> None:
    """HF `_init_weights` for the frame MLP: Linear N(0, initializer_range), biases 0, LN 1/0."""
    mlp = model.video_encoder.videomlp
    std = model.config.bert.initializer_range
    k1, k2 = jax.random.split(rng)
    for lin, key in ((mlp.linear1, k1), (mlp.linear2, k2)):
        lin.kernel.set_value(std * jax.random.normal(key, lin.kernel.shape, jnp.float32))
        lin.bias.set_value(jnp.zeros(lin.bias.shape, jnp.float32))
    mlp.LayerNorm.scale.set_value(jnp.ones(mlp.LayerNorm.scale.shape, jnp.float32))
    mlp.LayerNorm.bias.set_value(jnp.zeros(mlp.LayerNorm.bias.shape, jnp.float32))


# ------------------------------------------------------------------- original state_dict keys
def to_state_dict(model: SignCLIP) -> dict[str, np.ndarray]:
    """The original MMFusionSeparate state_dict (section 8.2 keys, PyTorch layouts) as numpy."""
    return export_state(model)


def from_state_dict(
    model: SignCLIP, state_dict: Mapping[str, Any], *, source: str = "state_dict"
) -> LoadReport:
    """Loads an original-layout state_dict (strict).

    Accepts the fairseq `mmmodel.` prefix; `position_ids` buffers (transformers < 4.31
    checkpoints) are reported unused; fp16 tensors are upcast. Any other missing, extra or
    mis-shaped tensor is an error naming it.
    """
    tensors, names = {}, {}
    for key, value in state_dict.items():
        bare = key[len("mmmodel.") :] if key.startswith("mmmodel.") else key
        tensors[bare] = value
        names[bare] = key
    report = import_state(model, tensors, source=source, names=names)
    extra = [k for k in report.unused if not k.endswith("position_ids")]
    if extra:
        raise DataError(f"cannot load {source}: unexpected tensor(s) {extra}")
    return report


def count_params(model: SignCLIP) -> dict[str, int]:
    """Parameter counts {"video", "text", "projection", "total"}; works on nnx.eval_shape models."""
    counts = {"video": 0, "text": 0, "projection": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.shape))
        part = {"video_encoder": "video", "text_encoder": "text"}.get(path[0], "projection")
        counts[part] += n
    counts["total"] = sum(counts.values())
    return counts


__all__ = [
    "PRESETS",
    "SignCLIP",
    "SignCLIPConfig",
    "abstract_model",
    "build_model",
    "count_params",
    "from_state_dict",
    "init_from_pretrained",
    "masked_mean",
    "model_config",
    "prefix_lengths",
    "segment_mean",
    "to_state_dict",
]
