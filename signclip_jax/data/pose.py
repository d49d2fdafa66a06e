""".pose file -> per-frame features, exactly as the original SignCLIP `PoseProcessor`.

Pipeline for the default `reduced_face` spec (reference section 3.1-3.7):

  read -> select POSE (33) + 128 face-contour points + LEFT_HAND (21) + RIGHT_HAND (21)
       -> shoulder normalisation (pose-format `Pose.normalize`, section 3.3)
       -> hide legs (body points 25..32 set to 0)
       -> nan_to_num -> [T, 203 * 3] = [T, 609]; keep the first `max_frames` frames.

Points are matched by component name and point name, never by position, so any MediaPipe
Holistic layout that holds the needed points works (468 or 478 face points, with or without
POSE_WORLD_LANDMARKS, components in any order). Anything else raises `DataError` naming the
file and what is missing.

Deliberate differences from the original, none of which changes the features of a file written
by MediaPipe Holistic (checked bit-exact on the reference recording, see tests):
- Landmarks the file marks missing (confidence 0) are 0. The original keeps whatever value the
  file stores there, unnormalised (0 in MediaPipe files, not in every file: pose-format's own
  reduced test file stores pixel values under confidence 0).
- Non-finite coordinates (NaN/inf) count as missing. In the original one NaN shoulder turns the
  whole clip into NaN and then into zeros; a NaN elsewhere becomes 0 either way.
- Only the first person is used (MediaPipe Holistic tracks one).
- Hand-only component sets are normalised by the shoulders of the full pose first, as the
  original `demo_finger.py` does (HEAD's training code cannot normalise them at all, section 3.8).
  A file without shoulders cannot be normalised and raises `DataError`. The FingerCLIP 3-D hand
  normalisation (`normalize_hand`) is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from pathlib import Path

import numpy as np
from pose_format import Pose
from pose_format.pose_header import PoseHeader
from pose_format.utils.reader import BufferReader

from signclip_jax.errors import DataError, UserError

# MediaPipe Holistic component names as pose-format writes them.
BODY = "POSE_LANDMARKS"
FACE = "FACE_LANDMARKS"
LEFT_HAND = "LEFT_HAND_LANDMARKS"
RIGHT_HAND = "RIGHT_HAND_LANDMARKS"
BODY_WORLD = "POSE_WORLD_LANDMARKS"

BODY_POINTS: tuple[str, ...] = (
    "NOSE", "LEFT_EYE_INNER", "LEFT_EYE", "LEFT_EYE_OUTER", "RIGHT_EYE_INNER", "RIGHT_EYE",
    "RIGHT_EYE_OUTER", "LEFT_EAR", "RIGHT_EAR", "MOUTH_LEFT", "MOUTH_RIGHT", "LEFT_SHOULDER",
    "RIGHT_SHOULDER", "LEFT_ELBOW", "RIGHT_ELBOW", "LEFT_WRIST", "RIGHT_WRIST", "LEFT_PINKY",
    "RIGHT_PINKY", "LEFT_INDEX", "RIGHT_INDEX", "LEFT_THUMB", "RIGHT_THUMB", "LEFT_HIP",
    "RIGHT_HIP", "LEFT_KNEE", "RIGHT_KNEE", "LEFT_ANKLE", "RIGHT_ANKLE", "LEFT_HEEL",
    "RIGHT_HEEL", "LEFT_FOOT_INDEX", "RIGHT_FOOT_INDEX",
)  # fmt: skip
HAND_POINTS: tuple[str, ...] = (
    "WRIST", "THUMB_CMC", "THUMB_MCP", "THUMB_IP", "THUMB_TIP", "INDEX_FINGER_MCP",
    "INDEX_FINGER_PIP", "INDEX_FINGER_DIP", "INDEX_FINGER_TIP", "MIDDLE_FINGER_MCP",
    "MIDDLE_FINGER_PIP", "MIDDLE_FINGER_DIP", "MIDDLE_FINGER_TIP", "RING_FINGER_MCP",
    "RING_FINGER_PIP", "RING_FINGER_DIP", "RING_FINGER_TIP", "PINKY_MCP", "PINKY_PIP",
    "PINKY_DIP", "PINKY_TIP",
)  # fmt: skip
# Body points hidden by the original `pose_hide_legs` (section 3.4): knees, ankles, heels, feet.
LEG_POINTS: tuple[str, ...] = BODY_POINTS[25:33]

# The 128 MediaPipe FACEMESH_CONTOURS points, ascending (section 3.2).
FACE_CONTOUR: tuple[int, ...] = (
    0, 7, 10, 13, 14, 17, 21, 33, 37, 39, 40, 46, 52, 53, 54, 55, 58, 61, 63, 65, 66, 67, 70, 78,
    80, 81, 82, 84, 87, 88, 91, 93, 95, 103, 105, 107, 109, 127, 132, 133, 136, 144, 145, 146, 148,
    149, 150, 152, 153, 154, 155, 157, 158, 159, 160, 161, 162, 163, 172, 173, 176, 178, 181, 185,
    191, 234, 246, 249, 251, 263, 267, 269, 270, 276, 282, 283, 284, 285, 288, 291, 293, 295, 296,
    297, 300, 308, 310, 311, 312, 314, 317, 318, 321, 323, 324, 332, 334, 336, 338, 356, 361, 362,
    365, 373, 374, 375, 377, 378, 379, 380, 381, 382, 384, 385, 386, 387, 388, 389, 390, 397, 398,
    400, 402, 405, 409, 415, 454, 466,
)  # fmt: skip
FACE_MESH_POINTS = 468  # without the 10 iris points of the refined (478-point) mesh

# Mirror image of every face-mesh point. MediaPipe's canonical face model lists its vertices so
# that the 28 midline vertices below have x = 0 and vertices 248..467 are the mirror images of
# the remaining vertices 0..247, in the same order. Derived independently from the face-mesh
# tessellation graph seeded with the section-4 contour pairs (same result); it reproduces the
# section-4 contour permutation exactly and maps 2544 of the 2556 tessellation edges onto edges
# (the tessellation itself is not exactly symmetric around the eyes).
_FACE_MIDLINE = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 94, 151, 152,
                 164, 168, 175, 195, 197, 199, 200)  # fmt: skip


def _face_mirror() -> np.ndarray:
    mirror = np.arange(FACE_MESH_POINTS)
    side = [i for i in range(248) if i not in _FACE_MIDLINE]
    mirror[side] = np.arange(248, FACE_MESH_POINTS)
    mirror[248:] = side
    return mirror


FACE_MIRROR: np.ndarray = _face_mirror()  # [468] int: face point id -> its mirror image's id

# name -> (component, point names) in feature order.
_SETS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "reduced_face": (
        (BODY, BODY_POINTS),
        (FACE, tuple(str(i) for i in FACE_CONTOUR)),
        (LEFT_HAND, HAND_POINTS),
        (RIGHT_HAND, HAND_POINTS),
    ),
    "holistic": (
        (BODY, BODY_POINTS),
        (FACE, tuple(str(i) for i in range(FACE_MESH_POINTS))),
        (LEFT_HAND, HAND_POINTS),
        (RIGHT_HAND, HAND_POINTS),
    ),
    "hands": ((LEFT_HAND, HAND_POINTS), (RIGHT_HAND, HAND_POINTS)),
    "dominant_hand": ((RIGHT_HAND, HAND_POINTS),),
}
COMPONENT_SETS: tuple[str, ...] = tuple(_SETS)


@dataclasses.dataclass(frozen=True)
class PoseSpec:
    """Which points make a frame's features, and how many frames to keep.

    components: a name from COMPONENT_SETS. include_z: keep the z coordinate (the original
    always does). max_frames: keep the first max_frames frames (0 = all).
    """

    components: str = "reduced_face"
    include_z: bool = True
    max_frames: int = 256

    def __post_init__(self):
        if self.components not in _SETS:
            raise UserError(
                f"unknown pose components {self.components!r}; choose one of {COMPONENT_SETS}"
            )
        if self.max_frames < 0:
            raise UserError(f"max_frames must be >= 0, got {self.max_frames}")

    @property
    def num_points(self) -> int:
        return len(layout(self.components).points)

    @property
    def feature_dim(self) -> int:
        return self.num_points * (3 if self.include_z else 2)


@dataclasses.dataclass
class PoseArray:
    """One clip after selection and normalisation.

    points: [T, P, 3] float32, shoulder-normalised, legs hidden, missing landmarks 0.
    observed: [T, P] bool, False where the file marks the landmark missing (hidden legs count as
      observed zeros, as in the original, where assigning 0 unmasks them).
    fps: frames per second of the file.
    """

    points: np.ndarray
    observed: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        return self.points.shape[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Slot bookkeeping for one component set (P slots)."""

    points: tuple[tuple[str, str], ...]  # (component, point) per slot
    legs: np.ndarray  # [P] bool: slots hidden as in `pose_hide_legs`
    shoulders: tuple[int, int] | None  # slots of (RIGHT_SHOULDER, LEFT_SHOULDER), if selected
    flip_source: np.ndarray  # [P] int: slot whose mirrored value lands in each slot on a flip


