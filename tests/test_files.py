"""signclip_jax.files: atomic writes, video names, the first-n view of a source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from signclip_jax import files
from signclip_jax.errors import UserError


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.json"
    files.write_json_atomic(path, {"b": 1, "a": 1})
    files.write_json_atomic(path, {"b": 2, "a": 2}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": 2, "b": 2}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "x.pose"
    out.write_bytes(b"old")

    class Unwritable:  # bytes-like that fails mid-write
        def __buffer__(self, flags):
            raise OSError("disk full")

    with pytest.raises(TypeError):
        files.write_bytes_atomic(out, Unwritable())  # type: ignore[arg-type]
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pose"]
    files.write_bytes_atomic(tmp_path / "new" / "y.pose", b"abc")
    assert (tmp_path / "new" / "y.pose").read_bytes() == b"abc"


def test_write_npz_atomic_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "o.npz"
    files.write_npz_atomic(out, {"x": np.arange(3)})
    np.testing.assert_array_equal(np.load(out)["x"], np.arange(3))

    def broken(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_npz_atomic(out, {"x": np.arange(5)})
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out)["x"], np.arange(3))  # the old file is intact
    assert [p.name for p in out.parent.iterdir()] == ["o.npz"]  # no temporary left behind


def test_npy_bytes_round_trip():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    import io

    np.testing.assert_array_equal(np.load(io.BytesIO(files.npy_bytes(a))), a)


def test_is_video():
    assert files.is_video("clip.mp4") and files.is_video(Path("a/B.MOV"))
    assert files.is_video("x.webm") and files.is_video("x.mkv") and files.is_video("a/B.MKV")
    assert files.is_video("x.avi")
    assert not files.is_video("house.pose")
    assert not files.is_video("mp4")  # no suffix
    assert not files.is_video("clips.mp4/house.pose")


def test_as_path_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(files.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(files.as_path("gs://bucket/run")) == "gs://bucket/run"


def test_first_n_is_a_bounded_view_that_keeps_skipped_and_components():
    class Source:
        skipped = ("bad.pose",)
        components = ("POSE_LANDMARKS",)

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"i": i}

    view = files.FirstN(Source(), 3)
    assert len(view) == 3 and view[2] == {"i": 2} and list(view) == [{"i": i} for i in range(3)]
    assert view.skipped == ["bad.pose"] and view.components == ("POSE_LANDMARKS",)
    with pytest.raises(IndexError):
        view[3]
    assert len(files.FirstN(Source(), 50)) == 5


def test_a_gs_path_without_gcsfs_names_the_extra(monkeypatch):
    import sys

    from signclip_jax.errors import UserError

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    with pytest.raises(UserError, match=r"gs://b/run needs .*gcsfs.*signclip-jax\[gcs\]"):
        files.as_path("gs://b/run")
    with pytest.raises(UserError, match=r"signclip-jax\[gcs\]"):
        files.write_bytes_atomic("gs://b/run/x.json", b"{}")


def test_check_writable_dir_creates_the_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    files.check_writable_dir(target, "--workdir")
    assert target.is_dir() and list(target.iterdir()) == []
    files.check_writable_dir(target, "--workdir")  # an existing folder is fine too
    files.check_writable_dir("gs://bucket/run", "--workdir")  # object stores are not probed


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "proc_sub", "read_only"])
def test_check_writable_dir_refuses_with_one_line(tmp_path, where):
    """Paths that fail for root too (CI runs as root, where chmod does not stop writes)."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    folder = {
        "file": a_file,
        "under_file": a_file / "sub",
        "proc": Path("/proc"),
        "proc_sub": Path("/proc/signclip-x"),
        "read_only": tmp_path / "ro",
    }[where]
    if where.startswith("proc") and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder.mkdir()
        folder.chmod(0o555)
    try:
        with pytest.raises(UserError) as info:
            files.check_writable_dir(folder, "--out x.npz")
    finally:
        if where == "read_only":
            folder.chmod(0o755)
    message = str(info.value)
    assert message.startswith(f"--out x.npz: cannot write in {folder} (") and "\n" not in message
    assert a_file.read_text() == "x"
