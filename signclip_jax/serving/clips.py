"""Clips -> embeddings on top of `Embedder`: whole files, long poses, windows and segments.

  embed_poses(embedder, items)    the Python API: `.pose` paths, .pose bytes, pose_format.Pose
                                  objects or feature arrays [T, D] -> [N, H] float32
  embed_clips(embedder, features) features [T_i, D] -> [N, H], with the long-pose policy
  embed_files(embedder, files)    many files, read ahead by threads, failures collected
  RowJob / run_rows               continuous signing: windows or segments of long recordings,
                                  embedded in large batches into resumable shards (load_rows)

Long poses (`long_poses`), an inference choice; training always keeps the first max_frames:
  "truncate"  (default, as the original) a clip longer than the model's max_frames keeps its
              first max_frames frames;
  "window"    it is cut into windows of max_frames frames, overlapping by half
              (segments.window_spans with stride max_frames // 2, the last one ending at the
              clip's last frame), and the embedding is the mean of the windows' embeddings.
              The clip is normalised once, as a whole; the windows are cut from its features.
`normalize=True` scales every final row to unit length (after the mean); the default rows are
the towers' raw output, as the original.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pose_format import Pose
from tqdm import tqdm

from signclip_jax import files as files_lib
from signclip_jax.cli import format_duration
from signclip_jax.data import pose as pose_lib
from signclip_jax.data import segments as seg_lib
from signclip_jax.errors import DataError, UserError
from signclip_jax.serving.video_input import video_to_pose_bytes

LONG_POSES = ("truncate", "window")
POSE_SUFFIX = ".pose"


# ------------------------------------------------------------------------------- inputs
def expand_poses(specs: Sequence[str], what: str = "--poses") -> list[str]:
    """--poses arguments -> files, in the order given.

    A directory gives its *.pose files (not recursive), sorted; a glob pattern its matches,
    sorted (`**` recurses); anything else is taken as a file name as is (a missing file fails
    later, on its own). A directory without .pose files or a pattern without matches is a
    UserError: it is almost always a typo.
    """
    found_all: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).iterdir() if p.suffix == POSE_SUFFIX and p.is_file()
            )
            if not found:
                raise UserError(f"{what} {spec}: directory holds no {POSE_SUFFIX} files")
            found_all.extend(found)
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"{what} {spec}: the pattern matches no files")
            found_all.extend(found)
        else:
            found_all.append(spec)
    return found_all


def check_long_poses(value: str) -> str:
    if value not in LONG_POSES:
        raise UserError(f"--long_poses {value!r}: choose one of {', '.join(LONG_POSES)}")
    return value


def _read_spec(spec: pose_lib.PoseSpec, long_poses: str) -> pose_lib.PoseSpec:
    """Truncation keeps max_frames frames from the start (less to hold); windows need all."""
    return spec if long_poses == "truncate" else dataclasses.replace(spec, max_frames=0)


def read_pose_file(path: str | os.PathLike, *, name: str | None = None) -> Pose:
    """A `.pose` file, or a video through the optional video environment -> Pose."""
    name = name or str(path)
    if files_lib.is_video(path):
        return pose_lib.read_pose(video_to_pose_bytes(path, name=name), name=name)
    return pose_lib.read_pose(path, name=name)


def clip_features(
    item: Any, spec: pose_lib.PoseSpec, *, long_poses: str = "truncate", name: str | None = None
) -> np.ndarray:
    """One clip -> features [T, D] float32 (T <= max_frames with "truncate").

    item: a `.pose` path (or video path), .pose bytes, a pose_format.Pose, or features [T, D]
    (used as given). DataError/UserError naming the clip when it cannot be used."""
    read = _read_spec(spec, long_poses)
    if isinstance(item, np.ndarray):
        if item.ndim != 2 or item.shape[0] == 0 or item.shape[1] != spec.feature_dim:
            raise DataError(
                f"{name or 'features'}: shape {item.shape}, expected [T >= 1, {spec.feature_dim}]"
            )
        features = item.astype(np.float32, copy=False)
        return features if read.max_frames == 0 else features[: read.max_frames]
    if isinstance(item, Pose):
        name = name or "<Pose>"
        return pose_lib.to_features(pose_lib.pose_to_array(item, read, name=name), read)
    if isinstance(item, bytes | bytearray | memoryview):
        return pose_lib.load_features(bytes(item), read, name=name or "<pose bytes>")
    if isinstance(item, str | os.PathLike):
        name = name or str(item)
        return pose_lib.to_features(
            pose_lib.pose_to_array(read_pose_file(item, name=name), read, name=name), read
        )
    raise UserError(
        f"{name or 'pose'}: a path, .pose bytes, pose_format.Pose or [T, D] array is needed,"
        f" got {type(item).__name__}"
    )


# ------------------------------------------------------------------------------- embedding
def long_pose_spans(frames: int, max_frames: int) -> list[tuple[int, int]]:
    """The windows "window" averages over: max_frames long, overlapping by half."""
    return seg_lib.window_spans(frames, max_frames, max(max_frames // 2, 1))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def embed_clips(
    embedder: Any,
    features: Sequence[np.ndarray],
    *,
    long_poses: str = "truncate",
    normalize: bool = False,
) -> np.ndarray:
    """Features [T_i, D] -> [N, H] float32, in input order, in as few model calls as the
    embedder's batch size allows (one `embed_features` call for all clips and windows)."""
    check_long_poses(long_poses)
    max_frames = embedder.spec.max_frames
    pieces: list[np.ndarray] = []
    owner: list[int] = []
    for i, f in enumerate(features):
        if long_poses == "window" and max_frames and len(f) > max_frames:
            spans = long_pose_spans(len(f), max_frames)
            pieces.extend(f[s:e] for s, e in spans)
            owner.extend([i] * len(spans))
        else:
            pieces.append(f)
            owner.append(i)
    if not pieces:
        return np.zeros((0, embedder.hidden_size), np.float32)
    emb = np.asarray(embedder.embed_features(pieces), np.float32)
    if len(pieces) == len(features):
        out = emb
    else:
        owners = np.asarray(owner)
        out = np.zeros((len(features), emb.shape[1]), np.float64)
        np.add.at(out, owners, emb)
        out = (out / np.bincount(owners, minlength=len(features))[:, None]).astype(np.float32)
    return normalize_rows(out) if normalize else out