def _mirror_point(component: str, point: str) -> tuple[str, str]:
    """The landmark a point becomes in a left-right mirrored image."""
    if component in (LEFT_HAND, RIGHT_HAND):
        return (RIGHT_HAND if component == LEFT_HAND else LEFT_HAND), point
    if component == FACE:
        return component, str(FACE_MIRROR[int(point)])
    swap = {"LEFT": "RIGHT", "RIGHT": "LEFT"}
    return component, "_".join(swap.get(word, word) for word in point.split("_"))


@functools.cache
def layout(components: str) -> Layout:
    """Slots, legs, shoulders and flip permutation of a component set.

    The flip permutation maps every slot to the slot of its mirror-image landmark (left/right
    body points swap, face points swap with their mirror, the hands swap). Where the mirror image
    is not part of the set (`dominant_hand`: the right hand's mirror is a left hand), the slot
    keeps its own point, so a flip shows the hand a left-handed signer would make.
    """
    if components not in _SETS:
        raise UserError(f"unknown pose components {components!r}; choose one of {COMPONENT_SETS}")
    points = tuple((c, p) for c, names in _SETS[components] for p in names)
    slot = {cp: i for i, cp in enumerate(points)}
    legs = np.array([c == BODY and p in LEG_POINTS for c, p in points])
    shoulders = None
    if (BODY, "RIGHT_SHOULDER") in slot:
        shoulders = (slot[BODY, "RIGHT_SHOULDER"], slot[BODY, "LEFT_SHOULDER"])
    flip_source = np.array([slot.get(_mirror_point(c, p), i) for i, (c, p) in enumerate(points)])
    return Layout(points, legs, shoulders, flip_source)


