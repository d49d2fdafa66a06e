"""Clip packing (`data.packing`, issue 16): several clips share one row of the video tower.

A batch of B clips padded to [B, L, D] becomes R rows of T tokens ([R, T, D], R << B): each
clip keeps its own [CLS], frames and [SEP] with the position ids the unpacked layout gives
them ([CLS] 0, frames 1..n, [SEP] max_frames + 1), and a per-row segment id (1, 2, ... in a
row; 0 = padding) that confines attention to the clip and lets pooling find it. The token
type is 0 everywhere, as unpacked, so none is stored. The contrastive batch stays a batch of
B clips: `clip_row` / `clip_segment` [B] say where each clip sits, and the model's packed
forward returns [B, H] in the batch's clip order. Captions are cut to the batch's longest
real caption, rounded up to a multiple (`trim_text`): the text tower's attention takes
sequence lengths, so the embeddings are the same.

Packing is a pure function of the batch (first-fit decreasing, ties by clip index): it is
applied to each process's own batch after batching, so the pipeline's sharding per process
and its exact resume carry over unchanged.

Microbatches and batch shards: GradCache microbatch m takes clips m, m+M, ... and rows m,
m+M, ... of the batch (train/grad_cache.py), and batch shard d (a device) holds a contiguous
block of both. So the clips of each (shard d, microbatch m) group are packed into rows of the
same group, every group gets the same number of rows, and `clip_row` is the row's index
inside its microbatch (the microbatch's rows in batch order). Nothing then moves between
devices, and each microbatch is a packed batch of its own.

Packed batch keys (besides every [B]-leading key of the input batch, passed through):
  packed_pose      [R, T, D] float  frame features at their slots, 0 elsewhere
  packed_segments  [R, T] int32     0 = padding, k = the row's k-th clip
  packed_positions [R, T] int32     position ids ([CLS] 0, frames 1..n, [SEP] max_frames + 1)
  clip_row         [B] int32        the clip's row (index inside its microbatch)
  clip_segment     [B] int32        the clip's segment id in that row
  text_ids / text_mask [B, S']      captions trimmed to S' <= S tokens
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from signclip_jax.errors import UserError

PACKED_INPUTS = (
    "packed_pose",
    "packed_segments",
    "packed_positions",
    "clip_row",
    "clip_segment",
    "text_ids",
    "text_mask",
)
# Keys of a padded batch that packing replaces.
PADDED_POSE_KEYS = ("pose", "pose_mask")


def is_packed(batch: Mapping) -> bool:
    """Whether a batch is in the packed layout (has `packed_pose`)."""
    return "packed_pose" in batch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every clip goes: the index arrays of a packed batch, without the features.

    segments, positions [R, T] int32; clip_row, clip_segment, clip_start, batch_row [B]
    int32 (clip_start: the slot of the clip's [CLS] in its row; batch_row: the clip's row in
    the batch, where clip_row is its index inside the microbatch: the same when M = 1).
    """

    segments: np.ndarray
    positions: np.ndarray
    clip_row: np.ndarray
    clip_segment: np.ndarray
    clip_start: np.ndarray
    batch_row: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.segments.shape[0])

    @property
    def row_len(self) -> int:
        return int(self.segments.shape[1])

    def useful_fraction(self) -> float:
        """Real tokens ([CLS], frames, [SEP]) / all R x T slots."""
        return float((self.segments > 0).sum()) / float(self.segments.size)


