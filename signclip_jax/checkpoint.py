"""Orbax checkpoints in the workdir: keep-N latest plus the best by validation, async, resumable.

Layout of `WORKDIR/checkpoints/STEP/` (one Orbax step directory):
  params/  the trainable parameters ({"model": ..., "loss": ...}); all that evaluate, embed,
           serve and convert read
  train/   optimizer state, step counter, skipped-step counter
  data/    the grain iterator state of every process (so a resumed run sees the same batches)
  meta/    JSON: step, epoch, bad-example counts, validation metrics

Orbax writes each step into a temporary directory and renames it when complete, so a
killed run never leaves a half-written checkpoint that a later run would pick up. A step
damaged afterwards (a truncated or missing file, a corrupt manifest) fails its read: restoring
it raises DamagedCheckpoint, one line naming the step, what is wrong and the newest other step
that restores; `train` resumes from that step instead (`Checkpointer.restore_latest`).
`workdir` may be a local path or `gs://...` (Orbax/tensorstore handle both).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from signclip_jax import files
from signclip_jax.errors import UserError

log = logging.getLogger("signclip_jax.checkpoint")

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"  # where train moves damaged steps aside (beside checkpoints/)
_ITEMS = ("params", "train", "data", "meta")


class DamagedCheckpoint(UserError):
    """A step directory whose files cannot be read back (truncated, missing, corrupt)."""


# ------------------------------------------------------------------------- damaged checkpoints
_NEVER_AWAITED = r"coroutine '.*' was never awaited"


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _drop_closed_loop_callbacks() -> None:
    """Installs (once) an unraisable hook that drops only "Event loop is closed": tensorstore
    reads still in flight when a failed Orbax restore closed its event loop complete later, in
    tensorstore's threads, and their callbacks can no longer reach the loop. Everything else
    goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_signclip_drops_closed_loop", False):
        return

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._signclip_drops_closed_loop = True
    sys.unraisablehook = hook
    # The same reads' coroutines, finalised after the error was handled: "never awaited".
    warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)


@contextlib.contextmanager
def _quiet_async() -> Iterator[None]:
    """Silences what a failed Orbax read leaves behind: its pending read coroutines, when
    finalised, report "Task was destroyed", "Event loop is closed" or shutdown ImportErrors
    through the asyncio logger and sys.unraisablehook. They carry no news beyond the error
    that is reported, so they are dropped while the failure is handled (gc inside)."""
    drop = _DropAll()
    asyncio_log = logging.getLogger("asyncio")
    hook = sys.unraisablehook
    asyncio_log.addFilter(drop)
    sys.unraisablehook = lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)
            try:
                yield
            finally:
                gc.collect()  # finalise the failed read's coroutines now, not at exit
    finally:
        sys.unraisablehook = hook
        asyncio_log.removeFilter(drop)


