"""Parts of long recordings: sliding windows and annotated segments, and their features.

A long recording (continuous signing) is embedded as many clips, each a frame span
[start, end) of one `.pose` file:

  window_spans(frames, window, stride)   sliding windows (`embed --window=W --stride=S`)
  read_segments(path)                    annotated segments (`embed --segments=FILE`):
      .eaf        ELAN: every time-aligned annotation of the chosen tiers (default all),
                  REF_ANNOTATIONs with their parent's times; label = the annotation value
      .srt .vtt   subtitles: one segment per cue; label = the cue text without tags
      .csv        one segment per row: a header with `file` (or pose/path; relative to the
                  CSV's folder), `start` and `end` in seconds or `start_frame` and `end_frame`,
                  optional `label` (or text/gloss) and `tier`
  span_features(pose, start, end, spec)  a span's features, normalised as its own clip

A span is embedded exactly as if its frames were a `.pose` file of their own: the shoulder
normalisation (one centre and one scale per clip, pose.normalize_points) is computed over the
span's frames only. A window's embedding therefore does not depend on the rest of the
recording, and equals embedding that slice cut out and saved as a file.

Lengths (`--window`, `--stride`) are frames (`64`, `64f`) or seconds (`2s`, `2.5s`, `500ms`);
seconds become frames with each file's fps (from its header): round(seconds * fps).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pose_format import Pose
from pose_format.numpy import NumPyPoseBody

from signclip_jax.data import pose as pose_lib
from signclip_jax.errors import DataError, UserError

SEGMENT_SUFFIXES = (".eaf", ".srt", ".vtt", ".csv")


# ------------------------------------------------------------------------------ lengths
@dataclasses.dataclass(frozen=True)
class Length:
    """A duration in frames (unit "f") or seconds (unit "s")."""

    value: float
    unit: str

    def frames(self, fps: float) -> int:
        """Frames at `fps` (seconds: round(value * fps)); at least 1."""
        if self.unit == "f":
            return max(int(self.value), 1)
        return max(to_frame(self.value, fps), 1)

    def __str__(self) -> str:
        return f"{int(self.value)}" if self.unit == "f" else f"{self.value:g}s"


_LENGTH = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(f|frames?|s|sec|seconds?|ms)?\s*$")


def parse_length(text: str, what: str = "length") -> Length:
    """ "64" or "64f" (frames, an integer), "2s" / "2.5s" / "500ms" (seconds) -> Length > 0.
    UserError naming `what` otherwise."""
    m = _LENGTH.match(str(text))
    if not m:
        raise UserError(f"{what} {text!r}: expected frames (64, 64f) or seconds (2s, 2.5s, 500ms)")
    number, unit = m.group(1), (m.group(2) or "f")
    if unit.startswith("f"):
        if "." in number:
            raise UserError(f"{what} {text!r}: a frame count is a whole number")
        length = Length(float(int(number)), "f")
    else:
        length = Length(float(number) / (1000.0 if unit == "ms" else 1.0), "s")
    if length.value <= 0:
        raise UserError(f"{what} {text!r}: must be > 0")
    return length


def to_frame(seconds: float, fps: float) -> int:
    """The frame at `seconds` (frame f covers [f / fps, (f + 1) / fps)): round(seconds * fps)."""
    return math.floor(seconds * fps + 0.5)


def window_spans(frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows [start, end) over `frames` frames: starts 0, stride, 2 * stride, ...
    while a whole window fits, plus one window ending at the last frame when the strides do not
    reach it (every frame is covered). A recording shorter than `window` is one window."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    if frames <= window:
        return [(0, frames)] if frames > 0 else []
    spans = [(s, s + window) for s in range(0, frames - window + 1, stride)]
    if spans[-1][1] < frames:
        spans.append((frames - window, frames))
    return spans


# ------------------------------------------------------------------------------ segments
@dataclasses.dataclass(frozen=True)
class Segment:
    """One annotated part of a recording: [start, end) in seconds (unit "s") or frames ("f").

    file: the pose it belongs to (CSV rows name it; None for ELAN and subtitles, whose
    recording the caller pairs by name). label: the annotation or cue text; tier: the ELAN tier.
    line: where it was read (for messages).
    """

    start: float
    end: float
    unit: str = "s"
    label: str = ""
    tier: str = ""
    file: str | None = None
    line: str = ""

    def frames(self, fps: float, total: int) -> tuple[int, int]:
        """[start, end) frames, clipped to [0, total]; DataError when nothing is left."""
        if self.unit == "f":
            start, end = int(self.start), int(self.end)
        else:
            start, end = to_frame(self.start, fps), to_frame(self.end, fps)
        end = max(end, start + 1)  # a segment shorter than a frame still holds one
        start, end = max(start, 0), min(end, total)
        if start >= end:
            raise DataError(
                f"{self.line or 'segment'}: [{self._bounds()}] lies outside the pose's"
                f" {total} frames"
            )
        return start, end

    def _bounds(self) -> str:
        if self.unit == "f":
            return f"frames {int(self.start)}-{int(self.end)}"
        return f"{self.start:.3f}s-{self.end:.3f}s"


@dataclasses.dataclass
class SegmentFile:
    """What read_segments found: the segments in file order, the media the file names (ELAN's
    MEDIA_DESCRIPTORs), and (where, why) of annotations that could not be used."""

    path: str
    segments: list[Segment]
    media: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def has_files(self) -> bool:
        """True when every segment names its pose (CSV)."""
        return all(s.file is not None for s in self.segments)


def read_segments(path: str | os.PathLike, *, tiers: Sequence[str] | None = None) -> SegmentFile:
    """Segments of an ELAN (.eaf), SubRip (.srt), WebVTT (.vtt) or CSV file (see the module
    docstring). `tiers` keeps only those ELAN tiers (an unknown name is a UserError). UserError
    naming the file and line for anything unreadable; a file without segments is one too."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in SEGMENT_SUFFIXES:
        raise UserError(
            f"--segments {path}: unknown kind of file; expected {', '.join(SEGMENT_SUFFIXES)}"
        )
    if tiers and suffix != ".eaf":
        raise UserError(f"--segments {path}: tiers are chosen only in ELAN (.eaf) files")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--segments {path}: cannot read ({e.strerror or e})") from None
    if suffix == ".eaf":
        found = _read_eaf(path, raw, tiers)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"--segments {path}: not UTF-8 text ({e})") from None
        if suffix == ".csv":
            found = _read_csv(path, text)
        else:
            found = SegmentFile(path, _read_cues(path, text, vtt=suffix == ".vtt"))
    if not found.segments:
        why = f" ({found.skipped[0][0]}: {found.skipped[0][1]})" if found.skipped else ""
        raise UserError(f"--segments {path}: no segments found{why}")
    return found


