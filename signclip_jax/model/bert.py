"""BERT in Flax NNX with Hugging Face parameter layout and numerics, and HF weight loading.

Module attribute names follow the HF `BertModel` so that a parameter's NNX path maps to its
PyTorch key by joining with "." and renaming the leaf (`hf_key`): e.g.
`('encoder', 'layer', 3, 'attention', 'self', 'query', 'kernel')` <->
`encoder.layer.3.attention.self.query.weight` (transposed: Flax kernels are [in, out]).

Every `nnx.Param` carries `logical_axes` metadata (names, same rank as the value) that the
sharding module maps to mesh axes. They are plain Variable metadata, not `nnx.with_partitioning`,
so modules can be created outside a mesh context.

Precision: parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (e.g. bf16);
LayerNorm statistics and the attention softmax are computed in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from signclip_jax import extras
from signclip_jax.data.text import hub_cached, hub_file, is_local, resolve_text_model
from signclip_jax.errors import DataError, UserError
from signclip_jax.model import attention_dropout, flash_dropout, hash_dropout, partition

# --------------------------------------------------------------------------------------- config
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form, as HF "gelu"
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of a HF BERT config.json that defines the network."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"BERT hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(
                f"BERT hidden_act {self.hidden_act!r} is not supported ({sorted(_ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> BertConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, name_or_path_or_dict: str | Mapping[str, Any]) -> BertConfig:
        """From a config.json dict, a preset name ("bert-base-cased", no download), a local
        folder, the "minilm" alias, or a (cached) hub name."""
        src = name_or_path_or_dict
        if isinstance(src, Mapping):
            return cls._from_dict(src, "config dict")
        name = str(src)
        if name in PRESETS:
            return PRESETS[name]
        path = resolve_text_model(name)
        if is_local(path):
            file = os.path.join(path, "config.json")
            if not os.path.exists(file):
                raise UserError(f"text model folder {path!r} has no config.json")
        else:
            file = hub_file(path, "config.json")
            if file is None:
                raise UserError(f"hub model {path!r} has no config.json")
        try:
            with open(file) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read BERT config {file}: {e}") from e
        return cls._from_dict(data, file)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], where: str) -> BertConfig:
        kind = data.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise UserError(f"{where}: position_embedding_type {kind!r} is not supported")
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise UserError(f"{where}: missing BERT config key(s) {missing}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        return cls(**kwargs)


PRESETS: dict[str, BertConfig] = {
    "bert-base-cased": BertConfig(vocab_size=28996),
    "bert-base-uncased": BertConfig(vocab_size=30522),
}
PRESETS["google-bert/bert-base-cased"] = PRESETS["bert-base-cased"]
PRESETS["google-bert/bert-base-uncased"] = PRESETS["bert-base-uncased"]

# [CLS]/[SEP] ids of the presets (the video tower embeds them without a tokenizer at hand).
PRESET_SPECIAL_IDS: dict[str, tuple[int, int]] = {name: (101, 102) for name in PRESETS}

# A tiny random BERT (2 layers, width 32) with MiniLM's vocabulary, so the bundled tokenizer's
# ids fit: smoke tests and `bench train --bert=tiny` compile in seconds with it.
TINY_BERT = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=512,
)  # fmt: skip


# --------------------------------------------------------------------------------- primitives
def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias; kernel [din, dout] in param_dtype, computed in `dtype`."""

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        axes: tuple,
        bias_axes: tuple | None = None,
        use_bias: bool = True,
        std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), std, param_dtype), logical_axes=axes)
        if use_bias:
            self.bias = nnx.Param(
                jnp.zeros((dout,), param_dtype), logical_axes=bias_axes or (axes[1],)
            )
        else:
            self.bias = None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table `embedding` [num, dim]."""

    def __init__(
        self,
        num: int,
        dim: int,
        *,
        axes: tuple,
        std: float = 0.02,
        zero_row: int | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        table = _normal(rngs, (num, dim), std, param_dtype)
        if zero_row is not None and 0 <= zero_row < num:  # HF zeroes the padding_idx row
            table = table.at[zero_row].set(0)
        self.embedding = nnx.Param(table, logical_axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in fp32 whatever the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# ------------------------------------------------------------------------------------- layers
class BertEmbeddings(nnx.Module):
    def __init__(
        self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        c, std = config, config.initializer_range
        self.word_embeddings = Embed(
            c.vocab_size,
            c.hidden_size,
            axes=("vocab", "embed"),
            std=std,
            zero_row=c.pad_token_id,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.position_embeddings = Embed(
            c.max_position_embeddings,
            c.hidden_size,
            axes=(None, "embed"),
            std=std,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.token_type_embeddings = Embed(
            c.type_vocab_size,
            c.hidden_size,
            axes=(None, "embed"),
            std=std,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.LayerNorm = LayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        # the counter-hash mask (model/hash_dropout.py), keys from the same stream as nnx.Dropout
        self.dropout = hash_dropout.HashDropout(
            c.hidden_dropout_prob, deterministic=True, rngs=rngs
        )

    def __call__(
        self, input_ids=None, *, inputs_embeds=None, position_ids=None, token_type_ids=None
    ) -> jax.Array:
        """ids [B, S] (or inputs_embeds [B, S, H]) -> [B, S, H] in the compute dtype."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None]
        if token_type_ids is None:
            token_type_ids = jnp.zeros((1, seq), jnp.int32)
        x = (
            inputs_embeds.astype(jnp.float32)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


def key_mask(lengths: jax.Array, seq: int) -> jax.Array:
    """Valid-prefix lengths [B] int -> key-padding mask [B, seq] bool (True = attend)."""
    return jnp.arange(seq, dtype=jnp.int32)[None] < jnp.asarray(lengths)[:, None]


def segment_mask(segments: jax.Array) -> jax.Array:
    """Packed rows' segment ids [B, S] int -> block-diagonal mask [B, 1, S, S] bool: a token
    attends to the tokens of its own segment only (padding, segment 0, to padding: no query
    is left without keys)."""
    seg = jnp.asarray(segments)
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def _segment_kernel(implementation: str | None) -> str | None:
    """The kernel of packed (segment) attention: Pallas splash attention on TPU, else
    `implementation` (XLA or cuDNN) with the block-diagonal mask. jax.nn.dot_product_attention
    (jax 0.10) takes no segment ids, so cuDNN gets them as that mask. A function so that
    tests can select splash (interpret mode) on CPU."""
    return "splash" if jax.default_backend() == "tpu" else implementation


def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None,
    mask: jax.Array | None,
    implementation: str | None,
    segments: jax.Array | None = None,
) -> jax.Array:
    """Fused softmax attention without dropout. q, k, v [B, S, N, Hd] -> [B, S, N, Hd].

    The padding comes as one of
      - `lengths` [B] int32: the valid tokens of each row are a prefix of that length (the
        fast path). cuDNN takes them as sequence lengths, so no [B, 1, S, S] mask or bias is
        built, stored or differentiated (outputs at padded queries are 0); XLA gets the
        [B, 1, 1, S] key mask built from them here.
      - `mask` [B, S] bool: any key-padding mask (HF semantics, for callers whose padding is
        not a prefix). cuDNN takes masks only as a [B, 1, S, S] bias (its bias check rejects
        a broadcast query axis), so that form is built here, per layer.
      - `segments` [B, S] int: packed rows (data/clip_packing.py), attention block-diagonal
        by segment id: splash attention with segment ids on TPU, else a [B, 1, S, S] mask.
    cuDNN needs an even S: `BertModel` pads odd sequences once at its input.
    """
    b, s = q.shape[:2]
    if segments is not None:
        kernel = _segment_kernel(implementation)
        if kernel == "splash":
            from signclip_jax.model import splash  # Pallas: only where it runs

            # Each device on its own rows (XLA does not partition Pallas calls).
            return partition.per_shard(
                lambda q, k, v, seg, row_offset: splash.segment_attention(q, k, v, seg),
                [q, k, v, segments],
            )
        return jax.nn.dot_product_attention(
            q, k, v, mask=segment_mask(segments), implementation=kernel
        )
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
        if implementation == "cudnn":
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                query_seq_lengths=lengths,
                key_value_seq_lengths=lengths,
                implementation="cudnn",
            )
        # XLA: a [B, 1, 1, S] key mask from the lengths. (XLA's own seq-length handling adds
        # a [B, 1, S, S] query-and-key mask and a second masked logits array per layer.)
        mask = key_mask(lengths, s)
    m = mask[:, None, None, :]  # broadcasts over heads and queries
    if implementation == "cudnn":
        m = jnp.broadcast_to(m, (b, 1, s, s))
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation=implementation)