# ------------------------------------------------------------- reading .pose bytes, bounded
# pose-format decodes a body with the sizes its header declares. An old-format (v0.0) file
# spends 2 bytes on a frame without a person and pose-format fills that frame with float64
# zeros, so a 150 KB file can declare 65,535 frames and cost gigabytes; the point count of a
# header multiplies every frame. `pose_extent` reads what a file declares with struct alone
# (no arrays, no objects per point) and `read_pose` refuses, before pose-format allocates
# anything, a file whose body cannot fit its byte length or whose decoding would pass these
# limits. Real MediaPipe Holistic recordings have 543 to 586 points and a 15 KB header.
MAX_POSE_FRAMES = 100_000  # frames per file (about 55 minutes at 30 fps)
MAX_POSE_POINTS = 4_096  # points per person, all components together
MAX_POSE_HEADER_BYTES = 2**20  # header (component, point and limb names, colours)
MAX_POSE_ALLOC_BYTES = 2**30  # estimated peak memory pose-format needs to decode one file
# Estimated bytes pose-format allocates per decoded value (measured with tracemalloc on
# pose-format 0.15): v0.1/v0.2 keep float32 data and confidence plus boolean masks (about 5 per
# value); v0.0 builds every frame separately, in float64 as soon as one frame has no person
# (about 20 per value, plus about 1.5 KB of Python objects per frame).
_ALLOC_PER_VALUE = 6
_ALLOC_PER_VALUE_V0 = 20
_ALLOC_PER_FRAME_V0 = 2048


class PoseLimitError(DataError):
    """A .pose file whose declared size passes a limit; refused before it is decoded."""


@dataclasses.dataclass(frozen=True)
class PoseExtent:
    """What a .pose file declares, read without decoding its body.

    version: format version (0.0, 0.1 or 0.2). header_bytes: where the body starts.
    frames, people, points, dims: the body's [frames, people, points, dims] (people: per frame
      in v0.1/v0.2, the most in any frame in v0.0, where only the first person is kept).
    empty_frames: v0.0 frames without a person (2 bytes each, decoded as a frame of zeros).
    body_bytes: bytes the body takes. alloc_bytes: estimated peak bytes pose-format allocates
      to decode it (see _ALLOC_PER_VALUE).
    """

    version: float
    header_bytes: int
    frames: int
    people: int
    points: int
    dims: int
    empty_frames: int
    body_bytes: int
    alloc_bytes: int

    def describe(self) -> str:
        people = (
            f"{self.frames} frames ({self.empty_frames} without a person)"
            if self.version == 0
            else f"{self.frames} frames x {self.people} people"
        )
        return f"{people} x {self.points} points x {self.dims + 1} values (format v{self.version})"


