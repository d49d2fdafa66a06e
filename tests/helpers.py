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
    config.compilation_cache_dir = ""  # tests stay out of ~/.cache (test_train checks it)
    return config


def write_pose(path: Path, frames: int, seed: int) -> Path:
    """A real .pose file (MediaPipe Holistic header, no world landmarks) of exactly `frames`."""
    data, conf = synthetic.random_clip(seed, min_frames=frames, max_frames=frames)
    data, conf = data[:, :, :-33], conf[:, :, :-33]
    header = synthetic.holistic_header(468, world_landmarks=False)
    path.write_bytes(synthetic.pose_bytes(header, data, conf, 25.0))
    return path
