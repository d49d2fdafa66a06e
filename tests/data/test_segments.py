"""signclip_jax.data.segments: lengths, sliding windows, ELAN/SRT/VTT/CSV segments, and the
features of a span (normalised as a clip of its own)."""

import io

import numpy as np
import pytest

from signclip_jax.data import pose as pose_lib
from signclip_jax.data import segments as seg
from signclip_jax.data import synthetic
from signclip_jax.errors import DataError, UserError


def write_long_pose(path, frames: int, fps: float = 25.0, first_seed: int = 0):
    """A real .pose file of exactly `frames` frames (MediaPipe Holistic header, no world
    landmarks): generated clips of different signers one after the other, as continuous
    signing by several people (each clip normalises differently)."""
    datas, confs, total, seed = [], [], 0, first_seed
    while total < frames:
        data, conf = synthetic.random_clip(seed, min_frames=60, max_frames=90)
        datas.append(data[:, :, :-33])
        confs.append(conf[:, :, :-33])
        total += len(data)
        seed += 1
    header = synthetic.holistic_header(468, world_landmarks=False)
    data, conf = np.concatenate(datas)[:frames], np.concatenate(confs)[:frames]
    path.write_bytes(synthetic.pose_bytes(header, data, conf, fps))
    return path


def test_parse_length():
    assert seg.parse_length("64") == seg.Length(64.0, "f")
    assert seg.parse_length("64f") == seg.Length(64.0, "f")
    assert seg.parse_length("2s") == seg.Length(2.0, "s")
    assert seg.parse_length("2.5s") == seg.Length(2.5, "s")
    assert seg.parse_length("500ms") == seg.Length(0.5, "s")
    assert seg.parse_length("2s").frames(25.0) == 50
    assert seg.parse_length("0.5s").frames(29.97) == 15  # round(14.985)
    assert seg.parse_length("64").frames(30.0) == 64
    assert str(seg.parse_length("64")) == "64" and str(seg.parse_length("2.5s")) == "2.5s"
    for bad in ("", "abc", "-3", "0", "0s", "1.5", "1.5f", "2 hours"):
        with pytest.raises(UserError, match="--window"):
            seg.parse_length(bad, "--window")


