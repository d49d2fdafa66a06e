"""The shapes of the timed batches: the Spreadthesign length model and `plan_batches`.

Shared by the train mode (the JAX step and the PyTorch twin time the same plan) and the
lengths mode (which only counts its padding and FLOPs). numpy only: no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Spreadthesign English poses (reference section 6.4): 453,261 clips, mean 97.8 frames,
# median 89, truncated to 256. Modelled as a log-normal with that median and mean:
# mu = ln 89, sigma = sqrt(2 ln(97.8 / 89)) = 0.434; rounded, clipped to [1, max_frames].
ST_MEDIAN_FRAMES = 89.0
ST_MEAN_FRAMES = 97.8

# Captions "<en> <ase> {text}": the two tags are 7 word pieces ("<", "en", ">", "<", "as",
# "##e", ">"), the text 1 + Poisson(1.5) (single words and short phrases), plus [CLS], [SEP].
PROMPT_TAG_PIECES = 7
TEXT_EXTRA_PIECES_MEAN = 1.5


def spreadthesign_lengths(rng: np.random.Generator, n: int, max_frames: int = 256) -> np.ndarray:
    """n pose lengths [n] int from the Spreadthesign distribution (log-normal, see above)."""
    sigma = np.sqrt(2 * np.log(ST_MEAN_FRAMES / ST_MEDIAN_FRAMES))
    raw = rng.lognormal(np.log(ST_MEDIAN_FRAMES), sigma, size=n)
    return np.clip(np.rint(raw), 1, max_frames).astype(np.int32)


def caption_lengths(rng: np.random.Generator, n: int, text_len: int) -> np.ndarray:
    """n valid caption lengths [n] int ([CLS] .. [SEP]), clipped to text_len."""
    pieces = 2 + PROMPT_TAG_PIECES + 1 + rng.poisson(TEXT_EXTRA_PIECES_MEAN, size=n)
    return np.minimum(pieces, text_len).astype(np.int32)


@dataclasses.dataclass
class BatchPlan:
    """The shapes of the timed steps: row lengths, padded length and caption lengths."""

    lengths: np.ndarray  # [steps, B] int: real frames per row
    padded: np.ndarray  # [steps] int: the frame axis of each step's batch
    text_lengths: np.ndarray  # [steps, B] int: valid caption tokens per row
    text_len: int  # S, the caption axis

    @property
    def steps(self) -> int:
        return len(self.padded)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[1])

    def masks(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(pose_mask [B, L_step], text_mask [B, S]) bool."""
        frames = np.arange(int(self.padded[step]))[None]
        tokens = np.arange(self.text_len)[None]
        return (
            frames < self.lengths[step][:, None],
            tokens < self.text_lengths[step][:, None],
        )

    def summary(self) -> dict[str, Any]:
        useful = float(self.lengths.sum()) / float(self.padded.sum() * self.batch_size)
        return {
            "mean_pose_frames": float(self.lengths.mean()),
            "mean_padded_frames": float(self.padded.mean()),
            "useful_frame_fraction": useful,
            "padded_lengths": [int(x) for x in self.padded],
            "text_len": self.text_len,
            "mean_caption_tokens": float(self.text_lengths.mean()),
        }


def plan_batches(
    *,
    steps: int,
    batch_size: int,
    max_frames: int,
    text_len: int,
    frames: int | None = None,
    buckets: tuple[int, ...] = (),
    sort_by_length: bool = False,
    seed: int = 0,
) -> BatchPlan:
    """Row lengths of `steps` batches of `batch_size`.

    frames given: every batch is padded to `frames` (rows hold up to `frames` real frames).
    Else each batch is padded to the smallest of `buckets` + (max_frames,) that fits its
    longest row (data.length_buckets, as the input pipeline does). sort_by_length: the
    steps x batch_size rows are sorted by length before they are cut into batches (what a
    length-bucketing sampler does), then the batches are shuffled.
    """
    rng = np.random.default_rng(seed)
    cap = frames if frames is not None else max_frames
    lengths = spreadthesign_lengths(rng, steps * batch_size, cap)
    if sort_by_length:
        lengths = np.sort(lengths)
    lengths = lengths.reshape(steps, batch_size)
    if sort_by_length:
        lengths = lengths[rng.permutation(steps)]
    if frames is not None:
        padded = np.full(steps, frames, np.int32)
    else:
        allowed = (*sorted({b for b in buckets if 0 < b < max_frames}), max_frames)
        padded = np.array([min(a for a in allowed if a >= row.max()) for row in lengths], np.int32)
    texts = caption_lengths(rng, steps * batch_size, text_len).reshape(steps, batch_size)
    return BatchPlan(lengths=lengths, padded=padded, text_lengths=texts, text_len=text_len)