def embed_poses(
    embedder: Any,
    items: Iterable[Any],
    *,
    long_poses: str = "truncate",
    normalize: bool = False,
) -> np.ndarray:
    """`.pose` paths, .pose bytes, pose_format.Pose objects or features [T, D] (mixed freely)
    -> [N, H] float32 in input order. The first unusable item raises (DataError/UserError)."""
    feats = [clip_features(item, embedder.spec, long_poses=long_poses, name=None) for item in items]
    return embed_clips(embedder, feats, long_poses=long_poses, normalize=normalize)


def _read_ahead(
    read: Callable[[str], np.ndarray], paths: Sequence[str], chunk: int, threads: int
) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Chunks of (file, features or None, error or None); the next chunk is read by a thread
    pool while the caller embeds the current one, so memory holds at most two chunks."""

    def safe(path: str) -> tuple[str, np.ndarray | None, str | None]:
        try:
            return path, read(path), None
        except UserError as e:
            return path, None, str(e)
        except Exception as e:  # one odd file must not lose the others
            return path, None, f"{path}: {type(e).__name__}: {e}"

    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        pending = None
        for start in range(0, len(paths), chunk):
            current = pending or [pool.submit(safe, f) for f in paths[start : start + chunk]]
            nxt = start + chunk
            pending = [pool.submit(safe, f) for f in paths[nxt : nxt + chunk]] or None
            yield [f.result() for f in current]


def embed_files(
    embedder: Any,
    paths: Sequence[str],
    *,
    chunk: int = 512,
    read_threads: int = 4,
    long_poses: str = "truncate",
    normalize: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embeds pose files in chunks; returns ([P, H] float32 of the good files in input order,
    the good files, [(file, error)] of the others). `on_error(file, message)` is called as
    failures happen, `progress(n)` after each chunk."""
    check_long_poses(long_poses)
    rows: list[np.ndarray] = []
    good: list[str] = []
    failed: list[tuple[str, str]] = []

    def read(path: str) -> np.ndarray:
        return clip_features(path, embedder.spec, long_poses=long_poses)

    for part in _read_ahead(read, paths, chunk, read_threads):
        ok = [(f, x) for f, x, err in part if err is None]
        for f, _, err in part:
            if err is not None:
                failed.append((f, err))
                if on_error:
                    on_error(f, err)
        if ok:
            feats = [x for _, x in ok]
            rows.append(embed_clips(embedder, feats, long_poses=long_poses, normalize=normalize))
            good.extend(f for f, _ in ok)
        if progress:
            progress(len(part))
    emb = np.concatenate(rows) if rows else np.zeros((0, embedder.hidden_size), np.float32)
    return emb.astype(np.float32, copy=False), good, failed


