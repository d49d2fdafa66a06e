"""Configs and runs shared by several test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from signclip_jax.data import synthetic

# A tiny random BERT (2 layers, width 32): keeps compiles short while the tokenizer stays the
# bundled MiniLM one. The same one `bench train --bert=tiny` uses.
from signclip_jax.model.bert import TINY_BERT

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py's get_config(arg)."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(synthetic_dir: Path, total_steps: int = 4):
    """configs/demo.py:tiny with the tiny random BERT, 96 frames, data in `synthetic_dir`."""
    config = load_config("demo", "tiny")
    config.total_steps = total_steps
    config.model.pretrained = False
    config.model.bert = dict(TINY_BERT)
    config.data.max_frames = 96
    config.data.synthetic_dir = str(synthetic_dir)
    config.data.length_buckets = ()  # one compiled train/eval program per run (CI time)
    config.compilation_cache_dir = ""  # tests stay out of ~/.cache (test_train checks it)
    return config


class StopAfter:
    """Stands in for train/preemption.py's PreemptionGuard: reports a SIGTERM from poll n+1 on
    (the loop polls once per step, so the run saves step n + 1 and stops)."""

    def __init__(self, n: int):
        self.n = n
        self.polls = 0

    @property
    def requested(self):
        self.polls += 1
        return "SIGTERM" if self.polls > self.n else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def write_pose(path: Path, frames: int, seed: int) -> Path:
    """A real .pose file (MediaPipe Holistic header, no world landmarks) of exactly `frames`."""
    data, conf = synthetic.random_clip(seed, min_frames=frames, max_frames=frames)
    data, conf = data[:, :, :-33], conf[:, :, :-33]
    header = synthetic.holistic_header(468, world_landmarks=False)
    path.write_bytes(synthetic.pose_bytes(header, data, conf, 25.0))
    return path


# A stand-in for the video environment's python: answers signclip_jax/data/video_worker.py's
# protocol (FAKE_VIDEO_MODE ok | mixed | broken | crash | sleep) without MediaPipe.
FAKE_VIDEO_WORKER = r"""
import json, os, shutil, sys, time
PREFIX = "@@signclip-video "
worker, args = sys.argv[1], sys.argv[2:]
flags = [a for a in args if a.startswith("--")]
pairs = [a for a in args if not a.startswith("--")]
mode = os.environ["FAKE_VIDEO_MODE"]
with open(os.environ["FAKE_VIDEO_LOG"], "w") as f:
    json.dump({"worker": worker, "flags": flags, "pairs": pairs,
               "pythonpath": os.environ.get("PYTHONPATH")}, f)
if mode == "sleep":
    time.sleep(60)
if mode == "broken":
    sys.stderr.write("video environment incomplete: ModuleNotFoundError: No module named 'cv2'\n")
    sys.exit(3)
if mode == "crash":  # a partial file, then death without a result line
    with open(pairs[1], "wb") as f:
        f.write(b"partial")
    sys.stderr.write("Fatal Python error: Segmentation fault\n")
    sys.exit(139)
code = 0
for src, dst in zip(pairs[::2], pairs[1::2]):
    if mode == "ok" or (mode == "mixed" and "bad" not in os.path.basename(src)):
        shutil.copyfile(os.environ["FAKE_VIDEO_POSE"], dst)
        print(PREFIX + json.dumps({"input": src, "output": dst, "frames": 3, "fps": 25.0,
              "width": 64, "height": 48, "seconds": 0.1, "frames_per_second": 30.0,
              "hands": 1.0}))
    else:
        print(PREFIX + json.dumps({"input": src, "error": "no frame could be decoded"}))
        code = 1
sys.exit(code)
"""


def touch(path: Path, data: bytes = b"not really a video") -> Path:
    """Writes `data` to `path` (parents made): a stand-in video file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