def test_window_spans():
    assert seg.window_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    # The strides miss the last frame: one more window ends there.
    assert seg.window_spans(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert seg.window_spans(8, 4, 4) == [(0, 4), (4, 8)]
    assert seg.window_spans(3, 4, 2) == [(0, 3)]  # shorter than a window: one window
    assert seg.window_spans(0, 4, 2) == []
    spans = seg.window_spans(7500, 64, 16)
    assert len(spans) == 466 and spans[-1] == (7436, 7500)
    assert all(e - s == 64 for s, e in spans)
    covered = np.zeros(7500, bool)
    for s, e in spans:
        covered[s:e] = True
    assert covered.all()


SRT = """1
00:00:01,000 --> 00:00:02,500
<i>HOUSE</i>

2
00:00:03,040 --> 00:00:04,000
two
lines

3
01:00:00,000 --> 01:00:01,5
late
"""

VTT = """WEBVTT - a title

NOTE a comment
that spans lines

STYLE
::cue { color: red }

intro
00:01.000 --> 00:02.000 align:start position:10%
<v Signer>HOUSE</v>

00:00:03.000 --> 00:00:03.500
SUN
"""


def test_subtitles(tmp_path):
    srt = tmp_path / "rec.srt"
    srt.write_text(SRT)
    found = seg.read_segments(srt)
    assert [(s.start, s.end, s.label) for s in found.segments] == [
        (1.0, 2.5, "HOUSE"),
        (3.04, 4.0, "two lines"),
        (3600.0, 3601.5, "late"),
    ]
    assert not found.has_files and found.segments[0].line == f"{srt} line 2"
    vtt = tmp_path / "rec.vtt"
    vtt.write_text(VTT)
    found = seg.read_segments(vtt)
    assert [(s.start, s.end, s.label) for s in found.segments] == [
        (1.0, 2.0, "HOUSE"),
        (3.0, 3.5, "SUN"),
    ]
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:02,000 --> 00:00:01,000\nbackwards\n")
    with pytest.raises(UserError, match=r"bad\.srt line 2: end 1 is not after start 2"):
        seg.read_segments(bad)
    bad.write_text("1\n00:00:0x,000 --> 00:00:01,000\nx\n")
    with pytest.raises(UserError, match="cannot read the cue time"):
        seg.read_segments(bad)
    bad.write_text("")
    with pytest.raises(UserError, match="no segments found"):
        seg.read_segments(bad)
    (tmp_path / "x.vtt").write_text("00:01.000 --> 00:02.000\nx\n")
    with pytest.raises(UserError, match="starts with 'WEBVTT'"):
        seg.read_segments(tmp_path / "x.vtt")


def test_csv(tmp_path):
    f = tmp_path / "segs.csv"
    f.write_text("file,start,end,label\nrec.pose,0.5,1.0,HOUSE\n/abs/b.pose,2,3.25,\n\n")
    found = seg.read_segments(f)
    assert found.has_files
    assert [(s.file, s.start, s.end, s.unit, s.label) for s in found.segments] == [
        (str(tmp_path / "rec.pose"), 0.5, 1.0, "s", "HOUSE"),
        ("/abs/b.pose", 2.0, 3.25, "s", ""),
    ]
    f.write_text("pose,start_frame,end_frame,gloss,tier\nrec.pose,10,74,SUN,gloss\n")
    (s,) = seg.read_segments(f).segments
    assert (s.start, s.end, s.unit, s.label, s.tier) == (10, 74, "f", "SUN", "gloss")
    assert s.frames(25.0, 1000) == (10, 74)
    for content, message in [
        ("file,begin,stop\na.pose,1,2\n", "the header needs a file column"),
        ("file,start,end\na.pose,one,2\n", "line 2: start and end must be numbers"),
        ("file,start,end\na.pose,2,2\n", "line 2: end 2 is not after start 2"),
        ("file,start,end\na.pose,1\n", "line 2: 2 fields, the header has 3"),
        ("file,start_frame,end_frame\na.pose,1.5,4\n", "frames are whole numbers"),
        ("file,start,end\n,1,2\n", "line 2: no file"),
    ]:
        f.write_text(content)
        with pytest.raises(UserError, match=message):
            seg.read_segments(f)


EAF = """<?xml version="1.0" encoding="UTF-8"?>
<ANNOTATION_DOCUMENT AUTHOR="" FORMAT="3.0" VERSION="3.0">
  <HEADER MEDIA_FILE="" TIME_UNITS="milliseconds">
    <MEDIA_DESCRIPTOR MEDIA_URL="file:///data/video/session1.mp4" MIME_TYPE="video/mp4"/>
  </HEADER>
  <TIME_ORDER>
    <TIME_SLOT TIME_SLOT_ID="ts1" TIME_VALUE="1000"/>
    <TIME_SLOT TIME_SLOT_ID="ts2" TIME_VALUE="1640"/>
    <TIME_SLOT TIME_SLOT_ID="ts3"/>
    <TIME_SLOT TIME_SLOT_ID="ts4" TIME_VALUE="3000"/>
  </TIME_ORDER>
  <TIER LINGUISTIC_TYPE_REF="gloss" TIER_ID="RH-gloss">
    <ANNOTATION>
      <ALIGNABLE_ANNOTATION ANNOTATION_ID="a1" TIME_SLOT_REF1="ts1" TIME_SLOT_REF2="ts2">
        <ANNOTATION_VALUE>HOUSE</ANNOTATION_VALUE>
      </ALIGNABLE_ANNOTATION>
    </ANNOTATION>
    <ANNOTATION>
      <ALIGNABLE_ANNOTATION ANNOTATION_ID="a2" TIME_SLOT_REF1="ts3" TIME_SLOT_REF2="ts4">
        <ANNOTATION_VALUE>UNALIGNED</ANNOTATION_VALUE>
      </ALIGNABLE_ANNOTATION>
    </ANNOTATION>
  </TIER>
  <TIER LINGUISTIC_TYPE_REF="translation" PARENT_REF="RH-gloss" TIER_ID="English">
    <ANNOTATION>
      <REF_ANNOTATION ANNOTATION_ID="a3" ANNOTATION_REF="a1">
        <ANNOTATION_VALUE>a house</ANNOTATION_VALUE>
      </REF_ANNOTATION>
    </ANNOTATION>
  </TIER>
</ANNOTATION_DOCUMENT>
"""


def test_elan(tmp_path):
    f = tmp_path / "session1.eaf"
    f.write_text(EAF)
    found = seg.read_segments(f)
    assert [(s.start, s.end, s.label, s.tier) for s in found.segments] == [
        (1.0, 1.64, "HOUSE", "RH-gloss"),
        (1.0, 1.64, "a house", "English"),  # a REF_ANNOTATION takes its parent's times
    ]
    assert found.media == ["file:///data/video/session1.mp4"]
    assert len(found.skipped) == 1 and "a2" in found.skipped[0][0]
    (only,) = seg.read_segments(f, tiers=["English"]).segments
    assert only.label == "a house"
    with pytest.raises(UserError, match=r"no tier 'LH'; the file has 'RH-gloss', 'English'"):
        seg.read_segments(f, tiers=["LH"])
    with pytest.raises(UserError, match="tiers are chosen only in ELAN"):
        seg.read_segments(tmp_path / "x.srt", tiers=["LH"])
    f.write_text("<ANNOTATION_DOCUMENT><TIER")
    with pytest.raises(UserError, match="not a readable ELAN file"):
        seg.read_segments(f)
    f.write_text("<other/>")
    with pytest.raises(UserError, match="not an ELAN file"):
        seg.read_segments(f)
    with pytest.raises(UserError, match="unknown kind of file"):
        seg.read_segments(tmp_path / "x.txt")
    with pytest.raises(UserError, match="cannot read"):
        seg.read_segments(tmp_path / "missing.eaf")


def test_segment_frames():
    s = seg.Segment(1.0, 1.64, line="x.srt line 2")
    assert s.frames(25.0, 1000) == (25, 41)
    assert s.frames(25.0, 30) == (25, 30)  # clipped to the recording
    assert seg.Segment(1.0, 1.01).frames(25.0, 100) == (25, 26)  # under a frame: one frame
    with pytest.raises(DataError, match=r"x\.srt line 2: \[1\.000s-1\.640s\] lies outside"):
        s.frames(25.0, 20)


def test_span_features_are_the_slice_as_its_own_file(tmp_path):
    """A span's features equal those of the same frames saved as a .pose file (its own
    shoulder normalisation), and differ from the whole recording's features cut there."""
    path = write_long_pose(tmp_path / "rec.pose", 120, first_seed=3)
    pose = pose_lib.read_pose(path)
    spec = pose_lib.PoseSpec(max_frames=96)
    got = seg.span_features(pose, 30, 94, spec, name="rec.pose")
    buffer = io.BytesIO()
    seg.slice_pose(pose, 30, 94).write(buffer)
    alone = pose_lib.load_features(buffer.getvalue(), spec)
    assert got.shape == (64, spec.feature_dim)
    np.testing.assert_array_equal(got, alone)
    whole = pose_lib.load_features(path, pose_lib.PoseSpec(max_frames=0))[30:94]
    assert np.abs(whole - got).max() > 1e-3  # the span is normalised on its own frames
    # max_frames is not applied: the caller decides about long spans.
    assert seg.span_features(pose, 0, 120, spec).shape[0] == 120