# ------------------------------------------------------------------------------- per-clip files
def clip_file_name(path: str, model_name: str) -> str:
    """pose-evaluation's layout: `<stem>-using-model-<MODEL>.npy`."""
    stem = Path(path).name
    for suffix in (POSE_SUFFIX, *files_lib.VIDEO_SUFFIXES):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-using-model-{model_name}.npy"


def check_model_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise UserError(f"--name {name!r}: a model name is a non-empty file-name part (no /)")
    return name


def clip_file_names(paths: Sequence[str], model_name: str) -> list[str]:
    """One output name per input; UserError when two inputs would write the same file."""
    names = [clip_file_name(p, model_name) for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in seen and seen[name] != path:
            raise UserError(
                f"--out_dir: {seen[name]} and {path} would both write {name}; give poses with"
                " distinct file names"
            )
        seen[name] = path
    return names


def write_clip_files(out_dir: str | os.PathLike, names: Sequence[str], rows: np.ndarray) -> None:
    """rows [N, H] -> out_dir/names[i] holding [H] float32 each (atomically)."""
    for name, row in zip(names, rows):
        files_lib.write_bytes_atomic(
            Path(out_dir) / name, files_lib.npy_bytes(np.asarray(row, np.float32))
        )


# ------------------------------------------------------------------------------- progress
class Progress:
    """Progress with ETA on stderr: a tqdm bar on a terminal; elsewhere (logs) one line each
    time another 10 % is done or `interval` seconds passed, so a log stays readable."""

    def __init__(
        self,
        total: float,
        *,
        desc: str,
        unit: str = "B",
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = 60.0,
    ):
        self.stream = stream or sys.stderr
        self.total, self.done, self.rows = float(total), 0.0, 0
        self.quiet, self.desc, self.unit, self.interval = quiet, desc, unit, interval
        self.start = self.last = time.monotonic()
        self.next_step = 0.1
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = None
        if not quiet and isatty:
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream)

    def update(self, amount: float, rows: int = 0) -> None:
        self.done += amount
        self.rows += rows
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(amount)
            self.bar.set_postfix_str(f"{self.rows} rows", refresh=False)
            return
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self.next_step or now - self.last >= self.interval:
            self.last = now
            while self.next_step <= fraction:
                self.next_step += 0.1
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        fraction = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.desc}: {100 * fraction:.0f}% ({self.rows} rows, {rate:.1f} rows/s,"
            f" elapsed {format_duration(elapsed)}, ETA {format_duration(eta)})"
        )

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def failed(self, path: str, message: str) -> None:
        """A file that could not be embedded: 'failed: PATH: why' (the path once)."""
        self.write(f"failed: {message if path in message else f'{path}: {message}'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class Row:
    """One planned clip of a recording: frames [start, end) of `file` (-1, -1 when the file
    itself failed), with its fps, label and tier (segments)."""

    file: str
    start: int
    end: int
    fps: float
    label: str = ""
    tier: str = ""


@dataclasses.dataclass
class Unit:
    """One recording and how it is cut: sliding windows, or the given segments."""

    file: str
    segments: list[seg_lib.Segment] | None = None


@dataclasses.dataclass
class RowJob:
    """A continuous-signing job: recordings (`units`, in order) cut into windows
    (`window`/`stride`) or into segments (each unit's own), embedded into shards of
    `shard_rows` planned rows in `out_dir`."""

    units: list[Unit]
    out_dir: str
    window: seg_lib.Length | None = None
    stride: seg_lib.Length | None = None
    long_poses: str = "truncate"
    normalize: bool = False
    shard_rows: int = 4096
    chunk: int = 512
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)
    _sizes: list[int] | None = dataclasses.field(default=None, init=False, repr=False)

    def spans(self, unit: Unit, frames: int, fps: float) -> list[tuple[Row, str | None]]:
        """The unit's rows, each with None or why it cannot be embedded (a segment outside
        the recording)."""
        if unit.segments is None:
            assert self.window is not None
            window = self.window.frames(fps)
            stride = (self.stride or self.window).frames(fps)
            spans = seg_lib.window_spans(frames, window, stride)
            return [(Row(unit.file, s, e, fps), None) for s, e in spans]
        rows: list[tuple[Row, str | None]] = []
        for seg in unit.segments:
            try:
                start, end = seg.frames(fps, frames)
                rows.append((Row(unit.file, start, end, fps, seg.label, seg.tier), None))
            except UserError as e:
                rows.append((Row(unit.file, -1, -1, fps, seg.label, seg.tier), str(e)))
        return rows

    def sizes(self) -> list[int]:
        """Bytes of each unit's file (-1 when it cannot be read), read once."""
        if self._sizes is None:
            self._sizes = [_file_size(u.file) for u in self.units]
        return self._sizes

    def spec_dict(self) -> dict[str, Any]:
        """What decides the rows and their values: a rerun must ask exactly this."""
        return {
            "format": 1,
            **self.describe,
            "window": str(self.window) if self.window else None,
            "stride": str(self.stride) if self.stride else None,
            "long_poses": self.long_poses,
            "normalize": self.normalize,
            "shard_rows": self.shard_rows,
            "inputs": [_input_id(u, size) for u, size in zip(self.units, self.sizes())],
        }


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _input_id(unit: Unit, size: int) -> list[Any]:
    out: list[Any] = [unit.file, size]
    if unit.segments is not None:
        digest = hashlib.sha256(
            json.dumps([dataclasses.astuple(s)[:5] for s in unit.segments]).encode()
        ).hexdigest()[:16]
        out.append(f"{len(unit.segments)} segments {digest}")
    return out


JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"


def shard_name(index: int) -> str:
    return f"rows-{index:05d}.npz"


def _row_items(
    job: RowJob, spec: pose_lib.PoseSpec, start_unit: int, start_row: int
) -> Iterator[tuple[int, int, int, Row, np.ndarray | None, str | None]]:
    """(unit index, row index, rows in the unit, row, features or None, error or None) from
    (start_unit, start_row) on. A file that cannot be read is one failed row."""
    read = _read_spec(spec, job.long_poses)
    for u in range(start_unit, len(job.units)):
        unit = job.units[u]
        first = start_row if u == start_unit else 0
        try:
            pose = read_pose_file(unit.file)
            frames, fps = int(pose.body.data.shape[0]), float(pose.body.fps)
            if frames == 0:
                raise DataError(f"{unit.file}: pose has no frames")
            rows = job.spans(unit, frames, fps)
        except UserError as e:
            if first == 0:
                yield u, 0, 1, Row(unit.file, -1, -1, 0.0), None, str(e)
            continue
        for r in range(first, len(rows)):
            row, why = rows[r]
            if why is not None:
                yield u, r, len(rows), row, None, why
                continue
            try:
                feats = seg_lib.span_features(pose, row.start, row.end, read, name=unit.file)
                if read.max_frames:
                    feats = feats[: read.max_frames]
                yield u, r, len(rows), row, feats, None
            except UserError as e:
                yield u, r, len(rows), row, None, str(e)
        del pose


