"""A run directory in seconds: the tiny config's model with random weights, no training.

What `train` writes for the purpose of loading it back (config.json, model_config.json,
bert_config.json, tokenizer/, checkpoints/STEP), written by the importer's `write_run`, so the
release and --model tests need not wait minutes for the shared trained `tiny_workdir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from signclip_jax import run as run_lib
from signclip_jax.interop import importer
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses
from tests.helpers import tiny_config, write_pose


def make_run(workdir: Path, *, seed: int = 0) -> Path:
    """A run directory at `workdir` (created; absolute) holding the tiny model with random
    weights drawn from `seed` as checkpoints/0."""
    workdir = workdir.absolute()
    workdir.mkdir(parents=True)
    config = tiny_config(workdir / "synthetic")
    source = run_lib.source_from_config(config)
    model = signclip_model.SignCLIP(source.model_config, rngs=nnx.Rngs(seed))
    params = {
        "model": nnx.state(model, nnx.Param),
        "loss": losses.init_loss_params(config.loss.name, config.loss),
    }
    imported = importer.Imported(config, source.model_config, params, source.tokenizer, {})
    importer.write_run(workdir, imported)
    return workdir


def log_validation(workdir: Path, step: int, **metrics: float) -> None:
    """Appends a validation row (as training logs it) to WORKDIR/metrics.jsonl."""
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "split": "val", **metrics}) + "\n")


def pose_files(folder: Path) -> list[Path]:
    """Three generated .pose files: 10, 40 and 130 frames (the last over max_frames, 96)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_pose(folder / f"p{i}.pose", n, seed=i) for i, n in enumerate((10, 40, 130))]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
