"""Configs and runs shared by several test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny random BERT: keeps compiles short while the tokenizer stays the bundled MiniLM one.
TINY_BERT = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=512,
)  # fmt: skip


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
    return config