def _read_error(e: BaseException) -> str:
    """One line: the innermost cause of a failed read (tensorstore's message), shortened."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# tensorstore's status codes for files that are cut short, missing or do not decode
_STORAGE_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def _attempt(
    read: Callable[[], Any], is_mismatch: Callable[[], bool] = lambda: False
) -> tuple[Any, str | None]:
    """(read(), None), or (None, one-line error) when the read fails, quietly. A failure for
    which `is_mismatch()` holds (another architecture, not damage) propagates as it is."""
    with _quiet_async():
        try:
            return read(), None
        except Exception as e:  # any failure to read: damage unless the shapes differ
            problem = _read_error(e)
            if not problem.startswith(_STORAGE_ERRORS) and is_mismatch():
                raise
        # `e` is gone here, so _quiet_async's gc finalises the failed read's coroutines
    _drop_closed_loop_callbacks()
    return None, problem


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _matches_metadata(item_dir: epath.Path, abstract: Any) -> bool:
    """Whether `item_dir`'s recorded tree (its _METADATA) has the shapes of `abstract`; False
    when it has other shapes (a real architecture mismatch), True when it matches or cannot be
    read (then the damage is in the metadata itself)."""
    drop, absl_log = _DropAll(), logging.getLogger("absl")
    absl_log.addFilter(drop)  # "Metadata file does not exist" (params/ has none of its own)
    try:
        with _quiet_async(), ocp.StandardCheckpointer() as checkpointer:
            recorded = checkpointer.metadata(item_dir).item_metadata
    except Exception:  # unreadable metadata is damage, not a mismatch
        return True
    finally:
        absl_log.removeFilter(drop)
    shapes = _shapes(recorded)  # none when the arrays' own metadata does not read back
    return not shapes or shapes == _shapes(abstract)


def _other_steps(step_dir: epath.Path) -> list[epath.Path]:
    """The other finished step directories beside `step_dir`, newest first."""
    parent = step_dir.parent
    if not parent.exists():
        return []
    steps = [p for p in parent.iterdir() if p.name.isdigit() and p.name != step_dir.name]
    steps = [p for p in steps if (p / "params").exists()]
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def _read_params(step_dir: epath.Path, abstract_params: Any) -> Any:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(step_dir / "params", abstract_params)


def newest_intact_step(step_dir: str | os.PathLike, abstract_params: Any) -> epath.Path | None:
    """The newest step directory beside `step_dir` (not itself) whose parameters restore into
    `abstract_params`, or None. Reads each candidate in full: only for the error path."""
    for other in _other_steps(files.as_path(step_dir)):
        _, problem = _attempt(lambda other=other: _read_params(other, abstract_params))
        if problem is None:
            return other
    return None


def damaged_error(
    step_dir: str | os.PathLike, problem: str, abstract_params: Any
) -> DamagedCheckpoint:
    """The one-line error for a step that does not read back, naming the intact alternative."""
    step_dir = files.as_path(step_dir)
    intact = newest_intact_step(step_dir, abstract_params)
    if intact is not None:
        advice = f"the newest intact step is {intact}: pass --checkpoint={intact}"
    else:
        advice = f"no other step in {step_dir.parent} restores"
    return DamagedCheckpoint(
        f"{step_dir}: damaged checkpoint, cannot be read ({problem}); {advice}"
    )


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
        step_dir = self.step_dir(step)
        if data_iterator is not None and (step_dir / "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored, problem = _attempt(
            lambda: self._manager.restore(int(step), args=ocp.args.Composite(**items)),
            # another model or optimiser keeps Orbax's own error
            lambda: (
                not (
                    _matches_metadata(step_dir / "params", abstract_params)
                    and _matches_metadata(step_dir / "train", abstract_train_state)
                )
            ),
        )
        if problem is not None:
            raise damaged_error(step_dir, problem, abstract_params)
        return restored.params, restored.train, dict(restored.meta or {})

    def restore_latest(
        self,
        *,
        abstract_params: Any,
        abstract_train_state: Any,
        data_iterator: Any | None = None,
    ) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, params, train_state, meta) of the newest step that restores, or None when
        there is no step. A damaged newer step is logged, moved aside to
        WORKDIR/checkpoints.damaged/STEP (so this run can save that step again) and skipped;
        raises DamagedCheckpoint when no step restores."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                params, train_state, meta = self.restore(
                    step,
                    abstract_params=abstract_params,
                    abstract_train_state=abstract_train_state,
                    data_iterator=data_iterator,
                )
            except DamagedCheckpoint as e:
                log.warning("%s", e)
                damaged.append(step)
                continue
            for bad in damaged:
                aside = self._move_aside(bad)
                log.warning(
                    "checkpoint step %d is damaged: resuming from step %d instead (step %d "
                    "moved to %s)", bad, step, bad, aside,
                )  # fmt: skip
            return step, params, train_state, meta
        if damaged:
            raise DamagedCheckpoint(
                f"{self.directory}: no checkpoint step restores (damaged: "
                f"{', '.join(map(str, damaged))}); move {self.directory} away to start afresh"
            )
        return None

    def _move_aside(self, step: int) -> epath.Path:
        """Moves a damaged step out of checkpoints/ (kept for inspection, never read again)."""
        target = self.directory.parent / DAMAGED_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.rmtree()
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"signclip_move_damaged_{step}")
        self._manager.reload()
        return target

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
    """Reads only the parameters of one step directory (evaluate, embed, serve, convert).

    A step that does not read back raises DamagedCheckpoint (one line, naming the newest
    other step that restores); parameters of another shape raise Orbax's own error."""
    path = files.as_path(step_dir) / "params"
    if not path.exists():
        raise UserError(f"{step_dir} has no params/ checkpoint")
    step_dir = files.as_path(step_dir)
    # A real mismatch propagates: run.py turns it into "does not match model_config.json".
    params, problem = _attempt(
        lambda: _read_params(step_dir, abstract_params),
        lambda: not _matches_metadata(path, abstract_params),
    )
    if problem is not None:
        raise damaged_error(step_dir, problem, abstract_params)
    return params


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
