"""Files and paths: one copy of each helper that every layer uses.

Writes are atomic: local files go to a temporary name in the target's folder and are renamed
onto it, so a reader never sees half a file and a crash leaves any old file whole; `gs://`
objects are written whole by the object store. Paths may be local or `gs://` (etils.epath).
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from signclip_jax import extras
from signclip_jax.errors import UserError

# Containers that the video -> pose tool reads (ffmpeg via OpenCV); matched case-insensitively.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ogv")  # fmt: skip


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `gs://bucket/x` (object stores), False for local paths."""
    return "://" in os.fspath(path)


def _remote(path: str | os.PathLike) -> epath.Path:
    """epath of a URL; gs:// needs gcsfs (the `gcs` extra) unless TensorFlow, whose own file
    system etils then uses, is already loaded (the `sld` sources)."""
    url = os.fspath(path)
    if url.startswith("gs://") and "tensorflow" not in sys.modules:
        extras.require("gcsfs", "gcs", f"the gs:// path {url}")
    return epath.Path(url)


def as_path(path: str | os.PathLike) -> epath.Path:
    """epath of a local path (made absolute: Orbax refuses relative ones) or a gs:// URL."""
    if is_remote(path):
        return _remote(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def is_video(path_or_name: str | os.PathLike) -> bool:
    """True when the name ends in a video extension (case-insensitive): .mp4, .mov, .webm, ..."""
    return Path(os.fspath(path_or_name)).suffix.lower() in VIDEO_SUFFIXES


def check_writable_dir(folder: str | os.PathLike, what: str) -> None:
    """Creates local `folder` if needed and makes sure a file can be created in it (a probe
    file, removed at once), so that a command fails before its work, not after it. UserError
    "{what}: cannot write in {folder} (reason)" otherwise. gs:// URLs are not checked (the
    object store answers at the first write)."""
    if is_remote(folder):
        return
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (local: temporary file + rename; gs://: one whole object)."""
    if is_remote(path):
        _remote(path).write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text to `path`, atomically (see write_bytes_atomic)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """`obj` as indented JSON to `path`, atomically (see write_bytes_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of `array` (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez` of `arrays` to `path`, atomically (see write_bytes_atomic)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


class FirstN(Sequence):
    """The first `n` records of a random-access source (`--limit`, benchmark subsets).

    Keeps what callers read off a source besides its records: `skipped` (examples the source
    dropped) and `components` (the pose layout of sources that know it).
    """

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(int(n), len(source))
        self.skipped = list(getattr(source, "skipped", []))

    @property
    def components(self) -> Any:
        return getattr(self.source, "components", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]

    def __repr__(self) -> str:
        return f"first {self.n} of {self.source!r}"
