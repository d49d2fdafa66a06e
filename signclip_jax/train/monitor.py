"""Pieces of the train loop kept out of train.py: metric files, the progress line, validation."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

log = logging.getLogger("signclip_jax.train")


class MetricWriter:
    """metrics.jsonl (one JSON object per line, always with `step`) plus TensorBoard events."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = "://" in str(workdir)
        self._tb = None
        if enabled:
            try:
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
    import os

    import jax

    path = path if "://" in path else os.path.expanduser(path)
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
            f"ETA {_duration(remaining)}"
        )
        metrics_skipped = metrics.get("data_skipped")
        if metrics_skipped:
            line += f" skipped {int(metrics_skipped)}"
        end = "\r" if self._tty and step < self.total else "\n"
        print(line.ljust(100), end=end, file=self.stream, flush=True)

    def note(self, step: int, values: Mapping[str, float]) -> None:
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        print(f"\nvalidation at step {step}: {shown}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


MODEL_INPUTS = ("pose", "pose_mask", "text_ids", "text_mask")


def model_inputs(batch: dict) -> dict:
    """The arrays the model reads. With several processes, each process's length bucket
    may differ: pad all to the longest so the global array has one frame length."""
    import jax

    batch = {k: batch[k] for k in MODEL_INPUTS}
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        from signclip_jax.data import pipeline

        length = batch["pose"].shape[1]
        longest = int(np.asarray(multihost_utils.process_allgather(np.int32(length))).max())
        if longest != length:
            batch = pipeline.pad_to_length(batch, longest)
    return batch


def validate(
    embed_fn: Callable,
    params: Any,
    source,
    data_cfg,
    *,
    tokenizer,
    loss_name: str,
    batch_size: int,
    mesh,
    batch_axes: tuple[str, ...],
) -> dict[str, float]:
    """Embeds the whole validation split; returns the loss and retrieval metrics.

    loss: mean over consecutive chunks of `batch_size` of the training loss (as fairseq's
    validation: mean of per-batch losses); retrieval: both directions on the whole split with
    the original definitions (signclip_jax.metrics). data_cfg: config.data, or the whole
    config (then data.pose_dtype "auto" follows model.dtype, as in training).
    """
    import jax

    from signclip_jax.data import pipeline
    from signclip_jax.evaluation.evaluate import evaluate_retrieval
    from signclip_jax.train import losses, sharding

    pose_parts, text_parts, texts = [], [], []
    for batch in pipeline.make_eval_batches(
        source,
        data_cfg,
        tokenizer=tokenizer,
        batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        valid = np.asarray(batch["valid"])
        arrays = model_inputs(batch)
        pose_emb, text_emb = embed_fn(params, sharding.shard_batch(arrays, mesh, batch_axes))
        pose_emb, text_emb = np.asarray(pose_emb), np.asarray(text_emb)
        # Rows of this process come back in the global array in process order; keep the valid.
        valid_all = _gather_valid(valid)
        pose_parts.append(pose_emb[valid_all])
        text_parts.append(text_emb[valid_all])
        texts.extend(t for t, v in zip(_gather_texts(batch["prompt"]), valid_all) if v)
    if not pose_parts:
        return {}
    pose_all = np.concatenate(pose_parts)
    text_all = np.concatenate(text_parts)
    chunk_losses = []
    for start in range(0, len(pose_all), batch_size):
        pe, te = pose_all[start : start + batch_size], text_all[start : start + batch_size]
        if len(pe) > 1:
            chunk_losses.append(float(losses.reference_loss(loss_name, pe, te, params["loss"])))
    out = {"loss": float(np.mean(chunk_losses)) if chunk_losses else float("nan")}
    # Block-wise scores (no [N, N] matrix), the same numbers `evaluate` reports.
    out.update(evaluate_retrieval(pose_all, text_all, texts, standard=False))
    return out


def _gather_valid(valid: np.ndarray) -> np.ndarray:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return valid
    return np.asarray(multihost_utils.process_allgather(valid, tiled=True))


def _gather_texts(prompts) -> list[str]:
    """Every process's prompts of this batch, in process order (the global batch's rows)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [str(p) for p in prompts]
    # Strings cannot be all-gathered directly: gather UTF-8 bytes padded to a common length.
    encoded = [str(p).encode() for p in prompts]
    width = int(
        multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=1))).max()
    )
    buf = np.zeros((len(encoded), width), np.uint8)
    for i, e in enumerate(encoded):
        buf[i, : len(e)] = np.frombuffer(e, np.uint8)
    allbuf = np.asarray(multihost_utils.process_allgather(buf, tiled=True))
    return [bytes(row).rstrip(b"\0").decode() for row in allbuf]