def _prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items` produced by a background thread, at most `depth` ahead (pose decoding and
    per-window normalisation overlap the model)."""
    q: queue.Queue = queue.Queue(max(depth, 1))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=work, daemon=True, name="signclip-rows")
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def _str_array(values: Sequence[str]) -> np.ndarray:
    # Fixed-width unicode, not object: np.load needs no allow_pickle.
    return np.array(list(values), dtype=str) if len(values) else np.zeros((0,), dtype="<U1")


def _shard_arrays(
    rows: list[Row], emb: np.ndarray, failed: list[tuple[Row, str]], hidden: int
) -> dict[str, np.ndarray]:
    fps = np.array([r.fps for r in rows], np.float64)
    start = np.array([r.start for r in rows], np.int64)
    end = np.array([r.end for r in rows], np.int64)
    return {
        "embeddings": emb.reshape(len(rows), hidden).astype(np.float32, copy=False),
        "files": _str_array([r.file for r in rows]),
        "start_frames": start,
        "end_frames": end,
        "start_seconds": start / np.where(fps > 0, fps, 1.0),
        "end_seconds": end / np.where(fps > 0, fps, 1.0),
        "fps": fps,
        "labels": _str_array([r.label for r in rows]),
        "tiers": _str_array([r.tier for r in rows]),
        "failed_files": _str_array([r.file for r, _ in failed]),
        "failed_start_frames": np.array([r.start for r, _ in failed], np.int64),
        "failed_end_frames": np.array([r.end for r, _ in failed], np.int64),
        "failed_errors": _str_array([e for _, e in failed]),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _job_differs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def prepare_out_dir(job: RowJob) -> tuple[int, int, int, int, int]:
    """Checks `job.out_dir` against the job and returns where to resume: (finished shards,
    next unit, next row in it, rows written, rows failed). A folder holding another job's rows
    is a UserError naming what differs; a new folder gets job.json."""
    out = Path(job.out_dir)
    files_lib.check_writable_dir(out, f"--out {out}")
    spec = job.spec_dict()
    old = _read_json(out / JOB_FILE)
    if old is None:
        if any(out.glob("rows-*.npz")):
            raise UserError(f"--out {out}: holds rows-*.npz shards but no {JOB_FILE}; give a new"
                            " folder")  # fmt: skip
        files_lib.write_json_atomic(out / JOB_FILE, spec)
        return 0, 0, 0, 0, 0
    differs = _job_differs(old, spec)
    if differs:
        raise UserError(
            f"--out {out} holds the rows of another job (its {JOB_FILE} differs in"
            f" {', '.join(differs)}); give a new --out folder, or delete that one to start over"
        )
    state = _read_json(out / PROGRESS_FILE) or {}
    shards = int(state.get("shards", 0))
    for k in range(shards):  # finished shards must still be there
        if not (out / shard_name(k)).is_file():
            raise UserError(f"--out {out}: {shard_name(k)} is missing; delete the folder to"
                            " start over")  # fmt: skip
    unit, row = state.get("next", [0, 0])
    return shards, int(unit), int(row), int(state.get("rows", 0)), int(state.get("failed", 0))


def run_rows(
    embedder: Any,
    job: RowJob,
    *,
    progress: Progress | None = None,
    on_error: Callable[[Row, str], None] | None = None,
) -> dict[str, Any]:
    """Embeds every row of `job` into `job.out_dir`, resuming after the last finished shard.

    Shards (rows-00000.npz, ...) each cover `job.shard_rows` planned rows in plan order and
    are written atomically; progress.json, written after each shard, records how many are
    finished and where the next one starts, so an interrupted run continues there without
    recomputing finished rows (a shard written but not yet recorded is computed again, with
    the same values). Returns the final progress state."""
    out = Path(job.out_dir)
    shards, start_unit, start_row, written, failed_count = prepare_out_dir(job)
    state = _read_json(out / PROGRESS_FILE) or {}
    if state.get("complete"):
        return state
    hidden = embedder.hidden_size
    rows: list[Row] = []
    failed: list[tuple[Row, str]] = []
    pending: list[tuple[Row, np.ndarray]] = []
    pending_bytes = 0.0  # the share of the input the pending rows stand for (progress)
    embedded: list[np.ndarray] = []
    planned = 0  # rows of the current shard, failed ones included
    sizes = [max(size, 0) for size in job.sizes()]
    if progress is not None:
        progress.update(sum(sizes[:start_unit]))

    def flush_pending() -> None:
        nonlocal pending_bytes
        if pending:
            feats = [f for _, f in pending]
            embedded.append(
                embed_clips(embedder, feats, long_poses=job.long_poses, normalize=job.normalize)
            )
            rows.extend(r for r, _ in pending)
            n = len(pending)
            pending.clear()
            if progress is not None:
                progress.update(pending_bytes, rows=n)
            pending_bytes = 0.0

    def write_shard(next_position: tuple[int, int]) -> None:
        nonlocal shards, planned, written, failed_count
        flush_pending()
        emb = np.concatenate(embedded) if embedded else np.zeros((0, hidden), np.float32)
        arrays = _shard_arrays(rows, emb, failed, hidden)
        files_lib.write_npz_atomic(out / shard_name(shards), arrays)
        shards += 1
        written += len(rows)
        failed_count += len(failed)
        files_lib.write_json_atomic(
            out / PROGRESS_FILE,
            {"shards": shards, "next": list(next_position), "rows": written,
             "failed": failed_count, "complete": False},
        )  # fmt: skip
        rows.clear()
        failed.clear()
        embedded.clear()
        planned = 0

    depth = max(job.chunk, 1)
    items = _prefetch(_row_items(job, embedder.spec, start_unit, start_row), depth)
    try:
        for u, r, n_rows, row, feats, error in items:
            share = sizes[u] / n_rows  # of the input's bytes, for the progress and its ETA
            if error is not None:
                failed.append((row, error))
                if on_error:
                    on_error(row, error)
                if progress is not None:
                    progress.update(share)
            else:
                pending.append((row, feats))
                pending_bytes += share
                if len(pending) >= job.chunk:
                    flush_pending()
            planned += 1
            position = (u, r + 1) if r + 1 < n_rows else (u + 1, 0)
            if planned >= job.shard_rows:
                write_shard(position)
    finally:
        items.close()  # stops the reading thread at once, also on an interruption
    if planned or shards == 0:
        write_shard((len(job.units), 0))
    final = {"shards": shards, "next": [len(job.units), 0], "rows": written,
             "failed": failed_count, "complete": True}  # fmt: skip
    files_lib.write_json_atomic(out / PROGRESS_FILE, final)
    return final


ROW_KEYS = (
    "embeddings", "files", "start_frames", "end_frames", "start_seconds", "end_seconds", "fps",
    "labels", "tiers", "failed_files", "failed_start_frames", "failed_end_frames",
    "failed_errors",
)  # fmt: skip


def load_rows(out_dir: str | os.PathLike, *, allow_partial: bool = False) -> dict[str, np.ndarray]:
    """The rows of an `embed --window/--segments` output folder, every shard concatenated in
    order: embeddings [N, H] float32, files, start_frames / end_frames (int64, [start, end)),
    start_seconds / end_seconds, fps, labels, tiers [N], and the failed_* rows. UserError for
    an unfinished run unless `allow_partial`."""
    out = Path(out_dir)
    state = _read_json(out / PROGRESS_FILE)
    if state is None:
        raise UserError(f"{out}: no {PROGRESS_FILE}; not an embed --window/--segments output")
    if not state.get("complete") and not allow_partial:
        raise UserError(f"{out}: the run is not finished ({state.get('shards', 0)} shards so"
                        " far); run the same command again to finish it")  # fmt: skip
    parts = []
    for k in range(int(state.get("shards", 0))):
        with np.load(out / shard_name(k)) as z:
            parts.append({key: z[key] for key in ROW_KEYS})
    if not parts:
        raise UserError(f"{out}: no shards")
    return {key: np.concatenate([p[key] for p in parts]) for key in ROW_KEYS}


__all__ = [
    "LONG_POSES",
    "Progress",
    "Row",
    "RowJob",
    "Unit",
    "check_long_poses",
    "check_model_name",
    "clip_features",
    "clip_file_name",
    "clip_file_names",
    "embed_clips",
    "embed_files",
    "embed_poses",
    "expand_poses",
    "load_rows",
    "long_pose_spans",
    "normalize_rows",
    "read_pose_file",
    "run_rows",
    "write_clip_files",
]
