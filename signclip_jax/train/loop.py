r"""Trains SignCLIP: `python -m signclip_jax.train --config=configs/demo.py --workdir=DIR`.

Read top to bottom, one banner per part: set up -> mesh -> model source -> data -> model and
optimiser -> shard and step -> restore -> evaluators -> the loop (log, evaluate, checkpoint).
The update itself (GradCache, the loss in shard_map, the optimiser) is train/step.py. The
evaluation runs the evaluators of `config.evals` (evaluation/evaluators.py: the classes
`python -m signclip_jax.evaluate` runs, so both give the same numbers), fed by this run's
sharded embedding functions (`_embeddings`, at the end of this file). Resumes automatically
from DIR; the result does not depend on where it stopped, nor on the device or process count.

Writes into DIR: config.json (resolved config), model_config.json, bert_config.json and
tokenizer/ (what later commands need to rebuild the model offline), metrics.jsonl (one JSON
object per line: "split" train, or an evaluator's name such as val), TensorBoard events
under tb/, checkpoints/STEP/ (Orbax).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import logging as absl_logging
from flax import nnx
from jax.experimental import multihost_utils

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax import files
from signclip_jax import run as run_lib
from signclip_jax.data import augment_device, pipeline, sources, text
from signclip_jax.errors import UserError
from signclip_jax.evaluation import evaluators, retrieval
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import distributed, preemption, sharding
from signclip_jax.train import step as train_step_lib
from signclip_jax.train.monitor import MetricWriter, Progress, enable_compilation_cache

log = logging.getLogger("signclip_jax.train")


def train(
    config,
    workdir: str,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics.

    `coordinator`, `num_processes`, `process_id`: a multi-process run's set-up when the
    environment does not give it (train/distributed.py).
    """
    # Before anything touches a JAX backend: multi-process set-up when the environment says so.
    distributed.initialize(coordinator, num_processes, process_id)
    # Process 0 owns the workdir; the other hosts of a multi-process run share it.
    lock = preemption.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, workdir)


