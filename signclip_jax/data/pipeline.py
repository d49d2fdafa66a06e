"""grain input pipeline: source records -> features + tokenised prompts -> padded batches.

  index stream: range(N) -> shuffle (reshuffled every epoch) -> repeat -> [process::count]
  per record (worker processes): read pose -> PoseArray -> augment (train) -> features [T, D];
      caption -> prompt -> (text_ids, text_mask); a bad example becomes a marker, not an error
  main process: count and drop markers (or, in eval, turn them into invalid rows) -> batch ->
      pad to max_frames or to the smallest length bucket holding the longest clip
      (training with data.length_group_batches = K: windows of K batches, sorted by clip
      length, cut into K batches, emitted in a seeded order)

Worker prefetch sits *before* batching, so batches do not depend on the number of workers
(grain pitfall 6b), and augmentation draws from an rng derived from (seed, epoch, source
index) alone, so neither workers nor a resume point change an example. The iterator state
(grain's, plus the bad-example counters) is JSON and restores exactly.

Batch dict (B = batch_size_per_process, L = bucket length, D = feature dim, S = text_max_len-1):
  pose [B, L, D] float32 (or data.pose_dtype), pose_mask [B, L] bool, text_ids [B, S] int32,
  text_mask [B, S] bool, index [B] int64 (row of the source, -1 for padding), label [B] int32,
  valid [B] bool;
  eval batches also carry prompt [B] (object array of str).

data.augment_on_device (training only): the workers send each clip's points as stored, its
observed mask as bits and the resampled frame count the host draws, padded to the
`device_length` of the batch's longest slot, and the train step augments
(data/augment_device.py; batch layout in the "data.augment_on_device" section below). From
packed shards the workers read whole batches (`_PackedWindows`).

Multi-process runs: the bucket is chosen per process from its own rows, so processes can get
different L; pad every process to a common length (`pad_to_length`) before assembling a global
array, or leave data.length_buckets empty. Training agrees on that length inside the train
step, a step ahead, with no host collective per step (train/loop.py, `_Inputs`); evaluation
all-gathers it per batch (train/step.py, `model_inputs`). Padding more never changes numerics.

config.data keys read here (all optional): max_frames, pose_components, include_z,
prompt_template, text_max_len, length_buckets, length_group_batches, augment (keyword arguments of
augment.augment), augment_on_device, max_bad_fraction, bad_check_min, workers, read_threads,
prefetch, worker_buffer, min_shm_bytes, sign_language / spoken_language (defaults for records
without one), signed_names (code -> name for the {signed_name} prompt field), pose_dtype (auto:
model.dtype when 16-bit; see InputSettings).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
from absl import flags

from signclip_jax import config as config_lib
from signclip_jax.data import augment as augment_lib
from signclip_jax.data import pose as pose_lib
from signclip_jax.data.sources import packed as packed_lib
from signclip_jax.data.text import GLOSS_STYLES, encode_text, normalize_gloss, render_prompt
from signclip_jax.errors import DataError, UserError

log = logging.getLogger(__name__)

# How many skipped examples are logged one by one before only summaries are.
_LOG_EACH = 20


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """What the per-record transform and the batcher need, resolved from `config.data`."""

    spec: pose_lib.PoseSpec = dataclasses.field(default_factory=pose_lib.PoseSpec)
    prompt_template: str = "spreadthesign"
    text_max_len: int = 64
    length_buckets: tuple[int, ...] = ()
    augment: tuple[tuple[str, Any], ...] = ()  # keyword arguments of augment.augment()
    max_bad_fraction: float = 0.01
    bad_check_min: int = 200  # examples examined before max_bad_fraction applies
    workers: int = 0
    read_threads: int = 4
    prefetch: int = 64
    worker_buffer: int = 16  # elements each worker process may run ahead
    # Arrays smaller than this (the text ids and mask) travel from the workers pickled through
    # the pipe instead of one shared-memory block each (~10-20% more examples/s measured).
    # Not higher: with large pickled elements in the pipe, grain's iterator close() waits
    # ~50 s for its workers (measured with 1 MiB).
    min_shm_bytes: int = 4096
    sign_language: str = "ase"  # defaults when a record has no language
    spoken_language: str = "en"
    signed_names: tuple[tuple[str, str], ...] = ()  # code -> name for {signed_name}
    gloss_style: str = "none"  # ISLR gloss clean-up before the template (text.normalize_gloss)
    # Training only: sort each window of K batches' examples by length, cut it into K batches
    # and shuffle their order (0/1 = off), so that length buckets can pad less.
    length_group_batches: int = 0
    # Host dtype of the pose features: float32, or the 16-bit compute dtype of the model
    # (settings_from_config: data.pose_dtype "auto"). The frame MLP's first op casts poses to
    # the compute dtype, so sending them in it gives the same embeddings bit for bit, with
    # half the bytes through the worker pipes, host-to-device copies and device memory (a
    # 32,768 batch of 256 x 609 poses: 19 GiB in float32).
    pose_dtype: str = "float32"
    # Training only: augment on the accelerator (data/augment_device.py). The host sends the
    # clips' points as stored plus their observed bits and draws only the resampled frame
    # counts; the train step applies augment_device.augment_batch. See `device_batch_keys`.
    augment_on_device: bool = False

    @property
    def lengths(self) -> tuple[int, ...]:
        """Allowed padded lengths, ascending; the last is max_frames."""
        top = self.spec.max_frames
        return (*sorted({b for b in self.length_buckets if b < top}), top)


def _augment_kwargs(raw: Any) -> tuple[tuple[str, Any], ...]:
    if not raw:
        return ()
    items = dict(raw.items() if hasattr(raw, "items") else raw)
    params = inspect.signature(augment_lib.augment).parameters
    allowed = [p for p in params if p not in ("arr", "spec", "rng")]
    unknown = sorted(set(items) - set(allowed))
    if unknown:
        raise UserError(f"unknown data.augment key(s) {unknown}; known: {allowed}")
    switches = ("temporal", "spatial", "noise")
    active = any(items.get(k) for k in switches) or any(
        items.get(k, 0) > 0 for k in ("flip_prob", "frame_dropout_rate")
    )
    return tuple(sorted(items.items())) if active else ()


def settings_from_config(config) -> InputSettings:
    """`config.data` (or the whole config) -> InputSettings. Missing keys take defaults.

    data.pose_dtype "auto" (the default) resolves to model.dtype when it is 16-bit, which only
    the whole config tells; given `config.data` alone it is float32."""
    data = config_lib.section(config, "data")
    max_frames = int(config_lib.get(data, "max_frames", 256))
    if max_frames <= 0:
        raise UserError(f"data.max_frames must be > 0 for batching, got {max_frames}")
    spec = pose_lib.PoseSpec(
        components=str(config_lib.get(data, "pose_components", "reduced_face")),
        include_z=bool(config_lib.get(data, "include_z", True)),
        max_frames=max_frames,
    )
    buckets = tuple(config_lib.get(data, "length_buckets", ()) or ())
    if any(not isinstance(b, int) or b <= 0 for b in buckets):
        raise UserError(f"data.length_buckets must be positive integers, got {buckets}")
    group = int(config_lib.get(data, "length_group_batches", 0))
    if group < 0:
        raise UserError(f"data.length_group_batches must be >= 0, got {group}")
    if group > 1 and not buckets:
        raise UserError(
            "data.length_group_batches groups clips of similar length so that "
            "data.length_buckets can pad less; set data.length_buckets too (e.g. (64, 128, 192))"
        )
    fraction = float(config_lib.get(data, "max_bad_fraction", 0.01))
    if not 0 <= fraction <= 1:
        raise UserError(f"data.max_bad_fraction must be in [0, 1], got {fraction}")
    names = config_lib.get(data, "signed_names", {})
    return InputSettings(
        pose_dtype=_pose_dtype(str(config_lib.get(data, "pose_dtype", "auto")), config),
        spec=spec,
        prompt_template=str(config_lib.get(data, "prompt_template", "spreadthesign")),
        text_max_len=int(config_lib.get(data, "text_max_len", 64)),
        length_buckets=buckets,
        augment=_augment_kwargs(config_lib.get(data, "augment", None)),
        max_bad_fraction=fraction,
        bad_check_min=int(config_lib.get(data, "bad_check_min", 200)),
        workers=int(config_lib.get(data, "workers", 0)),
        read_threads=int(config_lib.get(data, "read_threads", 4)),
        prefetch=int(config_lib.get(data, "prefetch", 64)),
        worker_buffer=int(config_lib.get(data, "worker_buffer", 16)),
        min_shm_bytes=int(config_lib.get(data, "min_shm_bytes", 4096)),
        sign_language=str(config_lib.get(data, "sign_language", "ase")),
        spoken_language=str(config_lib.get(data, "spoken_language", "en")),
        signed_names=tuple(sorted(dict(names).items())),
        gloss_style=_gloss_style(str(config_lib.get(data, "gloss_style", "none"))),
        length_group_batches=group,
        augment_on_device=bool(config_lib.get(data, "augment_on_device", False)),
    )


POSE_DTYPES = ("float32", "bfloat16", "float16")


def _pose_dtype(name: str, config) -> str:
    """data.pose_dtype -> a POSE_DTYPES name. "auto": model.dtype when it is 16-bit (only
    known when `config` is the whole training config), else float32."""
    if name == "auto":
        model = config_lib.get(config, "model", None)
        dtype = config_lib.get(model, "dtype", "float32") if model is not None else "float32"
        return dtype if dtype in ("bfloat16", "float16") else "float32"
    if name not in POSE_DTYPES:
        raise UserError(f"data.pose_dtype must be auto or one of {list(POSE_DTYPES)}, got {name!r}")
    return name


@functools.cache  # called once per example by the workers
def numpy_dtype(name: str) -> np.dtype:
    """A POSE_DTYPES name as a numpy dtype (bfloat16 from ml_dtypes, which jax ships)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _gloss_style(style: str) -> str:
    if style not in GLOSS_STYLES:
        raise UserError(f"data.gloss_style must be one of {GLOSS_STYLES}, got {style!r}")
    return style


