"""Packed ArrayRecord shards, written by `python -m signclip_jax.prepare`.

A folder holds `index.json` (format, version, shards, pose spec) and `data-*.array_record`
shards; each record is `encode_packed`'s bytes (no pickle, safe to read from anywhere).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from signclip_jax.data.sources.common import make_record
from signclip_jax.errors import DataError, UserError

PACKED_MAGIC = b"SCJ1"
PACKED_INDEX = "index.json"
PACKED_FORMAT = "signclip-jax-packed"
PACKED_VERSION = 1


def encode_packed(
    points: np.ndarray, observed: np.ndarray, fps: float, meta: dict[str, Any], dtype: str
) -> bytes:
    """One packed record: magic, uint32 header length, JSON header, points, observed bits.

    points [T, P, 3] stored as `dtype` (float16 or float32), observed [T, P] as packed bits.
    No pickle: the shards are safe to read from untrusted places.
    """
    if dtype not in ("float16", "float32"):
        raise UserError(f"packed dtype must be float16 or float32, got {dtype!r}")
    t, p, c = points.shape
    header = dict(meta, frames=t, points=p, channels=c, fps=float(fps), dtype=dtype)
    head = json.dumps(header, ensure_ascii=False).encode()
    body = np.ascontiguousarray(points, dtype=dtype).tobytes()
    bits = np.packbits(np.asarray(observed, bool).reshape(-1)).tobytes()
    return PACKED_MAGIC + struct.pack("<I", len(head)) + head + body + bits


def decode_packed(data: bytes, *, name: str = "packed record") -> dict[str, Any]:
    """Inverse of `encode_packed` -> record dict with points (float32), observed, fps."""
    try:
        if data[:4] != PACKED_MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8 : 8 + n].decode())
        t, p, c = header.pop("frames"), header.pop("points"), header.pop("channels")
        dtype = np.dtype(header.pop("dtype"))
        start = 8 + n
        end = start + t * p * c * dtype.itemsize
        points = np.frombuffer(data, dtype, t * p * c, start).reshape(t, p, c)
        bits = np.frombuffer(data, np.uint8, offset=end)
        observed = np.unpackbits(bits, count=t * p).astype(bool).reshape(t, p)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, TypeError) as e:
        raise DataError(f"{name} is not a valid packed pose record ({e})") from None
    fps = header.pop("fps")
    return make_record(
        str(header.pop("id")),
        text=header.pop("text", ""),
        sign_language=header.pop("sign_language", ""),
        spoken_language=header.pop("spoken_language", ""),
        label=header.pop("label", -1),
        signer=header.pop("signer", ""),
        points=points.astype(np.float32),
        observed=observed,
        fps=float(fps),
    )


def _resolve_shards(shards: str | os.PathLike | Sequence[str]) -> tuple[list[str], dict | None]:
    if isinstance(shards, (list, tuple)):
        paths = [str(s) for s in shards]
        index = None
    elif os.path.isdir(shards):
        index_path = os.path.join(shards, PACKED_INDEX)
        if not os.path.isfile(index_path):
            raise DataError(f"{shards} has no {PACKED_INDEX}: not a folder written by prepare")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {index_path}: {e}") from None
        if index.get("format") != PACKED_FORMAT:
            raise DataError(f"{index_path} is not a {PACKED_FORMAT} index")
        paths = [os.path.join(shards, s["file"]) for s in index["shards"]]
    else:
        paths = sorted(glob.glob(str(shards)))
        index = None
        folder = os.path.dirname(paths[0]) if paths else ""
        if paths and os.path.isfile(os.path.join(folder, PACKED_INDEX)):
            with open(os.path.join(folder, PACKED_INDEX)) as f:
                index = json.load(f)
    if not paths:
        raise DataError(f"no packed shards found at {shards}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"packed shard {missing[0]} does not exist ({len(missing)} missing)")
    return paths, index


class PackedSource:
    """Records from ArrayRecord shards written by `prepare` (a folder, a glob or a list).

    Each record holds the normalised pose (points [T, P, 3] at full length, observed
    [T, P]), so features and augmentation are the same as from the .pose files; float32
    shards reproduce them bit-exactly. `self.index` is the folder's index.json (or None).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str]):
        self.paths, self.index = _resolve_shards(shards)
        self.skipped: list[tuple[str, str]] = []
        self._reader = None
        self._len = len(self._open())

    def _open(self):
        if self._reader is None:
            try:
                self._reader = ArrayRecordDataSource(self.paths)
            except Exception as e:  # array_record raises RuntimeError/ValueError on bad files
                raise DataError(f"cannot open packed shards {self.paths[0]}...: {e}") from None
        return self._reader

    def __getstate__(self):
        # Reopened lazily in each worker process.
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = self._open()[index]
        return decode_packed(data, name=f"packed record {index} of {self.paths[0]}...")

    @property
    def components(self) -> list[str] | None:
        return None if self.index is None else self.index.get("pose_spec", {}).get("components")

    def __repr__(self) -> str:
        return f"PackedSource({len(self.paths)} shards, n={len(self)})"