class _Bytes:
    """A cursor over .pose bytes whose reads past the end raise DataError naming the file."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.offset = data, name, 0
        self.header_limit: int | None = None  # set while the header is read

    def need(self, size: int, what: str) -> None:
        if self.header_limit is not None and self.offset + size > self.header_limit:
            raise PoseLimitError(
                f"{self.name}: the header takes more than {self.header_limit} bytes"
                " (MAX_POSE_HEADER_BYTES); a MediaPipe Holistic header takes about 15 KB"
            )
        if self.offset + size > len(self.data):
            raise DataError(
                f"{self.name}: not a readable .pose file (truncated or corrupt: {what} needs"
                f" {size} bytes at byte {self.offset}; the file has {len(self.data)})"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def skip(self, size: int, what: str) -> None:
        self.need(size, what)
        self.offset += size

    def string(self, what: str) -> bytes:
        (length,) = self.unpack("<H", what)
        self.need(length, what)
        self.offset += length
        return self.data[self.offset - length : self.offset]


def _scan_header(
    cur: _Bytes, max_points: int, max_header_bytes: int
) -> tuple[float, list[tuple[int, int]]]:
    """Walks a header as `PoseHeader.read` lays it out -> (version, [(points, values per point)]
    per component), refusing point counts and header sizes over the limits on the way."""
    name = cur.name
    cur.header_limit = max_header_bytes
    (version,) = cur.unpack("<f", "the format version")
    if not (version == 0 or round(version, 3) in (0.1, 0.2)):  # pose-format's own tests
        raise DataError(
            f"{name}: not a readable .pose file (unknown format version {version:.4g};"
            " pose-format reads 0.0, 0.1 and 0.2)"
        )
    cur.skip(6, "the dimensions")  # width, height, depth: 3 x uint16
    (count,) = cur.unpack("<H", "the component count")
    components, total = [], 0
    for c in range(count):
        cur.string(f"the name of component {c}")
        fmt = cur.string(f"the point format of component {c}")
        try:
            values = len(fmt.decode("utf-8"))  # pose-format counts characters
        except UnicodeDecodeError:
            raise DataError(
                f"{name}: not a readable .pose file (truncated or corrupt: the point format of"
                f" component {c} is not UTF-8)"
            ) from None
        points, limbs, colors = cur.unpack("<HHH", f"the sizes of component {c}")
        total += points
        if total > max_points:
            raise PoseLimitError(
                f"{name}: the header declares at least {total} points per person; at most"
                f" {max_points} are read (MAX_POSE_POINTS)"
            )
        for p in range(points):
            cur.string(f"point name {p} of component {c}")
        cur.skip(4 * limbs + 6 * colors, f"the limbs and colours of component {c}")
        components.append((points, values))
    cur.header_limit = None
    if not components:
        raise DataError(f"{name}: not a readable .pose file (the header declares no components)")
    if max(v for _, v in components) < 2:
        raise DataError(
            f"{name}: not a readable .pose file (the point formats declare no coordinates)"
        )
    return version, components


def pose_extent(
    data: bytes,
    *,
    name: str = "<pose bytes>",
    max_frames: int = MAX_POSE_FRAMES,
    max_points: int = MAX_POSE_POINTS,
    max_header_bytes: int = MAX_POSE_HEADER_BYTES,
) -> PoseExtent:
    """What `data` (a whole .pose file) declares, checked against its byte length.

    Reads the header and the body's preamble as pose-format lays them out (v0.0 frame by
    frame: each frame's person count), with struct only. DataError when the body cannot fit
    the bytes; PoseLimitError as soon as the frames, points or header size pass a limit, so
    a hostile header costs no more than reading it.
    """
    cur = _Bytes(data, name)
    version, components = _scan_header(cur, max_points, max_header_bytes)
    header_bytes = cur.offset
    points = sum(p for p, _ in components)
    dims = max(v for _, v in components) - 1

    def check_frames(frames: int) -> None:
        if frames > max_frames:
            raise PoseLimitError(f"{name}: {frames} frames; at most {max_frames} per pose")

    if version == 0:
        _, frames = cur.unpack("<HH", "the frame count")
        check_frames(frames)
        person = 2 + 4 * sum(p * v for p, v in components)  # a person id, then its points
        people = empty = 0
        for f in range(frames):
            (n,) = cur.unpack("<H", f"the person count of frame {f}")
            cur.skip(n * person, f"the {n} people of frame {f}")
            people, empty = max(people, n), empty + (n == 0)
        alloc = frames * (_ALLOC_PER_FRAME_V0 + points * (dims + 1) * _ALLOC_PER_VALUE_V0)
    else:
        empty = 0
        if round(version, 3) == 0.1:  # the frame count follows from the byte length
            _, _, people = cur.unpack("<HHH", "the frame and person counts")
            per_frame = people * points * (dims + 1) * 4
            if per_frame == 0:
                raise DataError(
                    f"{name}: not a readable .pose file (it declares 0 people or 0 points)"
                )
            frames = int((len(data) - cur.offset) / per_frame)  # as pose-format computes it
        else:
            _, frames, people = cur.unpack("<fIH", "the frame and person counts")
        check_frames(frames)
        cur.skip(
            frames * people * points * (dims + 1) * 4,
            f"{frames} frames x {people} people x {points} points x {dims + 1} float32 values",
        )
        alloc = frames * people * points * (dims + 1) * _ALLOC_PER_VALUE
    return PoseExtent(
        version=round(version, 3),
        header_bytes=header_bytes,
        frames=frames,
        people=people,
        points=points,
        dims=dims,
        empty_frames=empty,
        body_bytes=cur.offset - header_bytes,
        alloc_bytes=alloc,
    )


def read_pose_header(path: str | os.PathLike) -> PoseHeader:
    """The PoseHeader of a .pose or .poseheader file, reading no more than the header limit;
    DataError naming the file when it cannot be read."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POSE_HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{name}: cannot read pose header ({e.strerror or e})") from None
    cur = _Bytes(data, name)
    _scan_header(cur, MAX_POSE_POINTS, MAX_POSE_HEADER_BYTES)
    try:
        return PoseHeader.read(BufferReader(data[: cur.offset]))
    except Exception as e:
        raise DataError(f"{name}: not a readable .pose header ({type(e).__name__}: {e})") from None