# ---------------------------------------------------------------------------------------------
# One record -> features.


def record_name(record: dict[str, Any]) -> str:
    """The best name for error messages: the file when there is one, else the id."""
    return str(record.get("pose_path") or record.get("id", "?"))


def record_pose_array(record: dict[str, Any], spec: pose_lib.PoseSpec) -> pose_lib.PoseArray:
    """PoseArray of a record (pose_path / pose_bytes / pose / points). DataError if unusable."""
    name = record_name(record)
    if "error" in record:
        raise DataError(f"{name}: {record['error']}")
    if "points" in record:
        points = np.asarray(record["points"], np.float32)
        observed = np.asarray(record["observed"], bool)
        if points.ndim != 3 or points.shape[1] != spec.num_points:
            raise DataError(
                f"{name}: stored pose has shape {points.shape}, expected [T, {spec.num_points},"
                f" 3] for components={spec.components!r} (packed with other components?)"
            )
        if points.shape[0] == 0:
            raise DataError(f"{name}: pose has no frames")
        return pose_lib.PoseArray(points=points, observed=observed, fps=float(record["fps"]))
    if "pose" in record:
        pose = record["pose"]
    elif "pose_bytes" in record:
        pose = pose_lib.read_pose(record["pose_bytes"], name=name)
    elif "pose_path" in record:
        pose = pose_lib.read_pose(record["pose_path"], name=name)
    else:
        raise DataError(f"{name}: record has no pose (pose_path, pose_bytes, points, features)")
    return pose_lib.pose_to_array(pose, spec, name=name)