def _train(config, workdir: str) -> dict[str, Any]:
    #### Set up: random keys that shard, the compilation cache, the workdir, resolved config.
    jax.config.update("jax_threefry_partitionable", True)
    enable_compilation_cache(config.get("compilation_cache_dir"))
    profiler = _StepProfiler(config.get("profile_steps", ""), str(workdir))  # bad value: fail now
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    log.setLevel(logging.INFO)
    workdir = str(workdir)
    local_workdir = not files.is_remote(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        if local_workdir:
            os.makedirs(workdir, exist_ok=True)
        run_lib.save_config(workdir, config)

    #### Mesh: the batch shards over the data and FSDP axes (never over a model axis).
    mesh = sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))
    batch_axes = tuple(a for a in config.mesh.axes if a in ("data", "fsdp"))
    n_procs = jax.process_count()
    shards = sharding.num_batch_shards(mesh, batch_axes)
    if config.batch_size % n_procs or config.batch_size % (shards * config.microbatches):
        raise UserError(
            f"batch_size {config.batch_size} must divide evenly over {n_procs} processes and "
            f"{shards} batch shards x {config.microbatches} microbatches"
        )
    local_batch = config.batch_size // n_procs

    #### Model source (run.py, the one factory): a fresh model from config.model, or the
    # architecture, tokenizer and weights of the run named by init_from (fine-tuning).
    model_source = run_lib.source_from_config(config)

    #### Data.
    tokenizer = model_source.tokenizer
    train_source = sources.make_source(config.data, split="train", workdir=workdir)
    val_source = sources.make_source(config.data, split="val", workdir=workdir)
    steps_per_epoch = max(len(train_source) // config.batch_size, 1)  # drop_remainder batches
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    train_iter = pipeline.make_train_iterator(
        train_source,
        config,  # the whole config: data.pose_dtype "auto" follows model.dtype
        tokenizer=tokenizer,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=n_procs,
        batch_size_per_process=local_batch,
    )
    log.info(
        "train examples %d, val examples %d, %d steps (%d per epoch)",
        len(train_source),
        len(val_source),
        total_steps,
        steps_per_epoch,
    )

    #### Model and optimiser.
    mcfg = model_source.model_config
    model = signclip_model.SignCLIP(mcfg, rngs=nnx.Rngs(config.seed, dropout=config.seed + 1))
    if is_main:
        run_lib.save_model_files(workdir, mcfg, tokenizer)

    #### Shard and step: parameters and optimiser state by the rules in sharding.py, one
    # jitted update and the eval-mode forwards (train/step.py).
    # data.augment_on_device: the step augments the batch (data/augment_device.py).
    fns = train_step_lib.make_train_step(
        config, model, mesh, batch_axes, total_steps, augment=augment_device.from_config(config)
    )
    state, param_sharding, train_step = fns.state, fns.param_sharding, fns.step

    #### Restore: resume from the workdir, else init_from, else the pretrained BERT.
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    # The newest step that restores; a damaged one is moved aside with a warning.
    resumed = ckpt.restore_latest(
        abstract_params=ckpt_lib.abstract_like(state["params"]),
        abstract_train_state=ckpt_lib.abstract_like({"opt": state["opt"], "step": state["step"]}),
        data_iterator=train_iter,
    )
    if resumed is not None:
        start, params, train_state, _ = resumed
        state = {"params": params, "opt": train_state["opt"], "step": train_state["step"]}
        log.info("resumed from step %d", start)
    else:
        start = 0
        if model_source.step_dir is not None:
            state["params"] = run_lib.init_params_from(model_source, state["params"], config, mesh)
            log.info("initialised from %s", model_source.step_dir)
        elif config.model.pretrained:
            text_model = text.resolve_text_model(config.model.text_model)
            report = signclip_model.init_from_pretrained(model, text_model)
            log.info("initialised both towers from %s: %s", config.model.text_model, report)
            pretrained = nnx.state(model, nnx.Param)
            state["params"]["model"] = jax.device_put(pretrained, param_sharding["model"])

    #### Evaluators: config.evals (default: `val`, the validation loss and retrieval on the
    # val split), each with its cadence. They embed through `_embeddings` (below).
    evals = evaluators.from_config(config, tokenizer=tokenizer)
    eval_sources = {"val": val_source}  # split -> source, each read from disk once

    #### The loop: log, evaluate, checkpoint; SIGTERM/SIGINT -> save and exit. The host
    # stays ahead of the device: the next batch goes to the device while a step runs, and
    # nothing reads a step's results back except on log steps (and, with several processes,
    # the agreement of the step before, once the next one is queued: `_Inputs`).
    writer = MetricWriter(workdir, enabled=is_main)
    progress = Progress(total_steps, config.batch_size, start_step=start)
    last: dict[str, Any] = {}
    step = start
    # data.packing: the host sends each batch's clips with the slots of packed rows, and the
    # step packs them after augmenting (train/step.py, InputLayout).
    layout = train_step_lib.InputLayout.from_config(config, mcfg.max_frames, shards // n_procs)
    inputs = _Inputs(
        train_iter,
        lambda batch: sharding.shard_batch(batch, mesh, batch_axes),
        first=start + 1,
        last=total_steps,
        process_count=n_procs,
        layout=layout,
    )
    with preemption.PreemptionGuard() as guard:
        while step < total_steps:
            signal_name = guard.requested  # polled once per step
            batch = inputs.batch(step + 1, stop_requested=signal_name is not None)
            profiler.before_step(step + 1)
            state, metrics = train_step(state, batch)
            step += 1
            profiler.after_step(step, state)
            # With several processes: what all of them agreed on, a step later (`_Inputs`).
            stop = inputs.after_step(step, metrics, stop_requested=signal_name is not None)
            fed = inputs.consumed  # the iterator as of this step's batch (it runs ahead)

            # Log: the step's metrics and the input pipeline's bad-example counters.
            if step % config.log_every_steps == 0 or step == total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(fed.stats)
                last["epoch"] = step / steps_per_epoch
                writer.write(step, last, prefix="train")
                if is_main:
                    progress.update(step, last)

            # Evaluate: every evaluator due at this step, on the current weights; each split
            # and prompt is embedded once per step, whichever evaluators ask for it.
            eval_metrics: dict[str, Any] = {}
            due = [e for e in evals if e.due(step, total_steps)]
            if due:
                embeddings = _embeddings(
                    fns, state["params"], config, tokenizer, eval_sources, workdir, mesh,
                    batch_axes,
                )  # fmt: skip
                for e in due:
                    values = _scalars(e.evaluator.run(embeddings))
                    writer.write(step, values, prefix=e.name)
                    if is_main:
                        label = "validation" if e.name == "val" else e.name
                        progress.note(step, values, name=label)
                    eval_metrics.update({f"{e.name}/{k}": v for k, v in values.items()})

            # Checkpoint: on cadence, at the end, and when any process was asked to stop. The
            # evaluators' numbers drive the keep-best policy (val/loss by default).
            if stop:
                log.warning(
                    "stop requested (%s): saving step %d", signal_name or "another process", step
                )
            if stop or step % config.checkpoint_every_steps == 0 or step == total_steps:
                ckpt.save(
                    step,
                    params=state["params"],
                    train_state={"opt": state["opt"], "step": state["step"]},
                    data_iterator=_IteratorState(fed.state),
                    meta={"epoch": step / steps_per_epoch, **fed.stats},
                    metrics=eval_metrics or None,
                    force=True,
                )
            if stop:
                break
    profiler.finish(state)  # a run that stopped inside the traced steps
    ckpt.close()
    writer.close()
    if last:
        last["step"] = step
    return last


# ---------------------------------------------------------------------------------------------
# The input side of the loop: ahead of the device, agreed across processes without a host
# collective per step.


@dataclasses.dataclass
class _Fetched:
    """One training batch as the host holds it, with the iterator as of right after it."""

    batch: dict[str, np.ndarray]  # model inputs at this process's own padded length
    state: Any  # the iterator's state after this batch (what a checkpoint at its step saves)
    stats: dict[str, float]  # pipeline.bad_example_stats after this batch
    sizes: tuple[int, ...]  # InputLayout.sizes: what the processes agree on


class _Inputs:
    """Feeds the train step, one batch ahead of the device.

    Batch k+1 is padded, sharded and put on the device right after step k is dispatched, so
    reading, padding and the host-to-device copy overlap step k. The iterator therefore runs
    ahead of the steps: `consumed` keeps its state and counters as of the last dispatched
    step's batch, which is what logs and checkpoints record (a resume replays exactly).

    Several processes must agree on each batch's sizes (InputLayout.sizes: the padded
    length, as each process's length bucket comes from its own rows; with packing also the
    row count and caption length) and on stopping (a signal may reach one process only),
    without a host collective per step: that would make the host wait for the device every
    step. Both ride in the step itself: batch k carries rows AGREE = [stop requested, this
    process's own sizes of batch k+2], and the step returns their maximum over every
    process's rows. That result of step k-1 is read once step k is queued, so the device
    never idles while the host waits; it gives the common sizes of batch k+1, just in time
    to put it on the device, and the stop decision after step k (a signal stops every
    process within two steps). One host all-gather at start-up agrees on the first two
    batches. A single process needs none of this: its own sizes and flag are the agreed ones.
    """

    def __init__(
        self,
        iterator,
        shard: Callable[[dict[str, np.ndarray]], dict[str, Any]],
        *,
        first: int,
        last: int,
        process_count: int,
        allgather_max: Callable[[np.ndarray], np.ndarray] | None = None,
        layout: train_step_lib.InputLayout | None = None,
    ):
        """`first`..`last`: the steps to feed. `shard`: host batch -> device batch
        (sharding.shard_batch). `allgather_max`: [n, k] int32 -> its elementwise maximum over
        all processes (default: multihost_utils.process_allgather; called once, here).
        `layout`: padded (default) or packed inputs."""
        self.iterator, self.shard, self.last = iterator, shard, last
        self.layout = layout or train_step_lib.InputLayout()
        self.multi = process_count > 1
        self.consumed: _Fetched | None = None
        self._host: dict[int, _Fetched] = {}  # fetched, not yet dispatched
        self._sizes: dict[int, tuple[int, ...]] = {}  # agreed sizes per step
        self._device: dict[int, dict[str, Any]] = {}  # on the device, not yet dispatched
        self._pending: Any = None  # metrics[AGREE] of the latest step, read after the next
        if first > last:
            return
        if self.multi:
            ahead = [k for k in (first, first + 1) if k <= last]
            for k in ahead:
                self._fetch(k)
            gather = allgather_max or _allgather_max
            agreed = gather(np.array([self._host[k].sizes for k in ahead], np.int32))
            self._sizes.update((k, tuple(int(n) for n in row)) for k, row in zip(ahead, agreed))
        self._put(first)

    def batch(self, step: int, *, stop_requested: bool = False) -> dict[str, Any]:
        """The device batch of `step` (put there while the step before ran)."""
        device = self._device.pop(step)
        self.consumed = self._host.pop(step)
        if self.multi:
            # This process's say on later steps: its stop flag, its sizes of batch step+2.
            ahead = step + 2
            sizes = self._fetch(ahead).sizes if ahead <= self.last else self.layout.no_sizes()
            rows = len(self.consumed.batch["pose"])
            agree = np.tile(np.array([int(stop_requested), *sizes], np.int32), (rows, 1))
            device = {**device, **self.shard({train_step_lib.AGREE: agree})}
        return device

    def after_step(self, step: int, metrics: dict[str, Any], *, stop_requested: bool) -> bool:
        """Call right after dispatching `step`: reads the step before's agreement, puts the
        next batch on the device, and says whether to stop after `step` (the same answer on
        every process). Takes metrics[AGREE] out of `metrics`."""
        stop = stop_requested
        if self.multi:
            agreed, self._pending = self._pending, metrics.pop(train_step_lib.AGREE)
            stop = False
            if agreed is not None:  # step-1's: the flags at its dispatch, batch step+1's sizes
                flag, *sizes = (int(v) for v in np.asarray(agreed))
                stop = bool(flag)
                if step + 1 <= self.last:
                    self._sizes[step + 1] = tuple(sizes)
        if not stop and step + 1 <= self.last:
            self._put(step + 1)
        return stop

    def _fetch(self, step: int) -> _Fetched:
        if step not in self._host:
            batch = next(self.iterator)
            inputs = {k: batch[k] for k in train_step_lib.input_keys(batch)}
            self._host[step] = _Fetched(
                inputs,
                copy.deepcopy(self.iterator.get_state()),
                pipeline.bad_example_stats(self.iterator),
                self.layout.sizes(inputs),
            )
        return self._host[step]

    def _put(self, step: int) -> None:
        fetched = self._fetch(step)
        sizes = self._sizes.pop(step, fetched.sizes)
        self._device[step] = self.shard(self.layout.inputs(fetched.batch, sizes))


def _allgather_max(values: np.ndarray) -> np.ndarray:
    """Elementwise maximum of `values` [n] over all processes (a blocking host collective)."""
    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


class _IteratorState(grain.DatasetIterator):
    """A recorded iterator state for the checkpoint's grain handler, which only calls
    `get_state`: the train iterator itself is ahead of the step being saved."""

    def __init__(self, state: Any):
        super().__init__()
        self._state = state

    def __next__(self):
        raise TypeError("a recorded iterator state yields nothing")

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        self._state = state


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """An evaluator's numbers, flat: nested groups joined with "/" (zero-shot's by_language,
    few-shot's shots), text left out (metrics.jsonl rows, TensorBoard, checkpoint metrics)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.number)):
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# config.profile_steps: a JAX profiler trace of some training steps.


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """`START:STOP` -> (START, STOP), the steps START..STOP-1; `N` -> (N, N+1); "" -> None."""
    spec = str(spec or "").strip()
    if not spec:
        return None
    start, sep, stop = spec.partition(":")
    try:
        first = int(start)
        end = int(stop) if sep else first + 1
    except ValueError:
        first = end = 0
    if not 1 <= first < end:
        raise UserError(
            f"profile_steps={spec!r}: expected START:STOP with 1 <= START < STOP, e.g. '100:103' "
            "(steps 100, 101 and 102), or one step number"
        )
    return first, end


class _StepProfiler:
    """Traces training steps START..STOP-1 (config.profile_steps) with the JAX profiler into
    WORKDIR/profile/ (plugins/profile/RUN/HOST.xplane.pb and .trace.json.gz: TensorBoard's
    profile tab, `tensorboard --logdir=WORKDIR`). Each step is a StepTraceAnnotation "train"
    with its step number. The trace goes to a local folder first and is copied into the
    workdir when it stops (after the last traced step has run on the device), so a gs://
    workdir needs nothing of the profiler. A resumed run traces what is left of the range."""

    def __init__(self, spec: str, workdir: str):
        self.steps = parse_profile_steps(spec)
        self.workdir = workdir
        self._local: str | None = None  # the trace being written
        self._annotation = None

    def before_step(self, step: int) -> None:
        """Call right before dispatching `step`."""
        if self.steps is None:
            return
        first, end = self.steps
        if self._local is None and first <= step < end:
            self._local = tempfile.mkdtemp(prefix="signclip-profile-")
            # Without Python function calls: on by default, they would fill the trace (a
            # million events per step of this loop) and slow the steps being measured.
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(self._local, profiler_options=options)
            log.info("profiling steps %d-%d", step, end - 1)
        if self._local is not None:
            self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self._annotation.__enter__()

    def after_step(self, step: int, state: Any) -> None:
        """Call right after dispatching `step`; stops after the range's last step."""
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None
        if self._local is not None and step >= self.steps[1] - 1:
            self.finish(state)

    def finish(self, state: Any = None) -> None:
        """Waits for the traced steps to run, stops the trace, copies it into the workdir."""
        if self._local is None:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        local, self._local, self.steps = self._local, None, None  # once per run
        target = files.as_path(self.workdir) / "profile"
        try:
            for root, _, names in os.walk(local):
                for name in names:
                    rel = os.path.relpath(os.path.join(root, name), local)
                    dest = target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with open(os.path.join(root, name), "rb") as f:
                        files.write_bytes_atomic(dest, f.read())
        finally:
            shutil.rmtree(local, ignore_errors=True)
        log.info("profile written to %s (tensorboard --logdir=%s)", target, self.workdir)


# ---------------------------------------------------------------------------------------------
# Evaluation: the embedding functions the evaluators call during training.


def _embeddings(
    fns: train_step_lib.TrainStep,
    params: Any,
    config,
    tokenizer,
    split_sources: dict[str, Any],
    workdir: str,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...],
) -> evaluators.Embeddings:
    """The model at `params` as the evaluators see it: the sharded jitted eval forwards over
    the mesh (fns.embed, fns.embed_text), run on every process.

    Each process feeds its own rows of a global batch (sharding.shard_batch); the embeddings
    come back whole (replicated) with the rows in process order, and the gathers line each
    row up with its validity, source index and prompt. Batches are config.batch_size rows,
    as training's, so the validation loss averages over training-sized chunks.
    """
    n_procs, me = jax.process_count(), jax.process_index()
    local = config.batch_size // n_procs
    settings = pipeline.settings_from_config(config)

    def source(split: str):
        if split not in split_sources:
            split_sources[split] = sources.make_source(config.data, split=split, workdir=workdir)
        return split_sources[split]

    def embed_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        inputs = sharding.shard_batch(train_step_lib.model_inputs(batch), mesh, batch_axes)
        pose_emb, text_emb = fns.embed(params, inputs)
        valid = _gather_rows(np.asarray(batch["valid"]))
        return {
            "pose": np.asarray(pose_emb)[valid],
            "text": np.asarray(text_emb)[valid],
            "index": _gather_rows(np.asarray(batch["index"]).astype(np.int32))[valid],
            "prompt": [p for p, v in zip(_gather_texts(batch["prompt"]), valid) if v],
        }

    def embed_split(split: str) -> retrieval.SplitEmbeddings:
        return retrieval.embed_split(
            source(split),
            config,  # the whole config: data.pose_dtype "auto" follows model.dtype
            tokenizer=tokenizer,
            embed_batch=embed_batch,
            batch_size=local,
            split=split,
            process_index=me,
            process_count=n_procs,
        )

    def embed_texts(prompts: list[str]) -> np.ndarray:
        # Global batches of config.batch_size prompts (padded with ""): one compiled shape.
        rows, out = config.batch_size, []
        for start in range(0, len(prompts), rows):
            chunk = list(prompts[start : start + rows])
            ids, mask = text.encode_texts(
                tokenizer, chunk + [""] * (rows - len(chunk)), settings.text_max_len
            )
            mine = slice(me * local, (me + 1) * local)  # this process's rows
            inputs = {"text_ids": ids[mine], "text_mask": mask[mine]}
            emb = fns.embed_text(params, sharding.shard_batch(inputs, mesh, batch_axes))
            out.append(np.asarray(emb)[: len(chunk)])
        return np.concatenate(out)

    return evaluators.Embeddings(
        embed_split,
        embed_texts,
        loss_params=params["loss"],
        captions=lambda split: retrieval.split_captions(source(split), settings),
    )


def _gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's `rows` [b, ...] of this batch, concatenated in process order."""
    if jax.process_count() == 1:
        return rows
    return np.asarray(multihost_utils.process_allgather(rows, tiled=True))


def _gather_texts(prompts) -> list[str]:
    """Every process's prompts of this batch, in process order (the global batch's rows)."""
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
