"""`python -m signclip_jax.video` (signclip_jax/tools/video.py): outputs, usage errors, exit codes.

The conversion itself is tested in tests/data/test_video.py, whose fake video environment
these tests share (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from signclip_jax.data import video as video_lib
from signclip_jax.errors import UserError
from signclip_jax.tools import video
from tests.helpers import touch


def test_cli_out_dir_converts_what_it_can(tmp_path, fake_env, fake_pose, capsys):
    fake_env("mixed")
    good = touch(tmp_path / "in" / "good.mp4")
    bad = touch(tmp_path / "in" / "bad.mov")
    missing = tmp_path / "in" / "gone.mp4"
    old = touch(tmp_path / "out" / "bad.pose", b"old")
    code = video.main([str(good), str(bad), str(missing), f"--out_dir={tmp_path / 'out'}"])
    assert code == 1
    assert (tmp_path / "out" / "good.pose").read_bytes() == fake_pose.read_bytes()
    assert old.read_bytes() == b"old"  # a failed conversion does not touch an existing file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad.pose", "good.pose"]
    err = capsys.readouterr().err
    assert f"{bad}: no frame could be decoded" in err
    assert f"{missing}: video file not found" in err
    fake_env("ok")
    assert video.main([str(good), f"--out={tmp_path / 'one.pose'}"]) == 0
    assert (tmp_path / "one.pose").read_bytes() == fake_pose.read_bytes()
    assert "good.mp4 -> " in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, fake_env):
    a, b = touch(tmp_path / "a.mp4"), touch(tmp_path / "x" / "a.mp4")
    with pytest.raises(UserError, match="exactly one of --out"):
        video.main([str(a)])
    with pytest.raises(UserError, match="--out takes one video"):
        video.main([str(a), str(b), "--out=x.pose"])
    with pytest.raises(UserError, match="both be written"):
        video.main([str(a), str(b), f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match="no video given"):
        video.main([])


def test_cli_exit_code_and_message(tmp_path, monkeypatch):
    """`python -m signclip_jax.video` without an environment: one line on stderr, exit 2."""
    env = {**os.environ, video_lib.ENV_VAR: str(tmp_path / "none")}
    proc = subprocess.run(
        [sys.executable, "-m", "signclip_jax.video", "a.mp4", "--out=a.pose"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(video.__file__).parents[2],
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: a.mp4: cannot turn a video into a pose")
    assert "Traceback" not in proc.stderr