def record_features(
    record: dict[str, Any],
    spec: pose_lib.PoseSpec,
    *,
    rng: np.random.Generator | None = None,
    augment: Sequence[tuple[str, Any]] = (),
) -> np.ndarray:
    """Features [min(T, max_frames), D] float32 of a record, augmented when `rng` is given."""
    if "features" in record and "error" not in record:
        feats = np.asarray(record["features"], np.float32)
        if feats.ndim != 2 or feats.shape[1] != spec.feature_dim:
            raise DataError(
                f"{record_name(record)}: stored features have shape {feats.shape}, expected "
                f"[T, {spec.feature_dim}]"
            )
        feats = feats[: spec.max_frames] if spec.max_frames else feats
    else:
        arr = record_pose_array(record, spec)
        if rng is not None and augment:
            arr = augment_lib.augment(arr, spec, rng, **dict(augment))
        feats = pose_lib.to_features(arr, spec)
    if feats.shape[0] == 0:
        raise DataError(f"{record_name(record)}: pose has no frames")
    return feats


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Augmentation rng of one example: a function of (seed, epoch, source index) only."""
    return np.random.default_rng([int(seed) % 2**63, int(epoch), int(index)])


class _Prepare:
    """grain MapWithIndex: (position, source index) -> example dict or bad-example marker.

    Runs in the worker processes, so it is picklable (source, settings, tokenizer).
    """

    def __init__(
        self,
        source,
        settings: InputSettings,
        tokenizer,
        *,
        seed: int,
        train: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.source = source
        self.settings = settings
        self.tokenizer = tokenizer
        self.seed = seed
        self.train = train
        self.process_index = process_index
        self.process_count = process_count
        self.n = len(source)
        self._names = dict(settings.signed_names)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_encode_cache", None)
        return state

    @functools.cached_property
    def _encode_cache(self):
        # Spreadthesign has ~18k distinct captions for 450k rows: tokenise each prompt once.
        @functools.lru_cache(maxsize=65536)
        def encode(prompt: str) -> tuple[np.ndarray, np.ndarray]:
            return encode_text(self.tokenizer, prompt, max_len=self.settings.text_max_len)

        return encode

    def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        return self._encode_cache(prompt)

    def prompt(self, record: dict[str, Any]) -> str:
        signed = record.get("sign_language") or self.settings.sign_language
        text = record.get("text", "")
        if self.settings.gloss_style != "none" and isinstance(text, str):
            text = normalize_gloss(text, self.settings.gloss_style)
        return render_prompt(
            self.settings.prompt_template,
            text=text,
            spoken=record.get("spoken_language") or self.settings.spoken_language,
            signed=signed,
            signed_name=self._names.get(signed, signed),
        )

    def padding(self) -> dict[str, Any]:
        ids, mask = self.encode("")
        return {"pad": True, "index": -1, "text_ids": ids, "text_mask": mask}

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            return self.padding()
        name = f"example {index}"
        try:
            record = self.source[index]
            name = record_name(record)
            epoch = (self.process_index + position * self.process_count) // self.n
            if self.train and self.settings.augment_on_device:
                return self._device_example(record, epoch, index)
            rng = None
            if self.train and self.settings.augment:
                rng = example_rng(self.seed, epoch, index)
            feats = record_features(
                record, self.settings.spec, rng=rng, augment=self.settings.augment
            )
            prompt = self.prompt(record)
            ids, mask = self.encode(prompt)
        except UserError as e:
            return {"bad": str(e), "name": name, "index": index}
        except Exception as e:  # a file that trips a library in an unforeseen way
            return {"bad": f"{name}: {type(e).__name__}: {e}", "name": name, "index": index}
        out = {
            "features": feats.astype(numpy_dtype(self.settings.pose_dtype), copy=False),
            "text_ids": ids,
            "text_mask": mask,
            "index": index,
            "label": int(record.get("label", -1)),
        }
        if not self.train:
            out["prompt"] = prompt
        return out

    def _device_example(self, record: dict[str, Any], epoch: int, index: int) -> dict[str, Any]:
        """One record as the device augmentation takes it (`_DeviceCollate` pads these)."""
        if "features" in record and "error" not in record:
            raise DataError(
                f"{record_name(record)}: precomputed features cannot be augmented on the "
                "device (it needs points and their observed mask); set "
                "data.augment_on_device=False for this source"
            )
        arr = record_pose_array(record, self.settings.spec)
        t_in, resampled = device_frames(
            arr.num_frames, arr.fps, epoch, index, self.settings, self.seed
        )
        t_in, resampled = int(t_in[0]), int(resampled[0])
        ids, mask = self.encode(self.prompt(record))
        return {
            "points": arr.points[:t_in].reshape(t_in, -1).astype(self.raw_dtype),
            "bits": np.packbits(arr.observed[:t_in].reshape(-1)),
            "aug_frames": resampled,
            "epoch": epoch,
            "slot": max(t_in, resampled),
            "text_ids": ids,
            "text_mask": mask,
            "index": index,
            "label": int(record.get("label", -1)),
        }

    @functools.cached_property
    def raw_dtype(self) -> np.dtype:
        return device_raw_dtype(self.settings, self.source)


class _EvalIndex:
    """Position k of process p's padded eval stream -> source index, or -1 for padding."""

    def __init__(self, n: int, process_index: int, process_count: int):
        self.n, self.p, self.c = n, process_index, process_count

    def __call__(self, k: int) -> int:
        i = self.p + int(k) * self.c
        return i if i < self.n else -1


# ---------------------------------------------------------------------------------------------
# Counting and dropping bad examples (main process, after the workers).


