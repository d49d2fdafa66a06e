"""Orbax checkpoints in the workdir: keep-N latest plus the best by validation, async, resumable.

Layout of `WORKDIR/checkpoints/STEP/` (one Orbax step directory):
  params/  the trainable parameters ({"model": ..., "loss": ...}); all that evaluate, embed,
           serve and convert read
  train/   optimizer state, step counter, skipped-step counter
  data/    the grain iterator state of every process (so a resumed run sees the same batches)
  meta/    JSON: step, epoch, bad-example counts, validation metrics

Orbax writes each step into a temporary directory and renames it when complete, so a
killed run never leaves a half-written checkpoint that a later run would pick up.
`workdir` may be a local path or `gs://...` (Orbax/tensorstore handle both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from signclip_jax import files
from signclip_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
_ITEMS = ("params", "train", "data", "meta")


def _best_policy(keep: int, keep_best: int, best_metric: str, best_mode: str):
    policies = [checkpoint_managers.LatestN(keep)]
    if keep_best > 0:
        sign = 1.0 if best_mode == "min" else -1.0
        # BestN keeps the n largest values of get_metric_fn unless reverse=True (then the
        # smallest); we always ask for the smallest of sign * metric.
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=lambda m: sign * float(m[best_metric]),
                reverse=True,
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    return checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
    """Saves and restores training state in `workdir/checkpoints`.

    Args:
      workdir: local path or gs:// URL.
      keep: how many of the latest checkpoints to keep.
      keep_best: how many of the best checkpoints (by `best_metric`) to keep besides those.
      best_metric: key of the metrics dict given to `save` (e.g. "val/loss").
      best_mode: "min" or "max".
      async_save: write in a background thread (training continues meanwhile).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        keep_best: int = 1,
        best_metric: str = "val/loss",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise UserError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = files.as_path(workdir) / CHECKPOINT_DIR
        self.best_metric = best_metric
        self.best_mode = best_mode
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_best_policy(keep, keep_best, best_metric, best_mode),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric`, or None if no step has that metric."""
        best = None
        for step in self._manager.all_steps():
            value = (self.read_meta(step).get("metrics") or {}).get(self.best_metric)
            if value is None:
                continue
            better = best is None or (
                value < best[1] if self.best_mode == "min" else value > best[1]
            )
            if better:
                best = (step, value)
        return None if best is None else best[0]

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.step_dir(step) / "meta" / "metadata"
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    # -- save / restore ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        train_state: Any,
        data_iterator: Any | None = None,
        meta: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (async) save of one step. Returns whether a save was started.

        `metrics` (e.g. {"val/loss": 1.2}) drive the keep-best policy and are stored in meta.
        `data_iterator` is a grain DatasetIterator; its state is saved per process.
        """
        meta = dict(meta or {})
        meta["step"] = int(step)
        if metrics:
            meta["metrics"] = {k: float(v) for k, v in metrics.items()}
        items = {
            "params": ocp.args.StandardSave(params),
            "train": ocp.args.StandardSave(train_state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(**items),
            metrics=meta.get("metrics") or None,
            force=force,
        )
        return bool(saved)

    def restore(
        self,
        step: int,
        *,
        abstract_params: Any,
        abstract_train_state: Any,
        data_iterator: Any | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores (params, train_state, meta) of `step` into the given abstract trees.

        The abstract trees (jax.ShapeDtypeStruct with shardings) decide placement, so a
        checkpoint restores onto any mesh. If `data_iterator` is given, its state is set too.
        """
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "train": ocp.args.StandardRestore(abstract_train_state),
            "meta": ocp.args.JsonRestore(),
        }
        has_data = (self.step_dir(step) / "data").exists()
        if data_iterator is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored.params, restored.train, dict(restored.meta or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_step_dir(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    which: str = "latest",
) -> epath.Path:
    """The step directory to read for `--workdir` (latest or best) or `--checkpoint=STEP_DIR`."""
    if checkpoint:
        path = files.as_path(checkpoint)
        if not (path / "params").exists():
            raise UserError(f"{path} is not a checkpoint step directory (no params/ inside)")
        return path
    if not workdir:
        raise UserError("give --workdir=DIR or --checkpoint=STEP_DIR")
    directory = files.as_path(workdir) / CHECKPOINT_DIR
    if not directory.exists():
        raise UserError(f"no checkpoints in {workdir} (expected {directory})")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.best_step() if which == "best" else None
        if step is None:
            step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None:
        raise UserError(f"no complete checkpoint in {directory}")
    return directory / str(step)


def restore_params(step_dir: str | os.PathLike, abstract_params: Any) -> Any:
    """Reads only the parameters of one step directory (evaluate, embed, serve, convert)."""
    path = files.as_path(step_dir) / "params"
    if not path.exists():
        raise UserError(f"{step_dir} has no params/ checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract_params)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