def first_fit_decreasing(tokens: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bins clips of `tokens` [n] tokens each into rows of `row_len`.

    Longest first (ties: lower index first), each into the first row it fits. Deterministic.
    Returns (row [n], start slot [n], number of rows).
    """
    tokens = np.asarray(tokens, np.int64)
    if tokens.size and (tokens.max() > row_len or tokens.min() < 1):
        raise ValueError(
            f"clip lengths must be 1..{row_len} tokens, got {tokens.min()}..{tokens.max()}"
        )
    order = np.lexsort((np.arange(tokens.size), -tokens))
    free: list[int] = []  # free slots per row
    row = np.zeros(tokens.size, np.int32)
    start = np.zeros(tokens.size, np.int32)
    for i in order:
        need = int(tokens[i])
        r = next((j for j, room in enumerate(free) if room >= need), len(free))
        if r == len(free):
            free.append(row_len)
        row[i], start[i] = r, row_len - free[r]
        free[r] -= need
    return row, start, len(free)


def _groups(batch_size: int, shards: int, microbatches: int) -> list[np.ndarray]:
    """Clip indices of each (shard d, microbatch m) group, in order g = d * M + m."""
    if shards < 1 or microbatches < 1 or batch_size % (shards * microbatches):
        raise UserError(
            f"batch of {batch_size} clips does not split into {shards} shard(s) x "
            f"{microbatches} microbatch(es)"
        )
    per_shard = batch_size // shards
    clips = np.arange(batch_size)
    return [
        clips[(clips // per_shard == d) & (clips % microbatches == m)]
        for d in range(shards)
        for m in range(microbatches)
    ]


def _rows_per_group(needed: int, groups: int, row_multiple: int, rows: int | None) -> int:
    if rows is not None:
        if rows % groups:
            raise UserError(f"rows={rows} is not a multiple of {groups} shard x microbatch groups")
        if rows // groups < needed:
            raise UserError(f"rows={rows} is too few: this batch needs {needed * groups}")
        return rows // groups
    per = max(needed, 1)
    while (per * groups) % max(row_multiple, 1):
        per += 1
    return per


def layout(
    frames: np.ndarray,
    *,
    row_len: int,
    max_frames: int,
    shards: int = 1,
    microbatches: int = 1,
    row_multiple: int = 1,
    rows: int | None = None,
) -> Layout:
    """The packed layout of clips with `frames` [B] real frames each (see the module doc).

    row_len: tokens per row T (>= max_frames + 2: a clip of max_frames fits alone).
    shards, microbatches: the batch's device shards and GradCache microbatches (groups).
    row_multiple: the total row count R is rounded up to a multiple of it (fewer distinct
    shapes, fewer compiles). rows: a fixed R instead (e.g. agreed over processes); an error
    when the clips do not fit.
    """
    frames = np.asarray(frames, np.int64)
    if row_len < max_frames + 2:
        raise UserError(f"packing row length {row_len} < max_frames + 2 = {max_frames + 2}")
    if frames.size and (frames.min() < 0 or frames.max() > max_frames):
        raise ValueError(f"clip frames must be 0..{max_frames}, got {frames.min()}..{frames.max()}")
    groups = _groups(frames.size, shards, microbatches)
    tokens = frames + 2
    placed = [first_fit_decreasing(tokens[g], row_len) for g in groups]
    per = _rows_per_group(
        max((n for _, _, n in placed), default=0), len(groups), row_multiple, rows
    )
    total = per * len(groups)
    per_shard = total // shards
    segments = np.zeros((total, row_len), np.int32)
    positions = np.zeros((total, row_len), np.int32)
    b = frames.size
    clip_row, clip_seg = np.zeros(b, np.int32), np.zeros(b, np.int32)
    clip_start, batch_row = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for gi, (clips, (row, start, _)) in enumerate(zip(groups, placed)):
        d, m = divmod(gi, microbatches)
        # Row k of group (d, m): batch row d * per_shard + k * M + m, microbatch row d * per + k.
        batch_rows = d * per_shard + row.astype(np.int64) * microbatches + m
        # Segment ids in slot order within each row (1, 2, ...).
        order = np.lexsort((start, row))
        seg = np.zeros(clips.size, np.int32)
        for j, i in enumerate(order):
            seg[i] = 1 if j == 0 or row[order[j - 1]] != row[i] else seg[order[j - 1]] + 1
        for i, c in enumerate(clips):
            r, s, n = int(batch_rows[i]), int(start[i]), int(frames[c])
            segments[r, s : s + n + 2] = seg[i]
            positions[r, s : s + n + 1] = np.arange(n + 1)
            positions[r, s + n + 1] = max_frames + 1
        clip_row[clips] = d * per + row
        clip_seg[clips] = seg
        clip_start[clips] = start
        batch_row[clips] = batch_rows
    return Layout(segments, positions, clip_row, clip_seg, clip_start, batch_row)


def rows_needed(
    frames: np.ndarray,
    *,
    row_len: int,
    max_frames: int,
    shards: int = 1,
    microbatches: int = 1,
    row_multiple: int = 1,
) -> int:
    """The rows R that `layout` packs these clips into (what processes agree on)."""
    frames = np.asarray(frames, np.int64)
    groups = _groups(frames.size, shards, microbatches)
    needed = max(first_fit_decreasing(frames[g] + 2, row_len)[2] for g in groups)
    return _rows_per_group(needed, len(groups), row_multiple, None) * len(groups)


def text_length(text_mask: np.ndarray, multiple: int = 8) -> int:
    """The caption axis a batch needs: its longest real caption rounded up to `multiple`
    (at most the current axis; at least 1)."""
    s = int(text_mask.shape[1])
    longest = int(np.asarray(text_mask, bool).sum(-1).max(initial=0))
    multiple = max(int(multiple), 1)
    return min(s, max(multiple, -(-longest // multiple) * multiple))


def trim_text(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Cuts (or zero-pads) text_ids / text_mask [B, S] to [B, length]. Only padding may be cut:
    a valid-prefix caption longer than `length` is an error. Embeddings do not change."""
    out = dict(batch)
    ids, mask = np.asarray(batch["text_ids"]), np.asarray(batch["text_mask"], bool)
    s = ids.shape[1]
    if length < s:
        if mask[:, length:].any():
            raise ValueError(f"cannot cut captions to {length} tokens: some are longer")
        out["text_ids"], out["text_mask"] = ids[:, :length], mask[:, :length]
    elif length > s:
        out["text_ids"] = np.pad(ids, ((0, 0), (0, length - s)))
        out["text_mask"] = np.pad(mask, ((0, 0), (0, length - s)))
    return out


def frame_counts(pose_mask: np.ndarray) -> np.ndarray:
    """Valid-prefix pose_mask [B, L] -> frames per clip [B] int."""
    return np.asarray(pose_mask, bool).sum(-1).astype(np.int64)


def pack_batch(
    batch: Mapping[str, np.ndarray],
    *,
    row_len: int,
    max_frames: int,
    shards: int = 1,
    microbatches: int = 1,
    row_multiple: int = 1,
    rows: int | None = None,
    text_multiple: int | None = 8,
    text_len: int | None = None,
) -> dict[str, np.ndarray]:
    """A padded batch {"pose" [B, L, D], "pose_mask" [B, L], "text_ids"/"text_mask" [B, S],
    other [B, ...] keys} -> the packed batch (module doc). Host-side numpy, deterministic.

    Captions: cut to `text_len` if given, else to `text_length(text_mask, text_multiple)`;
    text_multiple None keeps them as they are.
    """
    pose = np.asarray(batch["pose"])
    frames = frame_counts(batch["pose_mask"])
    lay = layout(
        frames, row_len=row_len, max_frames=max_frames, shards=shards,
        microbatches=microbatches, row_multiple=row_multiple, rows=rows,
    )  # fmt: skip
    packed_pose = np.zeros((lay.rows, row_len, pose.shape[-1]), pose.dtype)
    for c, n in enumerate(frames):
        s = int(lay.clip_start[c]) + 1  # frames follow the clip's [CLS]
        packed_pose[lay.batch_row[c], s : s + n] = pose[c, :n]
    out = {k: v for k, v in batch.items() if k not in PADDED_POSE_KEYS}
    out.update(
        packed_pose=packed_pose,
        packed_segments=lay.segments,
        packed_positions=lay.positions,
        clip_row=lay.clip_row,
        clip_segment=lay.clip_segment,
    )
    if text_len is None and text_multiple is not None:
        text_len = text_length(batch["text_mask"], text_multiple)
    if text_len is not None:
        text = trim_text(batch, text_len)
        out.update(text_ids=text["text_ids"], text_mask=text["text_mask"])
    return out


def microbatch_major(batch: Mapping[str, np.ndarray], microbatches: int) -> dict:
    """Every leaf [N, ...] -> [M, N / M, ...] with [m, j] = leaf[j * M + m]: microbatch m (rows
    and clips m, m+M, ...) along the leading axis. A packed batch's leaves lead with R rows or
    B clips; stacked this way they share the leading size M that GradCache splits on, and
    leaf[m] is exactly the microbatch GradCache would take. Works on numpy and jax arrays."""

    def stack(x):
        n = x.shape[0]
        if n % microbatches:
            raise UserError(
                f"a leading size of {n} does not split into {microbatches} microbatches"
            )
        return x.reshape(n // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    return {k: stack(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Packing inside the train step (data.packing): the host sends the padded clips and where each
# slot's token comes from; the step gathers the rows after its own augmentation, which may
# shorten clips (frame dropout), so the host cannot write the rows itself.

# Host keys of a batch that the step packs (`pack_on_device`): besides pose / pose_mask.
SLOT_KEYS = ("packed_clip", "packed_offset", "packed_segments", "clip_row", "clip_segment")


def is_slotted(batch: Mapping) -> bool:
    """Whether a batch carries the slot arrays the train step packs (`device_slots`)."""
    return "packed_clip" in batch


def device_slots(
    frames: np.ndarray,
    *,
    row_len: int,
    max_frames: int,
    shards: int = 1,
    microbatches: int = 1,
    row_multiple: int = 1,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """The slot arrays of clips with at most `frames` [B] frames each (after the step's
    augmentation they may have fewer): `layout`'s arrays plus, per slot, its clip and offset.

      packed_clip     [R, T] int32  the slot's clip, counted inside its batch shard (0 at padding)
      packed_offset   [R, T] int32  the slot's place in its clip: 0 [CLS], 1..n frames, n+1 [SEP]
      packed_segments [R, T] int32  as `layout` (0 = padding)
      clip_row, clip_segment [B] int32  as `layout`

    Each batch shard's rows hold only that shard's clips, so `pack_on_device` gathers inside
    each shard. Arguments as `layout`.
    """
    frames = np.asarray(frames, np.int64)
    lay = layout(
        frames, row_len=row_len, max_frames=max_frames, shards=shards,
        microbatches=microbatches, row_multiple=row_multiple, rows=rows,
    )  # fmt: skip
    per_shard = max(frames.size // shards, 1)
    packed_clip = np.zeros((lay.rows, row_len), np.int32)
    packed_offset = np.zeros((lay.rows, row_len), np.int32)
    for c, n in enumerate(frames):
        r, s = int(lay.batch_row[c]), int(lay.clip_start[c])
        packed_clip[r, s : s + n + 2] = c % per_shard
        packed_offset[r, s : s + n + 2] = np.arange(n + 2)
    return {
        "packed_clip": packed_clip,
        "packed_offset": packed_offset,
        "packed_segments": lay.segments,
        "clip_row": lay.clip_row,
        "clip_segment": lay.clip_segment,
    }


def pack_on_device(batch: Mapping[str, jax.Array], *, max_frames: int, shards: int) -> dict:
    """A padded batch with slot arrays (`device_slots`) -> the packed batch (module doc).
    Traceable: runs inside the jitted train step, after the augmentation.

    pose [B, L, D], pose_mask [B, L] (valid prefix: clip c has n_c frames, at most what the
    slots were sized for) -> packed_pose [R, T, D], packed_segments [R, T] (the slots past a
    shortened clip's [SEP] become padding), packed_positions [R, T]. Other keys pass through.
    The gather runs per batch shard (a leading axis of `shards`, which the batch sharding
    splits), so no clip moves between devices.
    """
    pose, mask = jnp.asarray(batch["pose"]), jnp.asarray(batch["pose_mask"])
    b, length, dim = pose.shape
    clip = jnp.asarray(batch["packed_clip"], jnp.int32)
    offset = jnp.asarray(batch["packed_offset"], jnp.int32)
    segments = jnp.asarray(batch["packed_segments"], jnp.int32)
    r, t = segments.shape
    if b % shards or r % shards:
        raise ValueError(f"{b} clips and {r} rows do not split into {shards} batch shards")
    frames = jnp.sum(mask, axis=1).astype(jnp.int32)

    def per_shard(pose_s, frames_s, clip_s, offset_s):  # [B/S, L, D], [B/S], [R/S, T] x 2
        n = frames_s[clip_s]  # the slot's clip's frames
        frame = jnp.take_along_axis(
            pose_s.reshape(-1, dim),
            (clip_s * length + jnp.clip(offset_s - 1, 0, length - 1)).reshape(-1, 1),
            axis=0,
        ).reshape(*clip_s.shape, dim)
        return frame, n

    frame, n = jax.vmap(per_shard)(
        pose.reshape(shards, b // shards, length, dim),
        frames.reshape(shards, b // shards),
        clip.reshape(shards, r // shards, t),
        offset.reshape(shards, r // shards, t),
    )
    frame, n = frame.reshape(r, t, dim), n.reshape(r, t)
    real = segments > 0
    is_frame = real & (offset >= 1) & (offset <= n)
    is_sep = real & (offset == n + 1)
    keep = real & (offset <= n + 1)
    out = {k: v for k, v in batch.items() if k not in (*PADDED_POSE_KEYS, *SLOT_KEYS)}
    out["packed_pose"] = jnp.where(is_frame[..., None], frame, jnp.zeros((), pose.dtype))
    out["packed_segments"] = jnp.where(keep, segments, 0)
    out["packed_positions"] = jnp.where(is_sep, max_frames + 1, jnp.where(keep, offset, 0))
    out["clip_row"] = jnp.asarray(batch["clip_row"], jnp.int32)
    out["clip_segment"] = jnp.asarray(batch["clip_segment"], jnp.int32)
    return out


__all__ = [
    "PACKED_INPUTS",
    "SLOT_KEYS",
    "Layout",
    "device_slots",
    "first_fit_decreasing",
    "frame_counts",
    "is_packed",
    "is_slotted",
    "layout",
    "microbatch_major",
    "pack_batch",
    "pack_on_device",
    "rows_needed",
    "text_length",
    "trim_text",
]