def _check_span(start: float, end: float, where: str) -> None:
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
        raise UserError(f"{where}: start and end must be finite and >= 0")
    if end <= start:
        raise UserError(f"{where}: end {end:g} is not after start {start:g}")


# -- subtitles ---------------------------------------------------------------------------------
_CUE_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_CUE_LINE = re.compile(rf"^\s*{_CUE_TIME}\s*-->\s*{_CUE_TIME}(?:\s.*)?$")
_TAG = re.compile(r"<[^>]*>")


def _cue_seconds(groups: Sequence[str | None]) -> float:
    hours, minutes, seconds, fraction = groups
    return (
        int(hours or 0) * 3600
        + int(minutes) * 60
        + int(seconds)
        + int(fraction.ljust(3, "0")) / 1000.0
    )


def _read_cues(path: str, text: str, *, vtt: bool) -> list[Segment]:
    """SRT and WebVTT: blocks separated by blank lines; a block's timing line is
    `start --> end` (SRT: HH:MM:SS,mmm; VTT: [HH:]MM:SS.mmm plus cue settings), the lines
    after it are the cue text. VTT's header, NOTE, STYLE and REGION blocks are skipped."""
    lines = text.splitlines()
    if vtt and (not lines or not lines[0].startswith("WEBVTT")):
        raise UserError(f"--segments {path}: a WebVTT file starts with 'WEBVTT'")
    segments: list[Segment] = []
    block: list[tuple[int, str]] = []
    for number, line in [*enumerate(lines, 1), (len(lines) + 1, "")]:
        if line.strip():
            block.append((number, line))
            continue
        if not block:
            continue
        timing = next((i for i, (_, b) in enumerate(block) if "-->" in b), None)
        first = block[0][1].strip()
        if timing is None or (vtt and first.split(" ")[0] in ("WEBVTT", "NOTE", "STYLE", "REGION")):
            if timing is None and not vtt and not first.isdigit():
                raise UserError(f"{path} line {block[0][0]}: expected a cue (start --> end)")
            block = []
            continue
        lineno, timing_line = block[timing]
        m = _CUE_LINE.match(timing_line)
        where = f"{path} line {lineno}"
        if not m:
            raise UserError(f"{where}: cannot read the cue time {timing_line.strip()!r}")
        start, end = _cue_seconds(m.groups()[:4]), _cue_seconds(m.groups()[4:])
        _check_span(start, end, where)
        label = " ".join(_TAG.sub("", b).strip() for _, b in block[timing + 1 :]).strip()
        segments.append(Segment(start, end, "s", label, line=where))
        block = []
    return segments