def _pose_bytes(
    source: str | os.PathLike | bytes, name: str | None, max_bytes: int
) -> tuple[bytes, str]:
    """(bytes, name) of a path or bytes; a file over `max_bytes` is refused before reading."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), name or "<pose bytes>"
    name = name or str(source)
    try:
        size = os.stat(source).st_size
        if size > max_bytes:
            raise PoseLimitError(
                f"{name}: {size} bytes; a .pose file over {max_bytes} bytes would pass"
                " MAX_POSE_ALLOC_BYTES"
            )
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: pose file not found") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read pose file ({e.strerror or e})") from None
    return data, name


def read_pose(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_frames: int = MAX_POSE_FRAMES,
    max_points: int = MAX_POSE_POINTS,
    max_alloc_bytes: int = MAX_POSE_ALLOC_BYTES,
) -> Pose:
    """Reads a `.pose` file (path or bytes); any failure becomes a DataError naming it.

    Every reader of .pose bytes comes here. What the file declares is checked first
    (`pose_extent`): a body that cannot fit the bytes is a DataError, one over `max_frames`,
    `max_points` or an estimated `max_alloc_bytes` of decoding a PoseLimitError, both raised
    before pose-format allocates anything.
    """
    data, name = _pose_bytes(source, name, max_alloc_bytes)
    if not data:
        raise DataError(f"{name}: pose file is empty (0 bytes)")
    extent = pose_extent(data, name=name, max_frames=max_frames, max_points=max_points)
    if extent.alloc_bytes > max_alloc_bytes:
        raise PoseLimitError(
            f"{name}: decoding {extent.describe()} would take about"
            f" {extent.alloc_bytes / 2**20:.0f} MiB; at most {max_alloc_bytes / 2**20:.0f} MiB"
            " per pose"
            + (
                " (format v0.0 decodes a frame without a person as zeros)"
                * bool(extent.empty_frames)
            )
        )
    try:
        pose = Pose.read(data)
        body = pose.body
        shape = body.data.shape
        ok = len(shape) == 4 and shape[2] == pose.header.total_points()
    except Exception as e:  # pose-format raises struct.error, TypeError, ValueError, ...
        raise DataError(
            f"{name}: not a readable .pose file (truncated or corrupt: {type(e).__name__}: {e})"
        ) from None
    if not ok:
        raise DataError(f"{name}: pose body shape {shape} does not match its header")
    return pose


def _missing_message(
    name: str, spec_name: str, missing: dict[str, list[str]], have: dict[str, int], why: str
) -> str:
    parts = []
    for component, points in missing.items():
        if component not in have:
            parts.append(f"component {component} is absent")
        else:
            shown = ", ".join(points[:6]) + (", ..." if len(points) > 6 else "")
            need = sum(len(n) for c, n in _SETS.get(spec_name, ()) if c == component)
            parts.append(
                f"{component} lacks {len(points)} of the {need or len(points)} points needed"
                f" ({shown})"
            )
    return (
        f"{name}: pose layout does not fit components={spec_name!r}{why}: " + "; ".join(parts) + "."
        f" The file has {', '.join(f'{c} ({n} points)' for c, n in have.items()) or 'nothing'}."
        " A MediaPipe Holistic file with these points is needed"
        " (files already reduced with pose-format's reduce_holistic lack most body points)."
    )


@functools.lru_cache(maxsize=64)
def _positions(points: tuple[str, ...]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for i, point in enumerate(points):
        positions.setdefault(point, i)
    return positions


def _point_indices(
    pose: Pose, wanted: tuple[tuple[str, str], ...], name: str, spec_name: str, why: str = ""
) -> np.ndarray:
    """Index into the file's point axis of every wanted (component, point)."""
    offsets, have = {}, {}
    offset = 0
    for component in pose.header.components:
        if component.name not in offsets:
            offsets[component.name] = (offset, _positions(tuple(component.points)))
            have[component.name] = len(component.points)
        offset += len(component.points)
    out, missing = [], {}
    for component, point in wanted:
        start, positions = offsets.get(component, (0, {}))
        if point in positions:
            out.append(start + positions[point])
        else:
            missing.setdefault(component, []).append(point)
    if missing:
        raise DataError(_missing_message(name, spec_name, missing, have, why))
    return np.array(out)