def _flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None,
    mask: jax.Array | None,
    segments: jax.Array | None,
    seed: jax.Array | None,
    rate: float,
) -> jax.Array:
    """model.attention "pallas": flash_dropout.attention, each device on its own rows under a
    batch-sharded step (model/partition.py), with the dropout mask of the global rows."""
    given = {"lengths": lengths, "mask": mask, "segments": segments}
    name = next((key for key, x in given.items() if x is not None), None)
    sharded = [q, k, v] + ([given[name]] if name else [])
    replicated = [] if seed is None else [seed]

    def kernel(q, k, v, *rest, row_offset):
        ids = {name: rest[0]} if name else {}
        return flash_dropout.attention(
            q, k, v, **ids, seed=rest[-1] if replicated else None, rate=rate,
            row_offset=row_offset,
        )  # fmt: skip

    return partition.per_shard(kernel, sharded, replicated)


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _attention_with_dropout(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, key: jax.Array, rate: float
) -> jax.Array:
    """Softmax attention (fp32 logits) with dropout on the probabilities, as HF BERT trains.

    q, k, v [B, S, N, Hd], mask [B, S] bool (keys) or [B, 1, S, S] (query-key pairs: packed
    rows), key: the dropout key -> [B, S, N, Hd].
    Under jax.checkpoint the backward pass recomputes the [B, N, S, S] logits, probabilities
    and dropout mask from q, k, v and the key instead of keeping them: about 2.5 GB per layer
    at batch 256 and 258 tokens, which made batch 256 run out of an 80 GB GPU, for ~1.5 % more
    FLOPs. The mask is the counter-based hash of (seed from `key`, b, n, t, s)
    (model/attention_dropout.py): a few integer ops per score that XLA fuses into the softmax,
    instead of a materialised [B, N, S, S] array of threefry bits.
    """
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(q.shape[-1])
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = attention_dropout.apply(probs, attention_dropout.seed_words(key), rate)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


