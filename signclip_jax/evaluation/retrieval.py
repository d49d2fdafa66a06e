"""Embedding a split, retrieval metrics and the validation loss: one copy, used by training's
evaluators and by the evaluate command.

A split is embedded with the evaluation input pipeline (pipeline.make_eval_batches: the
prompts, features and bad-example handling of training's validation) and an *embedding
function* that the caller supplies:

    embed_batch(batch) -> {"pose": [n, H], "index": [n], "prompt": [n] str, "text": [n, H]?}

It gets one batch of this process's rows and returns the usable rows of the whole (global)
batch, in order. Training passes the sharded jitted forward with its multi-process gathers
(train/loop.py); the evaluate command embeds each pose on its own mask (`pose_by_pose` over
serving's Embedder). Scores are never held as an [N, N] matrix: ranks come from blocks of rows
(metrics.scan_pairs), so 100k x 100k evaluations fit in memory.

Test-time flip (`flip`, reference 7.6): `right` mirrors a pose when its right hand is never
seen (zero variance of the right-hand coordinates over the whole clip, missing points counted
as 0), i.e. the signer is taken to be left-handed: the original's `flip_pose: 'right'`, whose
own mirror function does not exist as shipped; ours is data/augment.py's flip_horizontal.
`always` mirrors every pose.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from signclip_jax import config as config_lib
from signclip_jax.data import augment, pipeline
from signclip_jax.data import text as text_lib
from signclip_jax.data.pose import RIGHT_HAND, layout
from signclip_jax.errors import DataError, UserError
from signclip_jax.evaluation import metrics
from signclip_jax.train import losses

FLIP_MODES = ("none", "right", "always")
GROUP_BY = ("prompt", "decoded")

# One batch of make_eval_batches (this process's rows) -> the usable rows of the global batch.
EmbedBatch = Callable[[dict[str, np.ndarray]], dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Test-time flip.


def right_hand_missing(arr, spec) -> bool:
    """True when the right-hand coordinates never vary over the clip (never detected).

    `arr` a pose.PoseArray (missing points are 0). False for sets without a right hand.
    """
    slots = [i for i, (c, _) in enumerate(layout(spec.components).points) if c == RIGHT_HAND]
    if not slots:
        return False
    hand = np.nan_to_num(arr.points[:, slots].astype(np.float64))
    return float(hand.var(axis=0).sum()) == 0.0


_POSE_KEYS = ("pose_path", "pose_bytes", "pose", "points", "observed", "fps", "features")


class MirroredSource:
    """A data source whose records carry the (possibly mirrored) normalised pose as "points".

    mode "right": mirror when `right_hand_missing`; "always": mirror every pose. Indices of
    mirrored records are collected in `self.flipped` (in this process: the evaluation reads
    with threads only). Unreadable records become {"error": ...} records, which the input
    pipeline counts as skipped, as it does for the plain source.
    """

    def __init__(self, source, spec, mode: str):
        if mode not in ("right", "always"):
            raise UserError(f"flip mode must be one of {FLIP_MODES[1:]}, got {mode!r}")
        self.source, self.spec, self.mode = source, spec, mode
        self.flipped: set[int] = set()
        self.skipped = getattr(source, "skipped", [])

    @property
    def components(self):
        return getattr(self.source, "components", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        meta = {k: v for k, v in record.items() if k not in _POSE_KEYS}
        if "error" in record:
            return meta
        if "features" in record and not any(k in record for k in _POSE_KEYS[:4]):
            name = pipeline.record_name(record)
            return {**meta, "error": f"{name}: stored features cannot be mirrored (--flip)"}
        try:
            arr = pipeline.record_pose_array(record, self.spec)
        except DataError as e:
            return {**meta, "error": str(e)}
        if self.mode == "always" or right_hand_missing(arr, self.spec):
            arr = augment.flip_horizontal(arr, self.spec)
            self.flipped.add(int(index))
        return {**meta, "points": arr.points, "observed": arr.observed, "fps": arr.fps}


# ---------------------------------------------------------------------------------------------
# Embedding one split.


@dataclasses.dataclass
class SplitEmbeddings:
    """One split, embedded. Rows are the usable examples in source order.

    pose: [N, H] float32; text: [N, H] each row's prompt embedded, None until known (training
    embeds it with the pose; the evaluate command per distinct prompt: evaluators.Embeddings);
    prompts [N] str; source_index [N]; flipped [N] bool; examined / skipped: examples read /
    unusable (skipped_examples: a few "name: reason" lines).

    Read back from the records on first use (so a metric that needs none reads none): ids,
    texts (raw captions), sign_languages, spoken_languages [N] str; labels [N] int (-1 if none).
    """

    split: str
    pose: np.ndarray
    prompts: list[str]
    source_index: np.ndarray
    flipped: np.ndarray
    records: Any = dataclasses.field(repr=False)  # the split's source, not mirrored
    settings: pipeline.InputSettings = dataclasses.field(repr=False)
    text: np.ndarray | None = None
    examined: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def meta(self) -> list[dict[str, Any]]:
        """record_meta of every row."""
        return [record_meta(self.records[int(i)], self.settings) for i in self.source_index]

    @property
    def ids(self) -> list[str]:
        return [m["id"] for m in self.meta]

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.meta]

    @property
    def sign_languages(self) -> list[str]:
        return [m["sign_language"] for m in self.meta]

    @property
    def spoken_languages(self) -> list[str]:
        return [m["spoken_language"] for m in self.meta]

    @property
    def labels(self) -> np.ndarray:
        return np.array([m["label"] for m in self.meta], np.int64)


def embed_split(
    source,
    config,
    *,
    tokenizer,
    embed_batch: EmbedBatch,
    batch_size: int,
    split: str = "",
    flip: str = "none",
    process_index: int = 0,
    process_count: int = 1,
) -> SplitEmbeddings:
    """Embeds every usable example of `source` with `embed_batch` (see the module docstring).

    config: config.data, or the whole config (then data.pose_dtype "auto" follows
    model.dtype, as in training); batch_size: rows per batch in this process; flip: none,
    right or always (the mirrored poses are read without worker processes).
    """
    settings = pipeline.settings_from_config(config)
    records, mirrored = source, None
    if flip != "none":
        source = mirrored = MirroredSource(source, settings.spec, flip)
        # Worker processes would hide which poses were mirrored; threads still read in parallel.
        config = _with_data(config, workers=0)
    iterator = pipeline.make_eval_batches(
        source,
        config,
        tokenizer=tokenizer,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    pose_parts, text_parts, indices, prompts = [], [], [], []
    for batch in iterator:
        rows = embed_batch(batch)
        if not len(rows["prompt"]):  # no usable example in this batch
            continue
        pose_parts.append(np.asarray(rows["pose"]))
        if rows.get("text") is not None:
            text_parts.append(np.asarray(rows["text"]))
        indices.extend(int(i) for i in rows["index"])
        prompts.extend(str(p) for p in rows["prompt"])
    stats = iterator.stats()
    pose = np.concatenate(pose_parts) if pose_parts else np.zeros((0, 0), np.float32)
    text = np.concatenate(text_parts) if len(text_parts) == len(pose_parts) > 0 else None
    flipped = np.array([mirrored is not None and i in mirrored.flipped for i in indices], bool)
    return SplitEmbeddings(
        split=split,
        pose=pose,
        text=text,
        prompts=prompts,
        source_index=np.array(indices, np.int64),
        flipped=flipped,
        records=records,
        settings=settings,
        examined=stats.examined,
        skipped=stats.skipped,
        skipped_examples=list(stats.examples),
    )


def pose_by_pose(embed_features: Callable[[list[np.ndarray]], np.ndarray]) -> EmbedBatch:
    """An embedding function from `embed_features(features [T_i, D] each) -> [n, H]`, which
    embeds each pose on its own mask (serving's Embedder): the result does not depend on the
    batch. One process; no text (the caller embeds each distinct prompt once)."""

    def embed_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = np.nonzero(np.asarray(batch["valid"]))[0]
        if not len(rows):
            return {"pose": np.zeros((0, 0), np.float32), "index": [], "prompt": []}
        lengths = np.asarray(batch["pose_mask"])[rows].sum(axis=1)
        feats = [np.asarray(batch["pose"][r, :t]) for r, t in zip(rows, lengths)]
        return {
            "pose": embed_features(feats),
            "index": np.asarray(batch["index"])[rows],
            "prompt": np.asarray(batch["prompt"])[rows],
        }

    return embed_batch


def _with_data(config, **changes):
    """A copy of `config` (config.data or the whole config) with data settings changed."""
    out = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    data = config_lib.section(out, "data")
    for k, v in changes.items():
        data[k] = v
    return out


def record_meta(record: dict[str, Any], settings) -> dict[str, Any]:
    """id, text (raw caption), sign_language, spoken_language, label of one record."""
    text = record.get("text", "")
    return {
        "id": str(record.get("id", "")),
        "text": "nan" if text is None else str(text),
        "sign_language": str(record.get("sign_language") or settings.sign_language),
        "spoken_language": str(record.get("spoken_language") or settings.spoken_language),
        "label": int(record.get("label", -1) if record.get("label") is not None else -1),
    }


def split_captions(source, settings) -> list[str]:
    """The captions of a split's records (metadata only: no pose is decoded or embedded)."""
    return [record_meta(source[i], settings)["text"] for i in range(len(source))]


def class_key_fn(
    tokenizer, settings, group_by: str = "prompt"
) -> Callable[[Sequence[str]], list[str]]:
    """Prompt strings -> class keys: the prompts themselves (as training's validation), or
    the decoded token ids (the original's class identity, reference 2.1 and 11.3 item 13)."""
    if group_by == "prompt":
        return list
    if group_by != "decoded":
        raise UserError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    max_len = settings.text_max_len

    def keys(prompts: Sequence[str]) -> list[str]:
        cache: dict[str, str] = {}
        out = []
        for p in prompts:
            if p not in cache:
                ids, mask = text_lib.encode_text(tokenizer, p, max_len=max_len)
                cache[p] = tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            out.append(cache[p])
        return out

    return keys


# ---------------------------------------------------------------------------------------------
# Metrics on embeddings (numpy in, dict of floats out).


def evaluate_retrieval(
    pose_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: Sequence[str],
    *,
    languages: Sequence[str] | None = None,
    ks: Sequence[int] = metrics.KS,
    block_elems: int | None = None,
    standard: bool = True,
) -> dict[str, Any]:
    """Retrieval metrics of one split, block-wise (no [N, N] matrix).

    pose_emb, text_emb [N, H] (row i = example i), texts [N] class strings (prompts; equal
    strings are one class). Keys: t2v/* and v2t/* (the original definitions, identical to
    metrics.retrieval_metrics), std/t2v/* and std/v2t/* (per-example ranks) with `standard`,
    "examples"; with `languages` [N] naming more than one language, lang/<code>/<key> for
    retrieval restricted to that language's examples; "notes" (a list of str, only when there
    is one) when some number is trivial (metrics.retrieval_notes: one example, one class,
    k >= candidates), per language prefixed "<code>: ".
    """
    block = block_elems or metrics.DEFAULT_BLOCK_ELEMS
    texts = [str(t) for t in texts]
    out: dict[str, Any] = metrics.retrieval_metrics_blocked(
        pose_emb, text_emb, texts, ks, block_elems=block, standard=standard
    )
    out["examples"] = float(len(texts))
    notes = metrics.retrieval_notes(len(texts), len(set(texts)), ks, standard=standard)
    if languages is not None and len(set(languages)) > 1:
        languages = list(languages)
        for lang in sorted(set(languages)):
            rows = np.array([i for i, x in enumerate(languages) if x == lang])
            sub = metrics.retrieval_metrics_blocked(
                np.asarray(pose_emb)[rows],
                np.asarray(text_emb)[rows],
                [texts[i] for i in rows],
                ks,
                block_elems=block,
                standard=standard,
            )
            out.update({f"lang/{lang}/{k}": v for k, v in sub.items()})
            out[f"lang/{lang}/examples"] = float(len(rows))
            sub_texts = {texts[i] for i in rows}
            sub_notes = metrics.retrieval_notes(len(rows), len(sub_texts), ks, standard=standard)
            notes += [f"{lang}: {n}" for n in sub_notes]
    if notes:
        out["notes"] = notes
    return out


def validation_loss(
    pose_emb: np.ndarray, text_emb: np.ndarray, loss_name: str, loss_params, batch_size: int
) -> float:
    """The validation loss: the mean over consecutive chunks of `batch_size` rows of the
    training loss (as fairseq's validation: mean of per-batch losses); NaN with no chunk of
    two rows or more. pose_emb, text_emb [N, H]."""
    values = []
    for start in range(0, len(pose_emb), batch_size):
        pe, te = pose_emb[start : start + batch_size], text_emb[start : start + batch_size]
        if len(pe) > 1:
            values.append(float(losses.reference_loss(loss_name, pe, te, loss_params)))
    return float(np.mean(values)) if values else float("nan")


__all__ = [
    "FLIP_MODES",
    "GROUP_BY",
    "MirroredSource",
    "SplitEmbeddings",
    "class_key_fn",
    "embed_split",
    "evaluate_retrieval",
    "pose_by_pose",
    "record_meta",
    "right_hand_missing",
    "split_captions",
    "validation_loss",
]