@dataclasses.dataclass
class InputStats:
    """Examples examined and skipped by one process's iterator (including rows the source
    dropped while loading its metadata)."""

    examined: int
    skipped: int
    examples: list[str]  # a few "name: reason" lines

    @property
    def fraction(self) -> float:
        return self.skipped / self.examined if self.examined else 0.0


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent, owner: _SkipBad):
        super().__init__(parent)
        self._owner = owner
        self._examined = 0
        self._skipped = 0
        self._examples: list[str] = []
        self._logged: set[str] = set()

    def _check(self) -> None:
        o = self._owner
        if self._examined < o.settings.bad_check_min or not self._skipped:
            return
        # All bad: fail even with max_bad_fraction=1, or an endless stream would spin forever.
        if self._skipped == self._examined or self._skipped / self._examined > (
            o.settings.max_bad_fraction
        ):
            raise UserError(_too_many_bad(self.stats(), o.settings.max_bad_fraction, o.what))

    def __next__(self):
        while True:
            element = next(self._parent)
            if "pad" in element:
                return element
            self._examined += 1
            if "bad" not in element:
                return element
            self._skipped += 1
            message = element["bad"]
            if len(self._examples) < 5 and message not in self._examples:
                self._examples.append(message)
            if len(self._logged) < _LOG_EACH and message not in self._logged:
                self._logged.add(message)  # each problem once (epochs repeat them)
                log.warning("skipping example: %s", message)
            elif self._skipped % 1000 == 0:
                log.warning("%d of %d examples skipped so far", self._skipped, self._examined)
            self._check()
            if not self._owner.drop:
                return {"pad": True, "index": -1, **self._owner.pad_text}

    def stats(self) -> InputStats:
        pre = self._owner.pre_skipped
        return InputStats(
            examined=self._examined + len(pre),
            skipped=self._skipped + len(pre),
            examples=[f"{n}: {r}" for n, r in pre[:5]] + self._examples,
        )

    def finish(self) -> None:
        """End of a finite stream: apply the fraction check whatever the count."""
        if self._skipped and self._skipped / max(self._examined, 1) > (
            self._owner.settings.max_bad_fraction
        ):
            raise UserError(
                _too_many_bad(self.stats(), self._owner.settings.max_bad_fraction, self._owner.what)
            )

    def get_state(self):
        return {
            "parent": self._parent.get_state(),
            "examined": self._examined,
            "skipped": self._skipped,
            "examples": list(self._examples),
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._examined = int(state["examined"])
        self._skipped = int(state["skipped"])
        self._examples = list(state["examples"])

    def __str__(self) -> str:
        return "SkipBadIterator"


class _SkipBad(grain.IterDataset):
    """Counts bad-example markers; drops them (train) or turns them into padding (eval)."""

    def __init__(self, parent, settings: InputSettings, *, drop: bool, pre_skipped, what: str,
                 pad_text: dict[str, np.ndarray]):  # fmt: skip
        super().__init__(parent)
        self.settings = settings
        self.drop = drop
        self.pre_skipped = list(pre_skipped)
        self.what = what
        self.pad_text = pad_text
        self.latest: _SkipBadIterator | None = None

    def __iter__(self) -> _SkipBadIterator:
        self.latest = _SkipBadIterator(self._parent.__iter__(), self)
        return self.latest

    def __str__(self) -> str:
        return "SkipBad"


def _too_many_bad(stats: InputStats, limit: float, what: str) -> str:
    example = stats.examples[0] if stats.examples else "?"
    if stats.skipped == stats.examined:
        return (
            f"no usable examples in the {what}: all {stats.examined} examined were skipped. "
            f"First one: {example}"
        )
    return (
        f"too many unusable examples in the {what}: {stats.skipped} of {stats.examined} "
        f"({100 * stats.fraction:.1f}%) were skipped, more than data.max_bad_fraction="
        f"{limit}. First one: {example}. Fix or remove those files (or raise "
        "data.max_bad_fraction)"
    )


def _check_source(source, settings: InputSettings, what: str) -> None:
    """Fails early on packed shards of other components and on too many rows the source
    dropped while loading its metadata."""
    packed = getattr(source, "components", None)
    if packed is not None and packed != settings.spec.components:
        raise UserError(
            f"the {what} was packed with pose components {packed!r} but data.pose_components "
            f"is {settings.spec.components!r}: re-run prepare or change the config"
        )
    pre = list(getattr(source, "skipped", []) or [])
    total = len(pre) + len(source)
    if pre and total and len(pre) / total > settings.max_bad_fraction:
        stats = InputStats(total, len(pre), [f"{n}: {r}" for n, r in pre[:5]])
        raise UserError(_too_many_bad(stats, settings.max_bad_fraction, what))


# ---------------------------------------------------------------------------------------------
# Batching.


def bucket_length(longest: int, settings: InputSettings) -> int:
    """Smallest allowed padded length >= longest (max_frames when nothing smaller fits)."""
    for length in settings.lengths:
        if longest <= length:
            return length
    return settings.lengths[-1]


class _Collate:
    """List of examples -> batch dict padded to the bucket of its longest clip."""

    def __init__(self, settings: InputSettings, *, with_prompt: bool = False):
        self.settings = settings
        self.with_prompt = with_prompt

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        b, d = len(elements), self.settings.spec.feature_dim
        real = [e for e in elements if "features" in e]
        longest = max((e["features"].shape[0] for e in real), default=1)
        length = bucket_length(longest, self.settings)
        pose = np.zeros((b, length, d), numpy_dtype(self.settings.pose_dtype))
        pose_mask = np.zeros((b, length), bool)
        for i, e in enumerate(elements):
            if "features" in e:
                t = min(e["features"].shape[0], length)
                pose[i, :t] = e["features"][:t]
                pose_mask[i, :t] = True
        batch = {
            "pose": pose,
            "pose_mask": pose_mask,
            "text_ids": np.stack([e["text_ids"] for e in elements]).astype(np.int32),
            "text_mask": np.stack([e["text_mask"] for e in elements]).astype(bool),
            "index": np.array([e["index"] for e in elements], np.int64),
            "label": np.array([e.get("label", -1) for e in elements], np.int32),
            "valid": np.array(["features" in e for e in elements], bool),
        }
        if self.with_prompt:  # eval only: captions for the retrieval metrics
            batch["prompt"] = np.array([e.get("prompt", "") for e in elements], object)
        return batch


def pad_to_length(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Re-pads a batch's frame axis to `length` (>= its own), e.g. so that every process of
    a multi-host run feeds the same shape (the bucket is chosen per process)."""
    have = batch["pose"].shape[1]
    if length < have:
        raise ValueError(f"cannot pad a batch of {have} frames to {length}")
    if length == have:
        return batch
    out = dict(batch)
    out["pose"] = np.pad(batch["pose"], ((0, 0), (0, length - have), (0, 0)))
    out["pose_mask"] = np.pad(batch["pose_mask"], ((0, 0), (0, length - have)))
    if "pose_observed" in batch:  # device augmentation: the observed bits [B, L, W]
        out["pose_observed"] = np.pad(batch["pose_observed"], ((0, 0), (0, length - have), (0, 0)))
    return out


class _LengthGroups(grain.experimental.FlatMapTransform):
    """(window number, K x B examples) -> K collated batches of clips of similar length.

    The examples are sorted by frame count and cut into K batches, which come out in an order
    drawn from (seed, window number): the same order on every process, so that the k-th
    batches of all processes come from the same length range and a multi-host run's common
    padded length stays short. Deterministic given the window, as grain's resume needs: a
    restored iterator re-reads the current window and continues inside it.

    Contrastive note: a batch then holds clips of similar length, so its negatives do too.
    """

    def __init__(self, collate: _Collate, batch_size: int, groups: int, seed: int):
        self.collate, self.batch_size, self.max_fan_out = collate, batch_size, groups
        self.seed = seed

    def flat_map(self, element):
        window_number, examples = element
        order = sorted(range(len(examples)), key=lambda i: _example_frames(examples[i]))
        b = self.batch_size
        batches = [
            self.collate([examples[i] for i in order[k * b : (k + 1) * b]])
            for k in range(len(order) // b)
        ]
        rng = np.random.default_rng([self.seed % 2**32, int(window_number)])
        return [batches[k] for k in rng.permutation(len(batches))]


def _example_frames(example: dict[str, Any]) -> int:
    """Frames an example needs in its batch (its slot under device augmentation)."""
    return example["slot"] if "slot" in example else example["features"].shape[0]


# ---------------------------------------------------------------------------------------------
# data.augment_on_device, the host side: read, pad, draw the resampled frame counts.
#
# Batch (B rows, L = device_length of the longest slot, P points, W = ceil(P / 8)); the step
# turns it into the model batch (data/augment_device.py):
#   pose [B, L, P*3] float16/float32 (points as stored), pose_mask [B, L] (t < T_in),
#   pose_observed [B, L, W] uint8 (np.packbits of observed [T_in, P], flat), aug_frames [B]
#   int32 (resampled frames, 0 = none), aug_id [B, 2] int32 (epoch, source index),
#   text_ids, text_mask, index, label, valid as in the host-augmented batch.
# From packed shards a worker reads whole batches (`_PackedWindows`): no per-example Python
# objects, one shared-memory transfer per batch array instead of per example.

_TEMPORAL_STREAM = 1  # augment.example_normal stream of the temporal ratio


def device_frames(
    frames, fps, epoch, index, settings: InputSettings, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The host's decisions for clips of `frames` frames at `fps` (arrays, broadcast):
    (T_in: frames to send, resampled: frames after temporal resampling, 0 = not resampled).

    The speed ratio is N(1, temporal_std) drawn from (seed, epoch, index) alone
    (augment.example_normal), as augment.augment draws it from its Generator; the frame
    count follows augment.resampled_frames. A resampled clip, and every clip under frame
    dropout, is sent whole; the others are cut to max_frames, as to_features would.
    """
    aug = dict(settings.augment)
    frames, fps, epoch, index = np.broadcast_arrays(
        np.atleast_1d(np.asarray(frames, np.int64)), fps, epoch, index
    )
    top = settings.spec.max_frames
    resampled = np.zeros(frames.shape, np.int64)
    if aug.get("temporal"):
        z = augment_lib.example_normal(seed, epoch, index, stream=_TEMPORAL_STREAM)
        ratio = 1.0 + float(aug.get("temporal_std", 0.2)) * z
        resampled = augment_lib.resampled_frames(frames, fps, ratio, top)
    whole = (resampled > 0) | (float(aug.get("frame_dropout_rate", 0.0)) > 0)
    t_in = np.where(whole, frames, np.minimum(frames, top))
    return t_in, resampled


def device_length(longest: int, settings: InputSettings) -> int:
    """Padded frames of a device-augmentation batch whose longest slot is `longest`: its
    length bucket; past max_frames (a long clip resampled shorter, or frame dropout), the
    next power-of-two multiple of max_frames (the step's output is cut to max_frames)."""
    top = settings.spec.max_frames
    if longest <= top:
        return bucket_length(longest, settings)
    return top * 2 ** math.ceil(math.log2(longest / top))


def device_raw_dtype(settings: InputSettings, source) -> np.dtype:
    """dtype of the points sent for device augmentation: float16 when the model reads 16-bit
    poses or the packed shards hold float16 (exact), else float32."""
    index = getattr(source, "index", None) or {}
    stored = index.get("dtype") if isinstance(source, packed_lib.PackedSource) else None
    if settings.pose_dtype != "float32" or stored == "float16":
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def device_batch_keys() -> tuple[str, ...]:
    """Keys a device-augmentation batch adds to the model inputs (augment_device.INPUT_KEYS)."""
    return ("pose_observed", "aug_frames", "aug_id")


class _DeviceBuffers:
    """The arrays of one device-augmentation batch, zeroed, filled row by row.

    Reusable (`_BufferPool`) for any length up to its capacity: the arrays are contiguous
    views of flat storage, so a refill writes the same memory. A refill zeroes what the
    previous fill wrote that the new one does not overwrite (all of it when the length
    changes), which costs what the copies cost, not the padding.
    """

    def __init__(self, rows: int, capacity: int, settings: InputSettings, dtype: np.dtype):
        p = settings.spec.num_points
        self.rows, self.capacity = rows, capacity
        self.width, self.bit_width = p * 3, (p + 7) // 8
        self._pose = np.zeros(rows * capacity * self.width, dtype)
        self._mask = np.zeros(rows * capacity, bool)
        self._bits = np.zeros(rows * capacity * self.bit_width, np.uint8)
        self._frames = np.zeros(rows, np.int64)  # written frames and bit bytes per row
        self._bytes = np.zeros(rows, np.int64)
        self.length = -1
        self.filling = False  # handed out by the pool, its batch not made yet
        self.shape(capacity)

    def shape(self, length: int) -> None:
        """Views of `length` frames (<= capacity), all zero."""
        if length != self.length and self.length >= 0:
            for row in range(self.rows):  # the last fill's rows, in the old layout
                self.clear(row)
        r = self.rows
        self.pose = self._pose[: r * length * self.width].reshape(r, length, self.width)
        self.pose_mask = self._mask[: r * length].reshape(r, length)
        self.bits = self._bits[: r * length * self.bit_width].reshape(r, length, self.bit_width)
        self.length = length

    def put(self, row: int, points: np.ndarray, bits: np.ndarray) -> None:
        """points [T, P*3] (or a flat view of them), bits: packbits of [T, P]."""
        t, nb = len(points), len(bits)
        self.pose[row, :t] = points
        self.pose_mask[row, :t] = True
        flat = self.bits[row].reshape(-1)
        flat[:nb] = bits
        old_t, old_nb = self._frames[row], self._bytes[row]
        if old_t > t:  # left over from the last fill
            self.pose[row, t:old_t] = 0
            self.pose_mask[row, t:old_t] = False
        if old_nb > nb:
            flat[nb:old_nb] = 0
        self._frames[row], self._bytes[row] = t, nb

    def clear(self, row: int) -> None:
        self.put(row, self.pose[row, :0], self.bits[row].reshape(-1)[:0])

    def batch(self, **rest) -> dict[str, np.ndarray]:
        self.filling = False  # from now on the batch's references keep the arrays
        return {"pose": self.pose, "pose_mask": self.pose_mask, "pose_observed": self.bits,
                **rest}  # fmt: skip

    def free(self) -> bool:
        """Nothing holds the arrays but us: no batch handed out, no JAX array aliasing them
        on CPU, no view of them (each holds a reference to a view or to the storage)."""
        # getrefcount counts its own argument; a storage's references are our attribute
        # and our view's base.
        refs = sys.getrefcount
        return (
            not self.filling
            and refs(self.pose) == refs(self.pose_mask) == refs(self.bits) == 2
            and refs(self._pose) == refs(self._mask) == refs(self._bits) == 3
        )


class _BufferPool:
    """Reuses `_DeviceBuffers` whose batches are gone. A fresh batch array costs a page fault
    per page written (with transparent huge pages, sometimes a compaction stall): measured
    several times the copy itself."""

    def __init__(self, settings: InputSettings, dtype: np.dtype, size: int = 6):
        self.settings, self.dtype, self.size = settings, dtype, size
        self._pool: list[_DeviceBuffers] = []  # least recently used first
        self._lock = threading.Lock()  # grain's read threads fill batches concurrently

    def __getstate__(self):
        return {"settings": self.settings, "dtype": self.dtype, "size": self.size}

    def __setstate__(self, state):
        self.__init__(**state)

    def get(self, rows: int, length: int) -> _DeviceBuffers:
        with self._lock:
            free = [b for b in self._pool if b.rows == rows and b.free()]
            fits = [b for b in free if b.capacity >= length]
            if fits:
                buf = fits[0]
                self._pool.remove(buf)
            else:
                if free:  # too short: replace the least recently used free one
                    self._pool.remove(free[0])
                elif len(self._pool) >= self.size:
                    self._pool.pop(0)  # in use elsewhere; dropped from the pool
                capacity = max([length] + [b.capacity for b in self._pool if b.rows == rows])
                buf = _DeviceBuffers(rows, capacity, self.settings, self.dtype)
            self._pool.append(buf)
            buf.shape(length)
            buf.filling = True
            return buf


class _DeviceCollate:
    """List of device examples (`_Prepare._device_example`) -> device-augmentation batch."""

    def __init__(self, settings: InputSettings, dtype: np.dtype):
        self.settings, self.dtype = settings, dtype

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        longest = max((e["slot"] for e in elements if "points" in e), default=1)
        buf = _DeviceBuffers(len(elements), device_length(longest, self.settings),
                             self.settings, self.dtype)  # fmt: skip
        for i, e in enumerate(elements):
            if "points" in e:
                buf.put(i, e["points"], e["bits"])
        return buf.batch(
            aug_frames=np.array([e.get("aug_frames", 0) for e in elements], np.int32),
            aug_id=np.array([(e.get("epoch", 0), e["index"]) for e in elements], np.int32),
            text_ids=np.stack([e["text_ids"] for e in elements]).astype(np.int32),
            text_mask=np.stack([e["text_mask"] for e in elements]).astype(bool),
            index=np.array([e["index"] for e in elements], np.int64),
            label=np.array([e.get("label", -1) for e in elements], np.int32),
            valid=np.array(["points" in e for e in elements], bool),
        )


def _packed_view(data: bytes, name: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A packed record (sources/packed.py, encode_packed) without copies: (header, points
    [T, P*C] as stored, observed bits). DataError if it is not one."""
    try:
        if data[:4] != packed_lib.PACKED_MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8 : 8 + n])
        t, p, c = int(header["frames"]), int(header["points"]), int(header["channels"])
        dtype = np.dtype(header["dtype"])
        start = 8 + n
        points = np.frombuffer(data, dtype, t * p * c, start).reshape(t, p * c)
        bits = np.frombuffer(data, np.uint8, (t * p + 7) // 8, start + points.nbytes)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise DataError(f"{name} is not a valid packed pose record ({e})") from None
    header["_shape"] = (t, p, c)
    return header, points, bits


class _PackedWindows:
    """grain MapWithIndex over windows of K x B source indices of packed shards -> the
    window's K device-augmentation batches (K = data.length_group_batches, else 1).

    Runs in the worker processes: reads the window's records in one call, parses their
    headers, draws the resampled frame counts for the whole window at once and copies each
    clip's stored bytes into the padded batch arrays. With K > 1 the rows are sorted by slot
    length, cut into K batches and emitted in an order drawn from (seed, window), as
    `_LengthGroups` does. A record that cannot be read becomes an empty row (valid False, no
    frames, empty caption) and is reported in the batch's "bad" list, which `_CountBatches`
    counts and drops.
    """

    def __init__(self, source, settings: InputSettings, tokenizer, *, seed: int,
                 process_index: int, process_count: int, batch_size: int, groups: int):  # fmt: skip
        self.paths = list(source.paths)
        self.prepare = _Prepare(source, settings, tokenizer, seed=seed, train=True)
        self.prepare.source = None  # records are read here, not through the source
        self.settings, self.seed = settings, seed
        self.p, self.c, self.n = process_index, process_count, len(source)
        self.batch_size, self.groups = batch_size, max(groups, 1)
        self.compact = settings.workers > 0  # worker processes send unpadded clips
        self.dtype = device_raw_dtype(settings, source)
        self._reader = None
        self._texts: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
        # Alive at once: the prefetched windows, the one being consumed, the loop's few.
        pool = (_window_prefetch(settings) + 5) * self.groups
        self._buffers = _BufferPool(settings, self.dtype, size=pool)

    def __getstate__(self):
        # Each worker opens its own reader and keeps its own caches (the pool pickles empty).
        return {**self.__dict__, "_reader": None, "_texts": {}}

    def _text(self, header: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(text_ids, text_mask) of a record's caption, cached: the prompt depends on the
        caption and the two languages only (Spreadthesign: ~18k captions for 450k rows)."""
        key = (header.get("text", ""), header.get("sign_language", ""),
               header.get("spoken_language", ""))  # fmt: skip
        hit = self._texts.get(key)
        if hit is None:
            if len(self._texts) >= 65536:
                self._texts.clear()
            hit = self._texts[key] = self.prepare.encode(self.prepare.prompt(header))
        return hit

    def _read(self, indices: list[int]) -> list[bytes]:
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
        # One record at a time: __getitems__'s reader threads cost ~2x the CPU per record
        # (measured), and CPU per record is what the host budget counts.
        return [self._reader[i] for i in indices]

    def __call__(self, window: int, indices: np.ndarray) -> list[dict[str, Any]]:
        settings, num_points = self.settings, self.settings.spec.num_points
        indices = np.asarray(indices, np.int64)
        rows = len(indices)
        position = int(window) * rows + np.arange(rows)
        epoch = (self.p + position * self.c) // self.n
        parsed: list[Any] = []
        bad: list[str | None] = []
        for i, data in zip(indices, self._read(indices.tolist())):
            name = f"packed record {i} of {self.paths[0]}..."
            try:
                header, points, bits = _packed_view(data, name)
                t, p, c = header["_shape"]
                if p != num_points or c != 3:
                    raise DataError(
                        f"{name}: stored pose has {p} points x {c}, expected {num_points} x 3"
                        " (packed with other components?)"
                    )
                if t == 0:
                    raise DataError(f"{name}: pose has no frames")
                parsed.append((header, points, bits))
                bad.append(None)
            except UserError as e:
                parsed.append(None)
                bad.append(str(e))
        ok = np.array([x is not None for x in parsed])
        frames = np.array([x[0]["_shape"][0] if x else 0 for x in parsed], np.int64)
        fps = np.array([x[0]["fps"] if x else 0.0 for x in parsed], np.float64)
        t_in, resampled = device_frames(frames, fps, epoch, indices, settings, self.seed)
        t_in, resampled = np.where(ok, t_in, 0), np.where(ok, resampled, 0)
        slot = np.maximum(t_in, resampled)
        if self.groups > 1:
            order = np.argsort(slot, kind="stable")
            b = self.batch_size
            cuts = [order[k * b : (k + 1) * b] for k in range(self.groups)]
            rng = np.random.default_rng([self.seed % 2**32, int(window)])
            cuts = [cuts[k] for k in rng.permutation(self.groups)]
        else:
            cuts = [np.arange(rows)]
        out = []
        for rows_k in cuts:
            length = device_length(int(slot[rows_k].max(initial=1)), settings)
            ids, masks, clips = [], [], []
            for r in rows_k:
                if parsed[r] is None:
                    ids_r, mask_r = self.prepare.encode("")
                    clips.append(None)
                else:
                    header, points, bits = parsed[r]
                    t = int(t_in[r])
                    clips.append((points[:t], bits[: (t * num_points + 7) // 8]))
                    ids_r, mask_r = self._text(header)
                ids.append(ids_r)
                masks.append(mask_r)
            if self.compact:  # padded in the main process (`_Pad`), after the transfer
                arrays = _compact(clips, length, self.dtype, settings)
            else:
                arrays = _pad_into(self._buffers, clips, length)
            out.append(dict(
                arrays,
                aug_frames=resampled[rows_k].astype(np.int32),
                aug_id=np.stack([epoch[rows_k], indices[rows_k]], -1).astype(np.int32),
                text_ids=np.stack(ids).astype(np.int32),
                text_mask=np.stack(masks).astype(bool),
                index=indices[rows_k],
                label=np.array([int(parsed[r][0].get("label", -1)) if parsed[r] else -1
                                for r in rows_k], np.int32),
                valid=ok[rows_k],
                bad=[bad[r] for r in rows_k if bad[r] is not None],
            ))  # fmt: skip
        return out


def _pad_into(pool: _BufferPool, clips: list, length: int) -> dict[str, np.ndarray]:
    """[(points [T, P*3], bits) or None (an empty row)] -> pose, pose_mask, pose_observed."""
    buf = pool.get(len(clips), length)
    for j, clip in enumerate(clips):
        if clip is None:
            buf.clear(j)
        else:
            buf.put(j, *clip)
    return buf.batch()


def _compact(clips: list, length: int, dtype: np.dtype, settings: InputSettings):
    """The clips without padding, for the trip from a worker process (padded batches of short
    clips are mostly zeros, and grain copies every byte into fresh shared memory)."""
    width = settings.spec.num_points * 3
    real = [c for c in clips if c is not None]
    return {
        "compact_points": np.concatenate([c[0] for c in real]) if real
        else np.zeros((0, width), dtype),
        "compact_bits": np.concatenate([c[1] for c in real]) if real else np.zeros(0, np.uint8),
        "compact_frames": np.array([len(c[0]) if c else 0 for c in clips], np.int64),
        "compact_bytes": np.array([len(c[1]) if c else 0 for c in clips], np.int64),
        "compact_length": np.int64(length),
    }  # fmt: skip


class _Pad:
    """A compact batch from a worker (`_compact`) -> the padded batch (main process)."""

    def __init__(self, settings: InputSettings, dtype: np.dtype, pool_size: int):
        self.pool = _BufferPool(settings, dtype, pool_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        points, bits = batch.pop("compact_points"), batch.pop("compact_bits")
        frames, nbytes = batch.pop("compact_frames"), batch.pop("compact_bytes")
        length = int(batch.pop("compact_length"))
        p_end, b_end = np.cumsum(frames), np.cumsum(nbytes)
        clips = [
            (points[pe - t : pe], bits[be - nb : be]) if t else None
            for t, nb, pe, be in zip(frames, nbytes, p_end, b_end)
        ]
        return {**_pad_into(self.pool, clips, length), **batch}


# The iterator state of `_PackedWindows` batches says so: another pipeline's state (a run
# started with data.augment_on_device off, or from another source) cannot restore it.
_WINDOWS_LAYOUT = "device-windows"


def _check_layout(state, want: str | None) -> None:
    have = state.get("layout") if isinstance(state, dict) else None
    if have != want:
        saved = (
            "the batch reader of packed shards with data.augment_on_device=True"
            if have
            else "the per-example pipeline (data.augment_on_device=False, or not packed shards)"
        )
        raise UserError(
            f"the checkpoint's input-pipeline state was saved by {saved}; resume with the "
            "data settings it was saved with (data.augment_on_device, data.source)"
        )


class _CountBatchesIterator(grain.DatasetIterator):
    """Counts the rows and the unreadable ones ("bad") of `_PackedWindows` batches; the
    same counters, checks and state as `_SkipBadIterator`."""

    def __init__(self, parent, owner: _CountBatches):
        super().__init__(parent)
        self._owner = owner
        self._examined = 0
        self._skipped = 0
        self._examples: list[str] = []

    def __next__(self):
        batch = dict(next(self._parent))
        messages = list(batch.pop("bad", []))
        self._examined += len(batch["index"])
        self._skipped += len(messages)
        for message in messages:
            if len(self._examples) < 5 and message not in self._examples:
                self._examples.append(message)
            log.warning("unreadable example (an empty row in its batch): %s", message)
        if messages:
            self._check()
        return batch

    _check = _SkipBadIterator._check
    stats = _SkipBadIterator.stats
    finish = _SkipBadIterator.finish

    def get_state(self):
        return {**_SkipBadIterator.get_state(self), "layout": _WINDOWS_LAYOUT}

    def set_state(self, state):
        _SkipBadIterator.set_state(self, state)

    def __str__(self) -> str:
        return "CountBatchesIterator"


class _CountBatches(grain.IterDataset):
    def __init__(self, parent, settings: InputSettings, *, pre_skipped, what: str):
        super().__init__(parent)
        self.settings, self.pre_skipped, self.what = settings, list(pre_skipped), what
        self.drop = True
        self.latest: _CountBatchesIterator | None = None

    def __iter__(self) -> _CountBatchesIterator:
        self.latest = _CountBatchesIterator(self._parent.__iter__(), self)
        return self.latest

    def __str__(self) -> str:
        return "CountBatches"


class _Unwindow(grain.experimental.FlatMapTransform):
    """A window's list of K batches -> the batches (grain re-reads the window on resume)."""

    def __init__(self, groups: int):
        self.max_fan_out = groups

    def flat_map(self, element):
        return element


def _window_prefetch(settings: InputSettings) -> int:
    return max(settings.read_threads, 2)


def _packed_device_iterator(ds, source, settings, tokenizer, *, seed, process_index,
                            process_count, batch_size):  # fmt: skip
    """`make_train_iterator` under data.augment_on_device with packed shards: `ds` (the
    per-process index stream) in windows of K x B, read and batched in the workers."""
    groups = max(settings.length_group_batches, 1)
    windows = ds.batch(groups * batch_size, drop_remainder=True)
    windows = windows.map_with_index(
        _PackedWindows(
            source, settings, tokenizer, seed=seed, process_index=process_index,
            process_count=process_count, batch_size=batch_size, groups=groups,
        )
    )  # fmt: skip
    # Windows are whole batches: a few ahead keep the device fed (and the buffers reusable).
    threads = max(settings.read_threads, 1)
    it = windows.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_window_prefetch(settings))
    )
    if settings.workers > 0:
        _ensure_flags_parsed()
        if settings.min_shm_bytes:
            it = grain.experimental.WithOptionsIterDataset(
                it, grain.experimental.DatasetOptions(min_shm_size=settings.min_shm_bytes)
            )
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=settings.workers,
                                         per_worker_buffer_size=2)
        )  # fmt: skip
    it = grain.experimental.FlatMapIterDataset(it, _Unwindow(groups))
    if settings.workers > 0:
        pool = (_window_prefetch(settings) + 5) * groups + settings.workers * 2
        it = it.map(_Pad(settings, device_raw_dtype(settings, source), pool))
    counter = _CountBatches(it, settings, pre_skipped=getattr(source, "skipped", []),
                            what="training data")  # fmt: skip
    return InputIterator(counter.__iter__(), counter)


# ---------------------------------------------------------------------------------------------
# Iterators.


class InputIterator(grain.DatasetIterator):
    """The batch iterator plus `stats()`. A grain DatasetIterator, so orbax's grain handler
    (`grain.checkpoint.CheckpointSave/Restore`) saves and restores its state."""

    def __init__(self, parent, skipper: _SkipBad, *, num_batches: int | None = None):
        super().__init__(parent)
        self._skip = skipper.latest
        self.num_batches = num_batches
        self._produced = 0

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._parent)
        except StopIteration:
            self._skip.finish()
            raise
        self._produced += 1
        return batch

    def stats(self) -> InputStats:
        """Examples examined / skipped so far by this process (restored with the state)."""
        return self._skip.stats()

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        windows = isinstance(self._skip, _CountBatchesIterator)
        _check_layout(state, _WINDOWS_LAYOUT if windows else None)
        self._parent.set_state(state)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless training iterator has no length")
        return self.num_batches

    def __str__(self) -> str:
        return "InputIterator"


def _ensure_flags_parsed() -> None:
    # grain's worker processes read absl flags (dependency probe, pitfall 6a).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(
    ds, source, settings, tokenizer, *, drop, what, batch_size, drop_remainder, group_seed=None
):
    workers = settings.workers
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=max(settings.read_threads, 1), prefetch_buffer_size=settings.prefetch
        )
    )
    if workers > 0:
        _ensure_flags_parsed()
        if settings.min_shm_bytes:
            it = grain.experimental.WithOptionsIterDataset(
                it, grain.experimental.DatasetOptions(min_shm_size=settings.min_shm_bytes)
            )
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=settings.worker_buffer
            )
        )
    ids, mask = encode_text(tokenizer, "", max_len=settings.text_max_len)
    skipper = _SkipBad(
        it, settings, drop=drop, pre_skipped=getattr(source, "skipped", []), what=what,
        pad_text={"text_ids": ids, "text_mask": mask},
    )  # fmt: skip
    if drop and settings.augment_on_device:  # training batches for the device augmentation
        collate = _DeviceCollate(settings, device_raw_dtype(settings, source))
    else:
        collate = _Collate(settings, with_prompt=not drop)
    groups = settings.length_group_batches
    if group_seed is None or groups <= 1:
        batched = skipper.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    else:
        windows = skipper.batch(groups * batch_size, drop_remainder=True, batch_fn=list)
        windows = windows.map_with_index(lambda number, examples: (number, examples))
        batched = grain.experimental.FlatMapIterDataset(
            windows, _LengthGroups(collate, batch_size, groups, group_seed)
        )
    return batched, skipper


