"""What the train loop reports, and where XLA keeps its compiled programs: metrics.jsonl (+
TensorBoard events), the live progress line, the persistent compilation cache."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from signclip_jax import files
from signclip_jax.cli import format_duration

log = logging.getLogger("signclip_jax.train")


class MetricWriter:
    """metrics.jsonl (one JSON object per line, always with `step`) plus TensorBoard events."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = files.is_remote(workdir)
        self._tb = None
        if enabled:
            try:
                # Imported here: tensorboardX imports torch whenever torch is installed
                # (seconds), and TensorBoard is a convenience that must never stop training.
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(epath.Path(workdir) / "tb"))
            except Exception as e:  # TensorBoard is a convenience; never fail training for it
                log.warning("TensorBoard events disabled: %s", e)

    def write(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        if prefix:
            row["split"] = prefix
        row.update({k: _plain(v) for k, v in values.items()})
        line = json.dumps(row, sort_keys=False) + "\n"
        if self._remote:  # object stores have no append: rewrite (metrics files stay small)
            old = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(old + line)
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def enable_compilation_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path` (~ expanded; gs:// allowed).

    Returns the directory used, or None when `path` is empty.
    XLA:GPU also keeps its per-fusion autotuning results there.
    """
    if not path:
        return None
    path = path if files.is_remote(path) else os.path.expanduser(path)
    if jax.config.jax_compilation_cache_dir not in (None, path):
        # JAX opens its cache once per process: a second directory (bench after a training
        # run in one process, tests) would otherwise still write into the first.
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)  # also after earlier compiles (tested)
    return path


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class Progress:
    """One live line: step, loss, lr, samples/s, ETA (carriage return on a terminal)."""

    def __init__(self, total_steps: int, batch_size: int, *, start_step: int = 0, stream=None):
        self.total = total_steps
        self.batch_size = batch_size
        self.stream = stream or sys.stderr
        self._t0 = time.perf_counter()
        self._step0 = start_step
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        return (step - self._step0) * self.batch_size / max(elapsed, 1e-9)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        sps = self.rate(step)
        remaining = (self.total - step) * self.batch_size / max(sps, 1e-9)
        line = (
            f"step {step}/{self.total} loss {metrics.get('loss', float('nan')):.4f} "
            f"lr {metrics.get('lr', float('nan')):.3g} {sps:.1f} samples/s "
            f"ETA {format_duration(remaining)}"
        )
        metrics_skipped = metrics.get("data_skipped")
        if metrics_skipped:
            line += f" skipped {int(metrics_skipped)}"
        end = "\r" if self._tty and step < self.total else "\n"
        print(line.ljust(100), end=end, file=self.stream, flush=True)

    def note(self, step: int, values: Mapping[str, float], *, name: str = "validation") -> None:
        """One line of an evaluator's numbers (floats only)."""
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        print(f"\n{name} at step {step}: {shown}", file=self.stream, flush=True)
