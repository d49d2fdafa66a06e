"""Hostile .pose headers (issue 17): what a file declares is checked against its bytes and the
limits before pose-format allocates, with peak memory measured; valid files read as before."""

import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pose_format import Pose
from pose_format.pose_header import PoseHeaderCache

from signclip_jax.data import pipeline
from signclip_jax.data import pose as pose_lib
from signclip_jax.data.pose import DataError, PoseLimitError, PoseSpec
from signclip_jax.data.synthetic import holistic_header, pose_bytes, random_clip
from signclip_jax.serving import validation
from tests.data.malformed import amplification, empty_frames, header_bytes, hostile_poses

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20

# name -> (error class, words the message must hold)
EXPECTED = {
    "v00_65535_empty_frames": (PoseLimitError, ["65535 frames (65535 without a person)", "MiB"]),
    "v00_65535_points": (PoseLimitError, ["65535", "points", "MAX_POSE_POINTS"]),
    "v00_alloc": (PoseLimitError, ["16000 frames", "4000 points", "MiB"]),
    "v02_frames": (PoseLimitError, ["4294967295 frames", f"at most {pose_lib.MAX_POSE_FRAMES}"]),
    "v02_people": (DataError, ["truncated or corrupt", "65535 people"]),
    "v01_no_people": (DataError, ["0 people"]),
    "huge_header": (PoseLimitError, ["MAX_POSE_HEADER_BYTES"]),
    "v00_people": (DataError, ["truncated or corrupt", "65535 people of frame 0"]),
    "v09": (DataError, ["not a readable", "version 0.9"]),
}


def valid_v00(frames: int = 30, empty_every: int = 4, seed: int = 0) -> bytes:
    """A valid format v0.0 file (576 holistic points), every `empty_every`-th frame empty."""
    data, conf = random_clip(seed, min_frames=frames, max_frames=frames)
    values = np.concatenate([data[:, 0], conf[:, 0, :, None]], axis=-1).astype("<f4")
    out = bytearray(header_bytes(version=0.0) + struct.pack("<HH", 25, frames))
    for f in range(frames):
        if empty_every and f % empty_every == 1:
            out += struct.pack("<H", 0)
        else:
            out += struct.pack("<Hh", 1, 0) + values[f].tobytes()
    return bytes(out)


def valid_v02(frames: int = 40, seed: int = 0) -> bytes:
    data, conf = random_clip(seed, min_frames=frames, max_frames=frames)
    return pose_bytes(holistic_header(), data, conf, fps=25.0)


def test_the_issue_reproduction_is_small_and_declares_gigabytes():
    data = amplification()
    assert len(data) < 200_000
    extent = pose_lib.pose_extent(data)
    assert (extent.version, extent.frames, extent.empty_frames) == (0.0, 65_535, 65_535)
    assert extent.alloc_bytes > 2 * 2**30 and extent.body_bytes == 4 + 2 * 65_535


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_hostile_files_are_refused_naming_file_and_numbers(tmp_path, kind):
    data = hostile_poses()[kind]
    error, words = EXPECTED[kind]
    path = tmp_path / f"{kind}.pose"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(error) as info:
            pose_lib.load_features(source, name=None if source is path else kind)
        message = str(info.value)
        assert (str(path) if source is path else kind) in message
        for word in words:
            assert word in message, message
        if error is DataError:  # not a limit: the file cannot be what it says
            assert not isinstance(info.value, PoseLimitError)


_MEASURE = """
import json, sys
from pathlib import Path
import numpy as np
from signclip_jax.data import pipeline, pose as pose_lib
from signclip_jax.serving import validation
from pose_format import Pose
paths = sorted(Path(sys.argv[1]).glob("*.pose"))
blobs = [p.read_bytes() for p in paths]
spec = pose_lib.PoseSpec()
def status(key):  # /proc/self/status, in bytes (Linux reports KiB)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# Reset the peak (VmHWM) to the current RSS, so that a transient peak of the imports above
# cannot hide the growth measured below.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, refused = status("VmRSS"), []
def rss():
    return status("VmHWM")
for path, blob in zip(paths, blobs):
    if sys.argv[2] == "control":  # pose-format itself, no checks: must show the growth
        body = Pose.read(blob).body
        # Touch what it allocated, as feature extraction does: calloc'd zeros that nobody
        # touches may not count in RSS at all.
        np.asarray(body.data).fill(1.0)
        np.asarray(body.confidence).fill(1.0)
        continue
    for read in (lambda: pose_lib.load_features(path, spec),  # embed, Embedder, torch twin
                 lambda: pipeline.record_pose_array({"pose_path": str(path)}, spec),  # training
                 lambda: pipeline.record_pose_array({"pose_bytes": blob}, spec),  # packed/tfds
                 lambda: validation.pose_features(blob, spec, name="p", max_frames=10_000)):
        try:
            read()
        except (pose_lib.DataError, validation.ApiError) as e:
            refused.append(type(e).__name__)
print(json.dumps({"growth": rss() - before, "refused": refused}))
"""