class BertSelfAttention(nnx.Module):
    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        h, std = config.hidden_size, config.initializer_range
        kw = dict(axes=("embed", "heads"), std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense(h, h, **kw)
        self.key = Dense(h, h, **kw)
        self.value = Dense(h, h, **kw)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention = attention
        self.dropout = nnx.Dropout(
            config.attention_probs_dropout_prob, deterministic=True, rngs=rngs
        )

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None,
        mask: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, S, H]; lengths [B] int (valid prefix), mask [B, S] bool (keys) or segments
        [B, S] int (packed rows), one of them -> context [B, S, H]."""
        b, s, _ = x.shape
        split = lambda t: t.reshape(b, s, self.num_heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.attention == "pallas":
            # Our blockwise kernel (Triton on GPU), with or without dropout: the mask is the
            # hash of (seed, b, n, t, s), recomputed in the backward pass, never stored.
            train = not self.dropout.deterministic and self.dropout.rate > 0.0
            rate = self.dropout.rate if train else 0.0
            seed = attention_dropout.seed_words(self.dropout.rngs()) if train else None
            ctx = _flash_attention(
                q, k, v, lengths=lengths, mask=mask, segments=segments, seed=seed, rate=rate
            )
        elif self.dropout.deterministic or self.dropout.rate == 0.0:
            # Fused kernels where available.
            ctx = _attention(
                q, k, v, lengths=lengths, mask=mask, segments=segments,
                implementation=self.attention,
            )  # fmt: skip
        else:
            # Attention-probability dropout (as BERT training) is not offered by the fused
            # API, so the explicit form runs while training with it. It takes the [B, S] key
            # mask (from the lengths: no [B, 1, S, S] array either), or for packed rows the
            # block-diagonal [B, 1, S, S] one.
            if segments is not None:
                keys = segment_mask(segments)
            else:
                keys = key_mask(lengths, s) if lengths is not None else mask
            key = self.dropout.rngs()
            ctx = _attention_with_dropout(q, k, v, keys, key, self.dropout.rate)
        return ctx.reshape(b, s, self.num_heads * self.head_dim)


class BertResidualOutput(nnx.Module):
    """Dense -> dropout -> residual add -> LayerNorm: HF's BertSelfOutput and BertOutput.

    The two differ only in the input width and the dense kernel's logical axes.
    """

    def __init__(
        self,
        config: BertConfig,
        in_features: int,
        axes: tuple[str, str],
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        h = config.hidden_size
        self.dense = Dense(
            in_features,
            h,
            axes=axes,
            bias_axes=("embed",),
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.LayerNorm = LayerNorm(
            h, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.dropout = hash_dropout.HashDropout(
            config.hidden_dropout_prob, deterministic=True, rngs=rngs
        )

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(h)).astype(jnp.float32) + residual)


class BertAttention(nnx.Module):
    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # HF names this submodule "self" (key ...attention.self.query.weight).
        self.self = BertSelfAttention(config, attention=attention, **kw)
        self.output = BertResidualOutput(config, config.hidden_size, ("heads", "embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None,
        mask: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        return self.output(self.self(x, lengths, mask, segments), x)


class BertIntermediate(nnx.Module):
    def __init__(
        self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.dense = Dense(
            config.hidden_size,
            config.intermediate_size,
            axes=("embed", "mlp"),
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return _ACTIVATIONS[self.act](self.dense(x))


class BertLayer(nnx.Module):
    """Post-LN transformer layer: attention -> add & norm -> FFN -> add & norm."""

    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = BertAttention(config, attention=attention, **kw)
        self.intermediate = BertIntermediate(config, **kw)
        self.output = BertResidualOutput(config, config.intermediate_size, ("mlp", "embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None,
        mask: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, S, H]; lengths [B] int (valid prefix), mask [B, S] bool or segments [B, S]
        int (packed rows) -> [B, S, H]."""
        a = self.attention(x, lengths, mask, segments)
        return self.output(self.intermediate(a), a)