# -- CSV ---------------------------------------------------------------------------------------
_FILE_KEYS = ("file", "pose", "path", "pose_path")
_LABEL_KEYS = ("label", "text", "gloss")


def _read_csv(path: str, text: str) -> SegmentFile:
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    key = next((k for k in _FILE_KEYS if k in header), None)
    if "start" in header and "end" in header:
        cols, unit = ("start", "end"), "s"
    elif "start_frame" in header and "end_frame" in header:
        cols, unit = ("start_frame", "end_frame"), "f"
    else:
        cols, unit = None, ""
    if key is None or cols is None:
        raise UserError(
            f"--segments {path}: the header needs a file column ({'/'.join(_FILE_KEYS)}) and"
            f" start,end (seconds) or start_frame,end_frame; it has {','.join(header) or 'nothing'}"
        )
    label_key = next((k for k in _LABEL_KEYS if k in header), None)
    base = os.path.dirname(os.path.abspath(path))
    segments = []
    for row in reader:
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{path} line {reader.line_num}"
        if len(row) != len(header):
            raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}")
        values = dict(zip(header, (c.strip() for c in row)))
        try:
            start, end = float(values[cols[0]]), float(values[cols[1]])
        except ValueError:
            raise UserError(
                f"{where}: {cols[0]} and {cols[1]} must be numbers, got"
                f" {values[cols[0]]!r}, {values[cols[1]]!r}"
            ) from None
        if unit == "f" and not (start.is_integer() and end.is_integer()):
            raise UserError(f"{where}: frames are whole numbers")
        _check_span(start, end, where)
        file = values[key]
        if not file:
            raise UserError(f"{where}: no {key}")
        file = file if os.path.isabs(file) else os.path.join(base, file)
        label = values.get(label_key, "") if label_key else ""
        segments.append(Segment(start, end, unit, label, values.get("tier", ""), file, where))
    return SegmentFile(path, segments)


