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

Multi-process runs: the bucket is chosen per process from its own rows, so processes can get
different L; pad every process to a common length (`pad_to_length`) before assembling a global
array, or leave data.length_buckets empty. Training agrees on that length inside the train
step, a step ahead, with no host collective per step (train/loop.py, `_Inputs`); evaluation
all-gathers it per batch (train/step.py, `model_inputs`). Padding more never changes numerics.

config.data keys read here (all optional): max_frames, pose_components, include_z,
prompt_template, text_max_len, length_buckets, length_group_batches, augment (keyword arguments of
augment.augment), max_bad_fraction, bad_check_min, workers, read_threads, prefetch,
worker_buffer, min_shm_bytes, sign_language / spoken_language (defaults for records without
one), signed_names (code -> name for the {signed_name} prompt field), pose_dtype (auto:
model.dtype when 16-bit; see InputSettings).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
from absl import flags

from signclip_jax import config as config_lib
from signclip_jax.data import augment as augment_lib
from signclip_jax.data import pose as pose_lib
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
            rng = None
            if self.train and self.settings.augment:
                epoch = (self.process_index + position * self.process_count) // self.n
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
        order = sorted(range(len(examples)), key=lambda i: examples[i]["features"].shape[0])
        b = self.batch_size
        batches = [
            self.collate([examples[i] for i in order[k * b : (k + 1) * b]])
            for k in range(len(order) // b)
        ]
        rng = np.random.default_rng([self.seed % 2**32, int(window_number)])
        return [batches[k] for k in rng.permutation(len(batches))]


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