def _apply_layer(
    layer: BertLayer,
    x: jax.Array,
    lengths: jax.Array | None,
    mask: jax.Array | None,
    segments: jax.Array | None,
) -> jax.Array:
    return layer(x, lengths, mask, segments)


class BertEncoder(nnx.Module):
    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str | None = None,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.layer = nnx.List(
            [
                BertLayer(
                    config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.remat = remat

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None,
        mask: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, S, H]; lengths [B] int (valid prefix), mask [B, S] bool or segments [B, S]
        int (packed rows) -> [B, S, H]."""
        # Per-layer rematerialisation: only layer inputs are kept for the backward pass.
        apply = nnx.remat(_apply_layer) if self.remat else _apply_layer
        for layer in self.layer:
            x = apply(layer, x, lengths, mask, segments)
        return x


class BertPooler(nnx.Module):
    """dense + tanh on position 0. Unused by SignCLIP but kept so exports carry it."""

    def __init__(
        self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        h = config.hidden_size
        self.dense = Dense(
            h,
            h,
            axes=("embed", "embed_out"),
            bias_axes=("embed",),
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    """HF-layout BERT. Created in eval mode (dropout off): call `.train()` to enable dropout."""

    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str | None = None,
        remat: bool = False,
        add_pooling_layer: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = BertEmbeddings(config, **kw)
        self.encoder = BertEncoder(config, attention=attention, remat=remat, **kw)
        self.pooler = BertPooler(config, **kw) if add_pooling_layer else None
        self.attention = attention

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        *,
        lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """ids [B, S] (or inputs_embeds [B, S, H]) and one of `lengths` / `attention_mask` /
        `segment_ids` -> last hidden [B, S, H].

        `lengths` [B] int: row b's valid tokens are positions 0..lengths[b]-1 (the fast path:
        attention takes sequence lengths; hidden states at padded positions are not defined
        beyond being finite). `attention_mask` [B, S]: any key-padding mask (HF semantics:
        1/True = attend), for padding that is not a prefix. `segment_ids` [B, S] int: packed
        rows, several sequences per row (0 = padding): each token attends to its own
        segment only; position_ids then restart per segment (the caller's).
        """
        given = sum(x is not None for x in (lengths, attention_mask, segment_ids))
        if given != 1:
            raise ValueError(
                "BertModel needs exactly one of attention_mask, lengths and segment_ids"
            )
        x = self.embeddings(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
        )
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        seq = x.shape[1]
        if self.attention == "cudnn" and seq % 2:
            # cuDNN's kernels want an even length (the text tower has 63 tokens): one padded
            # slot, once here rather than in every layer. It lies outside every row's valid
            # prefix (or is masked, or is padding segment 0), so no valid output changes.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
            mask = None if mask is None else jnp.pad(mask, ((0, 0), (0, 1)))
            if segment_ids is not None:
                segment_ids = jnp.pad(segment_ids, ((0, 0), (0, 1)))
            return self.encoder(x, lengths, mask, segment_ids)[:, :seq]
        return self.encoder(x, lengths, mask, segment_ids)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """HF pooler output [B, H] from the last hidden state [B, S, H]."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler")
        return self.pooler(hidden)


# ----------------------------------------------------------------------- HF key <-> NNX path
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_key(path: tuple) -> tuple[str, bool]:
    """NNX parameter path -> (PyTorch state_dict key, whether the tensor is transposed)."""
    *head, leaf = (str(p) for p in path)
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"no HF name for parameter {'/'.join(map(str, path))}")
    return ".".join([*head, _LEAF_TO_HF[leaf]]), leaf == "kernel"