# -- ELAN --------------------------------------------------------------------------------------
def _read_eaf(path: str, raw: bytes, tiers: Sequence[str] | None) -> SegmentFile:
    """ELAN Annotation Format: TIME_ORDER's TIME_SLOTs (milliseconds), TIERs of
    ALIGNABLE_ANNOTATIONs (two time slots) and REF_ANNOTATIONs (the times of the annotation
    they refer to). Annotations on slots without a time (unaligned) are skipped."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise UserError(f"--segments {path}: not a readable ELAN file ({e})") from None
    if root.tag != "ANNOTATION_DOCUMENT":
        raise UserError(f"--segments {path}: not an ELAN file (root element {root.tag!r})")
    units = (root.find("HEADER").get("TIME_UNITS", "milliseconds")
             if root.find("HEADER") is not None else "milliseconds")  # fmt: skip
    if units != "milliseconds":
        raise UserError(f"--segments {path}: TIME_UNITS {units!r}; only milliseconds are read")
    media = [
        m.get("RELATIVE_MEDIA_URL") or m.get("MEDIA_URL") or ""
        for m in root.iter("MEDIA_DESCRIPTOR")
    ]
    slots: dict[str, float | None] = {}
    for slot in root.iter("TIME_SLOT"):
        value = slot.get("TIME_VALUE")
        try:
            slots[slot.get("TIME_SLOT_ID", "")] = None if value is None else float(value) / 1000
        except ValueError:
            raise UserError(
                f"--segments {path}: time slot {slot.get('TIME_SLOT_ID')} has TIME_VALUE {value!r}"
            ) from None
    all_tiers = [t.get("TIER_ID", "") for t in root.iter("TIER")]
    unknown = [t for t in tiers or () if t not in all_tiers]
    if unknown:
        raise UserError(
            f"--segments {path}: no tier {', '.join(map(repr, unknown))}; the file has"
            f" {', '.join(map(repr, all_tiers)) or 'no tiers'}"
        )
    times: dict[str, tuple[float | None, float | None]] = {}
    for ann in root.iter("ALIGNABLE_ANNOTATION"):
        times[ann.get("ANNOTATION_ID", "")] = (
            slots.get(ann.get("TIME_SLOT_REF1", "")),
            slots.get(ann.get("TIME_SLOT_REF2", "")),
        )
    refs = {a.get("ANNOTATION_ID", ""): a.get("ANNOTATION_REF", "")
            for a in root.iter("REF_ANNOTATION")}  # fmt: skip

    def resolve(annotation_id: str) -> tuple[float | None, float | None]:
        seen = set()
        while annotation_id in refs and annotation_id not in seen:  # follow REF chains
            seen.add(annotation_id)
            annotation_id = refs[annotation_id]
        return times.get(annotation_id, (None, None))

    segments, skipped = [], []
    for tier in root.iter("TIER"):
        name = tier.get("TIER_ID", "")
        if tiers and name not in tiers:
            continue
        for wrapper in tier.iter("ANNOTATION"):
            for ann in wrapper:
                annotation_id = ann.get("ANNOTATION_ID", "")
                where = f"{path} tier {name!r} annotation {annotation_id}"
                start, end = resolve(annotation_id)
                if start is None or end is None:
                    skipped.append((where, "not aligned to the time line"))
                    continue
                if end <= start:
                    skipped.append((where, f"end {end:g}s is not after start {start:g}s"))
                    continue
                value = ann.findtext("ANNOTATION_VALUE") or ""
                segments.append(Segment(start, end, "s", value.strip(), name, line=where))
    return SegmentFile(path, segments, media=[m for m in media if m], skipped=skipped)


# ------------------------------------------------------------------------------ features
def slice_pose(pose: Pose, start: int, end: int) -> Pose:
    """Frames [start, end) of `pose` as a Pose of their own (same header and fps)."""
    body = pose.body
    return Pose(
        pose.header,
        NumPyPoseBody(body.fps, body.data[start:end], body.confidence[start:end]),
    )


def span_features(
    pose: Pose, start: int, end: int, spec: pose_lib.PoseSpec, *, name: str = "<pose>"
) -> np.ndarray:
    """Features [end - start, D] of frames [start, end), normalised as a clip of their own
    (what reading the slice saved as a .pose file gives). `spec.max_frames` is not applied:
    the caller decides what happens to clips longer than the model's max_frames."""
    full = dataclasses.replace(spec, max_frames=0)
    where = f"{name} frames {start}-{end}"
    return pose_lib.to_features(
        pose_lib.pose_to_array(slice_pose(pose, start, end), full, name=where), full
    )


__all__ = [
    "SEGMENT_SUFFIXES",
    "Length",
    "Segment",
    "SegmentFile",
    "parse_length",
    "read_segments",
    "slice_pose",
    "span_features",
    "to_frame",
    "window_spans",
]
