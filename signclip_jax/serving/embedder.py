"""Embeds poses and texts with a loaded run (signclip_jax/run.py): evaluate, embed, serve.

  poses: `.pose` path / bytes / features [T, D] -> first max_frames frames -> padded to the
    smallest length bucket that holds it, each on its own mask (the original server padded a
    request's poses together; here a pose's embedding never depends on its batch-mates);
  texts: strings as given (no prompt template: the caller writes "<en> <ase> house") ->
    tokenised as in training (text_max_len).

Batches are padded to a few fixed row counts (powers of two up to `batch_size`) so each
(rows, length) shape compiles once; rows are split over all local devices.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from signclip_jax.data import pipeline
from signclip_jax.data import pose as pose_lib
from signclip_jax.data import text as text_lib
from signclip_jax.errors import DataError
from signclip_jax.run import Run


def row_buckets(batch_size: int, multiple: int) -> tuple[int, ...]:
    """Padded row counts: powers of two times `multiple`, up to `batch_size` (rounded up)."""
    top = -(-max(batch_size, 1) // multiple) * multiple
    sizes, n = [], multiple
    while n < top:
        sizes.append(n)
        n *= 2
    return (*sizes, top)


class Embedder:
    """Jitted pose and text towers of a `Run`, batched over all local devices.

    Each distinct (rows, frames) shape compiles once; `warm_up()` compiles them all ahead.
    """

    def __init__(self, run: Run, *, batch_size: int = 64, devices: Sequence[Any] | None = None):
        self.run = run
        self.settings = run.settings
        self.spec = self.settings.spec
        self.text_max_len = self.settings.text_max_len
        devices = list(devices or jax.local_devices())
        self.mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        self._rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.row_sizes = row_buckets(batch_size, len(devices))
        graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
        self._params = jax.device_put(params, replicated)

        def pose_fn(p, pose, mask):
            return nnx.merge(graphdef, p, rest).embed_pose(pose, mask)

        def text_fn(p, ids, mask):
            return nnx.merge(graphdef, p, rest).embed_text(ids, mask)

        self._pose_fn = jax.jit(pose_fn, out_shardings=replicated)
        self._text_fn = jax.jit(text_fn, out_shardings=replicated)

    @property
    def hidden_size(self) -> int:
        return self.run.model_config.hidden_size

    # -- inputs -------------------------------------------------------------------------------

    def pose_features(self, source: str | os.PathLike | bytes, *, name: str | None = None):
        """A `.pose` path or bytes -> features [min(T, max_frames), D] (DataError if unusable)."""
        return pose_lib.load_features(source, self.spec, name=name)

    def _rows_for(self, n: int) -> int:
        for size in self.row_sizes:
            if n <= size:
                return size
        return self.row_sizes[-1]

    def _put(self, array: np.ndarray):
        return jax.device_put(array, self._rows)

    # -- towers -------------------------------------------------------------------------------

    def embed_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Features [T_i, D] each (T_i >= 1; longer than max_frames keeps the first frames)
        -> [N, H] float32, in input order. Poses are grouped by length bucket."""
        out = np.zeros((len(features), self.hidden_size), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, f in enumerate(features):
            f = np.asarray(f)
            if f.ndim != 2 or f.shape[1] != self.spec.feature_dim or f.shape[0] == 0:
                raise DataError(
                    f"pose {i}: features of shape {f.shape}, expected [T >= 1, "
                    f"{self.spec.feature_dim}]"
                )
            length = pipeline.bucket_length(min(f.shape[0], self.spec.max_frames), self.settings)
            by_length.setdefault(length, []).append(i)
        top = self.row_sizes[-1]
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), top):
                chunk = indices[start : start + top]
                rows = self._rows_for(len(chunk))
                pose = np.zeros((rows, length, self.spec.feature_dim), np.float32)
                mask = np.zeros((rows, length), bool)
                for r, i in enumerate(chunk):
                    pose[r], mask[r] = pose_lib.pad_frames(np.asarray(features[i]), length)
                emb = self._pose_fn(self._params, self._put(pose), self._put(mask))
                out[chunk] = np.asarray(emb)[: len(chunk)]
        return out

    def embed_poses(self, sources: Iterable[str | os.PathLike | bytes]) -> np.ndarray:
        """`.pose` paths or bytes -> [N, H] float32 (first bad file raises a DataError)."""
        return self.embed_features([self.pose_features(s) for s in sources])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings, used as given -> [N, H] float32."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        top = self.row_sizes[-1]
        for start in range(0, len(texts), top):
            chunk = texts[start : start + top]
            ids, mask = text_lib.encode_texts(self.run.tokenizer, chunk, self.text_max_len)
            rows = self._rows_for(len(chunk))
            ids = np.pad(ids, ((0, rows - len(chunk)), (0, 0)))
            mask = np.pad(mask, ((0, rows - len(chunk)), (0, 0)))
            emb = self._text_fn(self._params, self._put(ids), self._put(mask))
            out[start : start + len(chunk)] = np.asarray(emb)[: len(chunk)]
        return out

    def warm_up(self) -> None:
        """Compiles every (rows, length) shape the pose tower can see, and the text tower."""
        for length in self.settings.lengths:
            for rows in self.row_sizes:
                pose = np.zeros((rows, length, self.spec.feature_dim), np.float32)
                mask = np.zeros((rows, length), bool)
                mask[:, 0] = True
                self._pose_fn(self._params, self._put(pose), self._put(mask)).block_until_ready()
        for rows in self.row_sizes:
            ids, mask = text_lib.encode_texts(self.run.tokenizer, [""] * rows, self.text_max_len)
            self._text_fn(self._params, self._put(ids), self._put(mask)).block_until_ready()


__all__ = ["Embedder", "row_buckets"]