def make_train_iterator(
    source,
    config,
    *,
    tokenizer,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    batch_size_per_process: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
) -> InputIterator:
    """Endless (or `num_epochs`) stream of augmented, shuffled training batches.

    Each process reads every `process_count`-th element of the global shuffled stream
    (disjoint slices). Reshuffled every epoch; bad examples are skipped and counted
    (`iterator.stats()`); more than data.max_bad_fraction of them is a UserError.
    """
    settings = settings_from_config(config)
    n = len(source)
    if n == 0:
        raise UserError(f"the training data source {source!r} has no examples")
    if batch_size_per_process <= 0:
        raise UserError(f"batch size per process must be > 0, got {batch_size_per_process}")
    _check_source(source, settings, "training data")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.seed(int(seed) % 2**32).shuffle()
    ds = ds.repeat(num_epochs)[process_index::process_count]
    if settings.augment_on_device and isinstance(source, packed_lib.PackedSource):
        return _packed_device_iterator(
            ds, source, settings, tokenizer, seed=seed, process_index=process_index,
            process_count=process_count, batch_size=batch_size_per_process,
        )  # fmt: skip
    ds = ds.map_with_index(
        _Prepare(
            source, settings, tokenizer, seed=seed, train=True,
            process_index=process_index, process_count=process_count,
        )
    )  # fmt: skip
    batched, skipper = _finish(
        ds, source, settings, tokenizer, drop=True, what="training data",
        batch_size=batch_size_per_process, drop_remainder=True, group_seed=seed,
    )  # fmt: skip
    return InputIterator(batched.__iter__(), skipper)


