"""Test set-up shared by the whole suite.

8 host CPU devices so sharding tests see a real mesh (must be set before jax is imported),
absl flags marked parsed for grain's worker processes, and the location of ../shared/data.
"""

import os
import stat
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads from tests, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
from absl import flags

from signclip_jax.data import synthetic, video
from tests import helpers

flags.FLAGS.mark_as_parsed()

SHARED_DATA = Path(
    os.environ.get(
        "SIGNCLIP_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real recordings beside the checkout (`../shared/data`); skips when absent."""
    if not (SHARED_DATA / "poses").is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (set SIGNCLIP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_pose(shared_data):
    """Path of one real `.pose` file from ../shared/data/poses by file name."""

    def get(name: str) -> Path:
        path = shared_data / "poses" / name
        if not path.exists():
            pytest.skip(f"{path} not found")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A workdir trained for 4 steps with `tests.helpers.tiny_config` (8-device CPU mesh):
    config.json, model_config.json, tokenizer/, checkpoints/{2,4}, metrics.jsonl.

    Shared, read-only: tests that write must copy it first.
    """
    from signclip_jax.train import loop as train_lib
    from tests.helpers import tiny_config

    workdir = tmp_path_factory.mktemp("tiny_workdir")
    synthetic = tmp_path_factory.mktemp("tiny_synthetic")
    train_lib.train(tiny_config(synthetic), str(workdir))
    return workdir


# ---------------------------------------------- a fake video environment (tests/helpers.py)
@pytest.fixture
def fake_pose(tmp_path) -> Path:
    """A generated holistic .pose file (what the fake worker hands back)."""
    data, conf = synthetic.random_clip(3, min_frames=12, max_frames=12)
    path = tmp_path / "fake.pose"
    path.write_bytes(synthetic.pose_bytes(synthetic.holistic_header(), data, conf, fps=25.0))
    return path


@pytest.fixture
def fake_env(tmp_path, monkeypatch, fake_pose):
    """Points SIGNCLIP_VIDEO_PYTHON at a fake; returns set_mode(mode) -> path of its call log."""
    script = tmp_path / "fake_worker.py"
    script.write_text(helpers.FAKE_VIDEO_WORKER)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "fake.log"
    monkeypatch.setenv(video.ENV_VAR, str(python))
    monkeypatch.setenv("FAKE_VIDEO_LOG", str(log))
    monkeypatch.setenv("FAKE_VIDEO_POSE", str(fake_pose))

    def set_mode(mode: str) -> Path:
        monkeypatch.setenv("FAKE_VIDEO_MODE", mode)
        return log

    set_mode("ok")
    return set_mode