def normalize_points(
    points: np.ndarray,
    observed: np.ndarray,
    right: np.ndarray,
    left: np.ndarray,
    right_obs: np.ndarray,
    left_obs: np.ndarray,
    name: str = "<pose>",
) -> np.ndarray:
    """Shoulder normalisation with pose-format `Pose.normalize` arithmetic (section 3.3).

    points [T, P, 3] float32, observed [T, P]; right/left [T, 3] float32 shoulders (p1, p2) and
    their [T] observed flags. One translation (mean shoulder midpoint over frames where both are
    observed) and one scale (1 / mean 3-D shoulder distance) for the whole clip. The dtypes
    follow pose-format's masked arithmetic, so the result is bit-identical to it: float64
    statistics, float32 translated points, float64 scaled points.
    Returns [T, P, 3] float64 with unobserved points 0.
    """
    both = right_obs & left_obs
    count = np.int64(both.sum())
    if count == 0:
        raise DataError(
            f"{name}: the shoulders ({BODY} RIGHT_SHOULDER and LEFT_SHOULDER) are never both"
            " observed, so the pose cannot be normalised"
        )
    # numpy's masked `/ 2` and `** 2` wrap the number in an int64 array, which promotes the
    # float32 shoulder sums and differences to float64.
    midpoint = np.where(both[:, None], (left + right) / np.array(2), 0.0)  # float64 [T, 3]
    center = midpoint.sum(axis=0) * 1.0 / count  # [3]
    # pose-format's shoulders are views of the data, so the distance is measured after the
    # in-place `data -= center`, which computes in float64 and stores float32.
    right, left = ((x.astype(np.float64) - center).astype(np.float32) for x in (right, left))
    sq = np.where(both[:, None], np.power(right - left, np.array(2)), 0.0)  # float64 [T, 3]
    distance = np.power(sq.sum(axis=-1), np.array(0.5))  # [T]
    mean_distance = distance.sum() * 1.0 / count
    if not np.isfinite(center).all() or not np.isfinite(mean_distance) or mean_distance <= 0:
        raise DataError(
            f"{name}: cannot normalise: mean shoulder distance is {mean_distance}"
            " (shoulders coincide or hold non-finite values)"
        )
    scale = 1 / mean_distance
    shifted = points.astype(np.float64)
    shifted[~observed] = 0.0  # no arithmetic on missing (possibly NaN/inf) points
    shifted -= center
    out = shifted.astype(np.float32) * scale  # float32 after `-=`, float64 after scaling
    out[~observed] = 0.0
    return out