def _peak_rss_growth(folder: Path, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), mode],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self (Linux)")
def test_peak_rss_stays_small_for_every_reader(tmp_path):
    """Every reader of .pose bytes (embed/Embedder, training paths and bytes, the server's
    validation) refuses every hostile file with peak RSS growing by < 50 MB."""
    corpus = hostile_poses()
    for name, data in corpus.items():
        (tmp_path / f"{name}.pose").write_bytes(data)
    out = _peak_rss_growth(tmp_path, "check")
    assert len(out["refused"]) == 4 * len(corpus), out
    assert out["growth"] < 50 * MB, f"peak RSS grew by {out['growth'] / MB:.0f} MB"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self (Linux)")
def test_the_rss_measurement_sees_an_amplification(tmp_path):
    """The control: pose-format reading a 20 KB v0.0 file of 10,000 empty frames unchecked
    grows peak RSS by about 480 MB, far over the 50 MB bound (and over any transient peak of
    the imports before it), so the test above can fail."""
    (tmp_path / "small_amplification.pose").write_bytes(amplification(frames=10_000))
    out = _peak_rss_growth(tmp_path, "control")
    assert out["growth"] > 50 * MB, out


def test_server_validation_answers_413_for_limits_and_422_for_lies():
    spec = PoseSpec()
    corpus = hostile_poses()
    for kind, (error, _) in EXPECTED.items():
        with pytest.raises(validation.ApiError) as info:
            validation.pose_features(corpus[kind], spec, name="'pose'[0]", max_frames=10_000)
        assert info.value.status == (413 if error is PoseLimitError else 422), kind
        assert info.value.message.startswith("'pose'[0]: ")
    # The server's own frame limit applies before decoding, with the message it always had.
    with pytest.raises(validation.ApiError, match=r"^'pose'\[0\]: 40 frames; at most 39 per"):
        validation.pose_features(valid_v02(40), spec, name="'pose'[0]", max_frames=39)
    # The server's memory limit follows its body limit.
    assert validation.pose_alloc_limit(16 * MB) == 128 * MB
    assert validation.pose_alloc_limit(2**40) == pose_lib.MAX_POSE_ALLOC_BYTES
    small = amplification(frames=2_000)  # about 96 MB to decode: over a 4 MiB body's 32 MiB
    with pytest.raises(validation.ApiError) as info:
        validation.pose_features(
            small,
            spec,
            name="p",
            max_frames=10_000,
            max_alloc_bytes=validation.pose_alloc_limit(4 * MB),
        )
    assert info.value.status == 413 and "MiB" in info.value.message


# --- valid files read exactly as before -------------------------------------------------------


def _same_pose(a: Pose, b: Pose) -> None:
    assert a.body.data.dtype == b.body.data.dtype and a.body.fps == b.body.fps
    np.testing.assert_array_equal(np.ma.getdata(a.body.data), np.ma.getdata(b.body.data))
    np.testing.assert_array_equal(np.ma.getmaskarray(a.body.data), np.ma.getmaskarray(b.body.data))
    np.testing.assert_array_equal(np.asarray(a.body.confidence), np.asarray(b.body.confidence))


