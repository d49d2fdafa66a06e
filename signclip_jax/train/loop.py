r"""Trains SignCLIP: `python -m signclip_jax.train --config=configs/demo.py --workdir=DIR`.

Read top to bottom: set up -> mesh -> data -> model and optimiser -> shard -> train step ->
restore -> loop (log, validate, checkpoint). Resumes automatically from DIR.

Writes into DIR: config.json (resolved config), bert_config.json and tokenizer/ (what later
commands need to rebuild the model offline), metrics.jsonl (one JSON object per line),
TensorBoard events under tb/, checkpoints/STEP/ (Orbax).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from absl import logging as absl_logging

from signclip_jax import files

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
    from signclip_jax.train import distributed

    distributed.initialize(coordinator, num_processes, process_id)

    import contextlib

    import jax

    from signclip_jax import checkpoint as ckpt_lib

    # Process 0 owns the workdir; the other hosts of a multi-process run share it.
    lock = ckpt_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, workdir)


def _train(config, workdir: str) -> dict[str, Any]:
    import jax
    from etils import epath
    from flax import nnx

    from signclip_jax import checkpoint as ckpt_lib
    from signclip_jax import run as run_lib
    from signclip_jax.data import pipeline, sources, text
    from signclip_jax.errors import UserError
    from signclip_jax.model import signclip as signclip_model
    from signclip_jax.train import sharding
    from signclip_jax.train import step as train_step_lib
    from signclip_jax.train.monitor import (
        MetricWriter,
        Progress,
        enable_compilation_cache,
        model_inputs,
        validate,
    )

    jax.config.update("jax_threefry_partitionable", True)
    enable_compilation_cache(config.get("compilation_cache_dir"))

    #### Set up: workdir, resolved config.
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    log.setLevel(logging.INFO)
    workdir = str(workdir)
    local_workdir = "://" not in workdir
    is_main = jax.process_index() == 0
    if is_main:
        if local_workdir:
            os.makedirs(workdir, exist_ok=True)
        config_json = json.loads(config.to_json_best_effort())
        files.write_json_atomic(epath.Path(workdir) / "config.json", config_json, sort_keys=True)

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

    #### Fine-tuning: the architecture and tokenizer come from the run named by init_from.
    init_dir = init_step_dir = None
    if config.init_from:
        init_dir, init_step_dir = run_lib.resolve_run_dir(config.init_from)

    #### Data.
    if init_dir is not None:
        tokenizer = run_lib.load_tokenizer_for(init_dir, config)
    else:
        tokenizer = text.load_tokenizer(text.resolve_text_model(config.model.text_model))
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
    if init_dir is not None:
        mcfg = _finetune_model_config(config, init_dir)
    else:
        mcfg = signclip_model.model_config(config, tokenizer=tokenizer)
    model = signclip_model.SignCLIP(mcfg, rngs=nnx.Rngs(config.seed, dropout=config.seed + 1))
    if is_main:
        run_dir = epath.Path(workdir)
        for name, obj in (("model_config.json", model.config_dict()),
                          ("bert_config.json", model.bert_config_dict())):  # fmt: skip
            files.write_json_atomic(run_dir / name, obj, sort_keys=True)
        run_lib.save_tokenizer(tokenizer, run_dir)

    #### Shard and step: parameters and optimiser state by the rules in sharding.py, one
    # jitted update (train_step.py).
    fns = train_step_lib.make_train_step(config, model, mesh, batch_axes, total_steps)
    state, param_sharding = fns.state, fns.param_sharding
    train_step, embed_eval = fns.step, fns.embed

    #### Restore: resume from the workdir, else init_from, else the pretrained BERT.
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        params, train_state, _ = ckpt.restore(
            start,
            abstract_params=ckpt_lib.abstract_like(state["params"]),
            abstract_train_state=ckpt_lib.abstract_like(
                {"opt": state["opt"], "step": state["step"]}
            ),
            data_iterator=train_iter,
        )
        state = {"params": params, "opt": train_state["opt"], "step": train_state["step"]}
        log.info("resumed from step %d", start)
    else:
        start = 0
        if init_step_dir is not None:
            state["params"] = _restore_init(init_dir, init_step_dir, state["params"], config, mesh)
            log.info("initialised from %s", init_step_dir)
        elif config.model.pretrained:
            text_model = text.resolve_text_model(config.model.text_model)
            report = signclip_model.init_from_pretrained(model, text_model)
            log.info("initialised both towers from %s: %s", config.model.text_model, report)
            pretrained = nnx.state(model, nnx.Param)
            state["params"]["model"] = jax.device_put(pretrained, param_sharding["model"])

    #### Train loop: log, validate, checkpoint; SIGTERM/SIGINT -> save and exit.
    writer = MetricWriter(workdir, enabled=is_main)
    progress = Progress(total_steps, config.batch_size, start_step=start)
    last: dict[str, Any] = {}
    step = start
    with ckpt_lib.PreemptionGuard() as guard:
        while step < total_steps:
            batch = sharding.shard_batch(model_inputs(next(train_iter)), mesh, batch_axes)
            state, metrics = train_step(state, batch)
            step += 1
            if step % config.log_every_steps == 0 or step == total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(pipeline.bad_example_stats(train_iter))
                last["epoch"] = step / steps_per_epoch
                writer.write(step, last, prefix="train")
                if is_main:
                    progress.update(step, last)
            val_metrics = None
            if step % config.eval_every_steps == 0 or step == total_steps:
                val_metrics = validate(
                    embed_eval,
                    state["params"],
                    val_source,
                    config,
                    tokenizer=tokenizer,
                    loss_name=config.loss.name,
                    batch_size=config.batch_size,
                    mesh=mesh,
                    batch_axes=batch_axes,
                )
                writer.write(step, val_metrics, prefix="val")
                if is_main:
                    progress.note(step, val_metrics)
            signal_name = guard.requested
            stop = _agree(signal_name is not None)
            if stop:
                log.warning("stop requested (%s): saving step %d", signal_name, step)
            if stop or step % config.checkpoint_every_steps == 0 or step == total_steps:
                ckpt.save(
                    step,
                    params=state["params"],
                    train_state={"opt": state["opt"], "step": state["step"]},
                    data_iterator=train_iter,
                    meta={
                        "epoch": step / steps_per_epoch,
                        **pipeline.bad_example_stats(train_iter),
                    },
                    metrics={f"val/{k}": v for k, v in (val_metrics or {}).items()} or None,
                    force=True,
                )
            if stop:
                break
    ckpt.close()
    writer.close()
    if last:
        last["step"] = step
    return last


def _finetune_model_config(config, init_dir):
    """The init_from run's architecture (model_config.json) with this config's compute
    settings (dtype, remat, attention, dropout). The data must fit its max_frames."""
    from signclip_jax import run as run_lib
    from signclip_jax.errors import UserError

    m = config.model
    mcfg = run_lib.read_model_config(
        init_dir, dtype=m.dtype, remat=m.remat, attention=m.attention
    )
    dropout = {
        "hidden_dropout_prob": m.get("hidden_dropout"),
        "attention_probs_dropout_prob": m.get("attention_dropout"),
    }
    dropout = {k: float(v) for k, v in dropout.items() if v is not None}
    if dropout:
        import dataclasses

        mcfg = dataclasses.replace(mcfg, bert=mcfg.bert.replace(**dropout))
    if config.data.max_frames > mcfg.max_frames:
        raise UserError(
            f"data.max_frames={config.data.max_frames} exceeds the max_frames={mcfg.max_frames} "
            f"of the model in {init_dir} (init_from)"
        )
    if m.projection != mcfg.projection or m.video_layers != mcfg.video_layers:
        log.warning(
            "init_from %s: using its architecture (projection=%s, video_layers=%d) instead of "
            "model.projection=%s, model.video_layers=%d",
            init_dir, mcfg.projection, mcfg.video_layers, m.projection, m.video_layers,
        )  # fmt: skip
    return mcfg


def _restore_init(init_dir, step_dir, params, config, mesh):
    """params with the model part restored from `step_dir`; the loss scalars too when the
    source run used the same loss, else they keep their fresh init."""
    import jax

    from signclip_jax import checkpoint as ckpt_lib
    from signclip_jax import run as run_lib
    from signclip_jax.train import losses, sharding

    source = run_lib.read_json(init_dir / run_lib.CONFIG_FILE)
    source_loss = (source.get("loss") or {}).get("name", "signclip")
    loss_params = losses.init_loss_params(source_loss, source.get("loss") or {})
    abstract = {
        "model": ckpt_lib.abstract_like(params["model"]),
        "loss": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
            loss_params,
        ),
    }
    restored = ckpt_lib.restore_params(step_dir, abstract)
    keep_loss = source_loss == config.loss.name
    if not keep_loss:
        log.info("init_from used loss %r: %r starts from its own init", source_loss,
                 config.loss.name)  # fmt: skip
    return {"model": restored["model"], "loss": restored["loss"] if keep_loss else params["loss"]}


def _agree(flag: bool) -> bool:
    """True on every process if it is True on any (a preempted worker stops them all)."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())