def bad_example_stats(iterator: InputIterator) -> dict[str, float]:
    """Counters for metrics/checkpoint metadata: data_examined, data_skipped, data_bad_fraction
    (this process's; the state restores them on resume)."""
    stats = iterator.stats()
    return {
        "data_examined": float(stats.examined),
        "data_skipped": float(stats.skipped),
        "data_bad_fraction": float(stats.fraction),
    }


def eval_num_batches(n: int, process_count: int, batch_size_per_process: int) -> int:
    """Batches every process runs over an n-example eval set (the same on all processes)."""
    per_process = math.ceil(n / process_count)
    return math.ceil(per_process / batch_size_per_process)


def make_eval_batches(
    source,
    config,
    *,
    tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    batch_size_per_process: int | None = None,
    batch_size: int | None = None,
) -> InputIterator:
    """One deterministic pass, no augmentation; process p takes examples p, p+count, ...

    Every process yields `eval_num_batches(...)` batches (`len(iterator)`); padding rows and
    unusable examples have valid=False and index -1. Rows keep their source index in "index";
    "prompt" holds each row's prompt string (object array; "" for padding).
    `batch_size` is an alias of `batch_size_per_process`.
    """
    settings = settings_from_config(config)
    n = len(source)
    if batch_size_per_process is None:
        batch_size_per_process = batch_size
    if batch_size_per_process is None:
        raise UserError("make_eval_batches needs batch_size_per_process")
    if batch_size_per_process <= 0:
        raise UserError(f"batch size per process must be > 0, got {batch_size_per_process}")
    _check_source(source, settings, "evaluation data")
    num_batches = eval_num_batches(n, process_count, batch_size_per_process)
    ds = grain.MapDataset.range(num_batches * batch_size_per_process)
    ds = ds.map(_EvalIndex(n, process_index, process_count))
    ds = ds.map_with_index(_Prepare(source, settings, tokenizer, seed=0, train=False))
    batched, skipper = _finish(
        ds, source, settings, tokenizer, drop=False, what="evaluation data",
        batch_size=batch_size_per_process, drop_remainder=False,
    )  # fmt: skip
    return InputIterator(batched.__iter__(), skipper, num_batches=num_batches)


__all__ = [
    "InputIterator",
    "InputSettings",
    "InputStats",
    "bad_example_stats",
    "bucket_length",
    "eval_num_batches",
    "example_rng",
    "make_eval_batches",
    "make_train_iterator",
    "pad_to_length",
    "record_features",
    "record_pose_array",
    "settings_from_config",
]