@pytest.mark.parametrize("make", [valid_v02, valid_v00, lambda: valid_v00(empty_every=0)])
def test_valid_generated_files_read_as_pose_format_reads_them(make):
    data = make()
    _same_pose(pose_lib.read_pose(data), Pose.read(data))
    extent = pose_lib.pose_extent(data)
    assert extent.header_bytes + extent.body_bytes == len(data)
    feats = pose_lib.load_features(data)
    assert feats.shape == (extent.frames, 609) and np.isfinite(feats).all()


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name",
    ["spreadthesign-ase-house.pose", "colin-1-HOUSE.pose", "colin-SAD.pose",
     "pose-format-mediapipe.pose"],
)  # fmt: skip
def test_real_recordings_read_as_pose_format_reads_them(shared_pose, name):
    data = shared_pose(name).read_bytes()
    _same_pose(pose_lib.read_pose(data), Pose.read(data))
    extent = pose_lib.pose_extent(data)
    assert extent.header_bytes + extent.body_bytes == len(data)
    assert extent.alloc_bytes < 2 * len(data)  # real files are nowhere near a limit


@pytest.mark.parametrize(
    "make",
    [valid_v02, lambda: valid_v02(300), valid_v00, lambda: valid_v00(200, empty_every=0),
     lambda: amplification(frames=500), lambda: amplification(frames=3000)],
)  # fmt: skip
def test_the_allocation_estimate_bounds_what_pose_format_allocates(make):
    """tracemalloc peak of pose-format's own decoding <= the estimate, and within 4x of it."""
    data = make()
    estimate = pose_lib.pose_extent(data).alloc_bytes
    PoseHeaderCache.clear_cache()
    tracemalloc.start()
    try:
        Pose.read(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert estimate / 4 < peak <= estimate, (peak, estimate)


def test_limits_can_be_set_per_call(tmp_path):
    data = valid_v02(40)
    with pytest.raises(PoseLimitError, match="40 frames; at most 39 per pose"):
        pose_lib.read_pose(data, max_frames=39)
    with pytest.raises(PoseLimitError, match="at least 501 points per person; at most 500"):
        pose_lib.read_pose(data, max_points=500)
    with pytest.raises(PoseLimitError, match="would take about 1 MiB; at most 0 MiB"):
        pose_lib.read_pose(data, max_alloc_bytes=100_000)
    # A file larger than the memory limit is refused before it is read.
    path = tmp_path / "big.pose"
    path.write_bytes(data)
    with pytest.raises(PoseLimitError, match=f"{len(data)} bytes"):
        pose_lib.read_pose(path, max_alloc_bytes=len(data) - 1)
    assert pose_lib.read_pose(data, max_frames=40).body.data.shape[0] == 40


def test_v00_frames_are_walked_against_the_bytes():
    # 10 frames declared, 9 present: the walk notices before pose-format does.
    data = header_bytes(version=0.0) + empty_frames(10)[:-2]
    with pytest.raises(DataError, match="person count of frame 9"):
        pose_lib.read_pose(data, name="short.pose")


def test_read_pose_header(tmp_path):
    data = valid_v02(5)
    (tmp_path / "a.pose").write_bytes(data)
    extent = pose_lib.pose_extent(data)
    (tmp_path / "a.poseheader").write_bytes(data[: extent.header_bytes])
    for name in ("a.pose", "a.poseheader"):
        header = pose_lib.read_pose_header(tmp_path / name)
        assert header.total_points() == 576 and len(header.components) == 5
    (tmp_path / "h.pose").write_bytes(hostile_poses()["huge_header"])
    with pytest.raises(PoseLimitError, match="MAX_POSE_HEADER_BYTES"):
        pose_lib.read_pose_header(tmp_path / "h.pose")
    with pytest.raises(DataError, match="cannot read pose header"):
        pose_lib.read_pose_header(tmp_path / "missing.pose")


def test_training_records_skip_hostile_files_as_data_errors(tmp_path):
    """The pipeline's counted skip catches DataError: the limits are DataErrors."""
    path = tmp_path / "amp.pose"
    path.write_bytes(amplification())
    with pytest.raises(DataError, match=str(path)):
        pipeline.record_pose_array({"pose_path": str(path)}, PoseSpec())


def test_peak_memory_of_the_refusal_in_process():
    """The same bound in this process, measured with tracemalloc (numpy reports to it)."""
    data = amplification()
    tracemalloc.start()
    try:
        with pytest.raises(PoseLimitError):
            pose_lib.read_pose(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MB, peak