def param_items(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """(path, Param) pairs of a module, in a stable order."""
    return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def export_state(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Parameters in PyTorch layout: {"<prefix><hf key>": array} (Linear weights [out, in])."""
    out = {}
    for path, var in param_items(module):
        key, transpose = hf_key(path)
        arr = np.asarray(jax.device_get(var.get_value()))
        out[prefix + key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


@dataclasses.dataclass
class LoadReport:
    """What a load consumed: every source tensor is either `loaded` or `unused`."""

    source: str
    loaded: list[str]
    unused: list[str]

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors from {self.source}; "
            f"unused {len(self.unused)}: {_summarize(self.unused)}"
        )


def _summarize(keys: list[str]) -> str:
    """Collapses whole unused layers: "encoder.layer.{2..5}.* (64 tensors), pooler.dense.bias"."""
    if not keys:
        return "none"
    layers: dict[str, set[int]] = {}
    other, counts = [], {}
    for k in keys:
        m = re.match(r"(.*?\blayer\.)(\d+)\.(.*)", k)
        if m:
            layers.setdefault(m[1], set()).add(int(m[2]))
            counts[m[1]] = counts.get(m[1], 0) + 1
        else:
            other.append(k)
    parts = [
        f"{head}{{{','.join(map(str, sorted(ids)))}}}.* ({counts[head]} tensors)"
        for head, ids in layers.items()
    ]
    return ", ".join(parts + other)


def _place(value: np.ndarray, like: Any) -> jax.Array:
    """Puts a host array with the sharding of the value it replaces (multi-host safe)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.Array) and sharding is not None:
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
    return jnp.asarray(value)


def import_state(
    module: nnx.Module,
    tensors: Mapping[str, Any],
    *,
    source: str,
    prefix: str = "",
    names: Mapping[str, str] | None = None,
) -> LoadReport:
    """Loads PyTorch-layout tensors into `module`'s Params (strict).

    Every Param must find `<prefix><hf key>` in `tensors` with the right shape, else DataError
    naming the missing/mismatched keys (nothing is modified then). Tensors not consumed are
    reported as unused (only those under `prefix`). `names` maps keys back to the names in the
    source file for messages.
    """
    names = names or {}
    updates, missing, mismatched, used = [], [], [], set()
    for path, var in param_items(module):
        key, transpose = hf_key(path)
        key = prefix + key
        if key not in tensors:
            missing.append(names.get(key, key))
            continue
        arr = np.asarray(tensors[key])
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(var.shape):
            mismatched.append(f"{names.get(key, key)} {tuple(arr.shape)} != {tuple(var.shape)}")
            continue
        used.add(key)
        updates.append((var, arr))
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {missing}")
        if mismatched:
            parts.append(f"shape mismatch (checkpoint != model) {mismatched}")
        raise DataError(f"cannot load {source}: " + "; ".join(parts))
    for var, arr in updates:
        dtype = var.get_value().dtype
        var.set_value(_place(np.ascontiguousarray(arr).astype(dtype), var.get_value()))
    unused = sorted(names.get(k, k) for k in tensors if k.startswith(prefix) and k not in used)
    return LoadReport(source, sorted(names.get(k, k) for k in used), unused)


# ---------------------------------------------------------------------- checkpoint reading
def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor (bf16 has no numpy form: go through fp32)
        t = t.detach().cpu()
        if t.dtype.is_floating_point and t.dtype not in (_torch().float32, _torch().float64):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _torch():
    # Only for PyTorch-format weights (a .bin, or bf16 safetensors), not needed otherwise.
    return extras.require("torch", "torch", "reading PyTorch-format BERT weights")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(file, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (TypeError, ValueError):  # bf16 files: numpy cannot hold them
        _torch()
        with safe_open(file, framework="pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    sd = _torch().load(file, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def checkpoint_files(name_or_path: str) -> list[str]:
    """The weight file(s) of a BERT: a local file/folder, the "minilm" alias or a hub name."""
    if os.path.isfile(name_or_path):
        return [name_or_path]
    path = resolve_text_model(name_or_path)
    candidates = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if is_local(path):
        found = [os.path.join(path, c) for c in candidates if os.path.exists(os.path.join(path, c))]
        if not found:
            raise UserError(f"text model folder {path!r} has none of {list(candidates)}")
        file = found[0]
    else:
        # Anything already cached first (no network), then the hub in order of preference.
        file = next(filter(None, (hub_cached(path, c) for c in candidates)), None)
        for c in candidates:
            if file is not None:
                break
            file = hub_file(path, c)
        if file is None:
            raise UserError(f"hub model {path!r} has none of {list(candidates)}")
    if file.endswith(".index.json"):  # sharded safetensors
        with open(file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        folder = os.path.dirname(file)
        if is_local(path):
            return [os.path.join(folder, s) for s in shards]
        return [hub_file(path, s) for s in shards]
    return [file]


def read_checkpoint(name_or_path: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a BERT checkpoint as numpy ({key: array}, description of the source)."""
    files = checkpoint_files(name_or_path)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            part = (
                _read_safetensors(file) if file.endswith(".safetensors") else _read_torch_bin(file)
            )
        except Exception as e:
            raise DataError(f"cannot read checkpoint {file}: {e}") from e
        tensors.update(part)
    return tensors, files[0] if len(
        files
    ) == 1 else f"{os.path.dirname(files[0])} ({len(files)} shards)"


def normalize_bert_keys(tensors: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """HF BERT checkpoint keys -> BertModel keys.

    Strips the "bert." prefix of BertFor* checkpoints (bert-base-cased's own file has it) and
    renames the old TF-converted LayerNorm "gamma"/"beta". Returns (renamed, new -> original).
    """
    out, names = {}, {}
    for key, value in tensors.items():
        new = key[len("bert.") :] if key.startswith("bert.") else key
        if new.endswith(".gamma"):
            new = new[: -len("gamma")] + "weight"
        elif new.endswith(".beta"):
            new = new[: -len("beta")] + "bias"
        if new in out:  # keep the first spelling; the other is reported unused
            new = key
        out[new] = value
        names[new] = key
    return out, names


def load_hf_weights(
    model: BertModel, name_or_path: str, *, num_layers: int | None = None
) -> LoadReport:
    """Loads a HF BERT checkpoint (safetensors or pytorch_model.bin) into `model`.

    Strict accounting: every model parameter must be present with its shape (DataError naming
    it otherwise); checkpoint tensors not used (pooler of a pooler-less model, position_ids,
    MLM heads, layers >= num_layers) are listed in the report. `num_layers` (default: the
    model's depth) bounds the checkpoint layers taken; a model deeper than that is an error.
    """
    depth = len(model.encoder.layer)
    num_layers = depth if num_layers is None else num_layers
    if num_layers != depth:
        raise UserError(f"num_layers={num_layers} but the model has {depth} layers")
    raw, source = read_checkpoint(name_or_path)
    tensors, names = normalize_bert_keys(raw)
    return import_state(model, tensors, source=source, names=names)