def pose_to_array(pose: Pose, spec: PoseSpec, *, name: str = "<pose>") -> PoseArray:
    """Selects, normalises and hides legs: Pose -> PoseArray with `spec.num_points` points."""
    lay = layout(spec.components)
    idx = _point_indices(pose, lay.points, name, spec.components)
    norm_idx = None
    if lay.shoulders is None:  # hand-only sets: the full pose's shoulders (demo_finger)
        norm_idx = _point_indices(
            pose,
            ((BODY, "RIGHT_SHOULDER"), (BODY, "LEFT_SHOULDER")),
            name,
            spec.components,
            why=" for the shoulder normalisation",
        )
    data, confidence = pose.body.data, pose.body.confidence
    if data.ndim != 4 or data.shape[0] == 0:
        raise DataError(f"{name}: pose has no frames")
    if data.shape[1] == 0:
        raise DataError(f"{name}: pose has no person in any frame")
    dims = data.shape[-1]
    if dims < 2 or (dims < 3 and spec.include_z):
        raise DataError(f"{name}: pose has {dims}-D points; 3-D (x, y, z) points are needed")

    # Only the selected points (and the shoulders) are read: [T, P, 3] float32 and [T, P].
    cols = idx if norm_idx is None else np.concatenate([idx, norm_idx])
    raw = np.asarray(np.ma.getdata(data)[:, 0][:, cols], dtype=np.float32)
    present = np.asarray(confidence)[:, 0][:, cols] != 0  # pose-format masks confidence 0
    if dims < 3:  # 2-D poses: z = 0 (only reachable with include_z=False)
        raw = np.concatenate([raw, np.zeros((*raw.shape[:-1], 1), np.float32)], axis=-1)
    raw = raw[..., :3]
    finite = np.isfinite(raw)
    valid = present & finite[..., 0] & finite[..., 1] & finite[..., 2]
    if not present.any():
        raise DataError(f"{name}: no landmark is observed in any frame (all confidences are 0)")
    if not valid.any():
        raise DataError(f"{name}: every observed landmark value is NaN or infinite")

    p = len(idx)
    points, observed = raw[:, :p], valid[:, :p]
    if lay.shoulders:
        (rs, ls), src, obs = lay.shoulders, points, observed
    else:
        (rs, ls), src, obs = (0, 1), raw[:, p:], valid[:, p:]
    normed = normalize_points(
        points, observed, src[:, rs], src[:, ls], obs[:, rs], obs[:, ls], name=name
    )
    normed[:, lay.legs] = 0.0  # hide legs; they count as observed zeros (section 3.4)
    observed = observed | lay.legs[None, :]
    # The original casts the float64 result to float32 only when batching; same bits.
    return PoseArray(points=normed.astype(np.float32), observed=observed, fps=float(pose.body.fps))


def to_features(arr: PoseArray, spec: PoseSpec) -> np.ndarray:
    """PoseArray -> [min(T, max_frames), D] float32 features (frame-major, slot, coordinate)."""
    points = arr.points if spec.max_frames == 0 else arr.points[: spec.max_frames]
    if not spec.include_z:
        points = points[..., :2]
    return np.nan_to_num(points.reshape(points.shape[0], -1)).astype(np.float32, copy=False)


def load_features(
    source: str | os.PathLike | bytes, spec: PoseSpec = PoseSpec(), *, name: str | None = None
) -> np.ndarray:
    """Reads a `.pose` file and returns its [min(T, max_frames), D] float32 features."""
    if name is None:
        name = "<pose bytes>" if isinstance(source, bytes | bytearray) else str(source)
    pose = read_pose(source, name=name)
    return to_features(pose_to_array(pose, spec, name=name), spec)


def pad_frames(features: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, D] -> ([length, D] zero-padded, or the first `length` frames; [length] bool mask)."""
    t = min(features.shape[0], length)
    out = np.zeros((length, *features.shape[1:]), dtype=features.dtype)
    out[:t] = features[:t]
    mask = np.zeros(length, dtype=bool)
    mask[:t] = True
    return out, mask
