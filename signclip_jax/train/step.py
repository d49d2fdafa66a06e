"""The update: parameters and optimiser state laid out by the sharding rules, one jitted
train step (GradCache accumulation -> loss in shard_map -> fairseq Adam), and the jitted
eval-mode forwards the evaluators embed with. Used by train/loop.py and by `bench train`.

state = {"params": {"model": nnx.State, "loss": {...}}, "opt": optax state, "step": int32}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from signclip_jax.data import clip_packing, pipeline
from signclip_jax.errors import UserError
from signclip_jax.model import partition
from signclip_jax.train import grad_cache, losses, optim, sharding

MODEL_INPUTS = ("pose", "pose_mask", "text_ids", "text_mask")

# Batch key of the rows [B, k] int32 that multi-process training adds to agree on stopping and
# on padded lengths without a host collective: the step returns their column-wise maximum as
# metrics[AGREE] [k] (replicated). See train/loop.py, `_Inputs`.
AGREE = "agree"


def input_keys(batch: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The keys of a (padded) pipeline batch the train step reads: the model's inputs and,
    with data.augment_on_device, the step's augmentation inputs (pipeline.device_batch_keys)."""
    return (*MODEL_INPUTS, *(k for k in pipeline.device_batch_keys() if k in batch))


def model_inputs(batch: dict[str, np.ndarray], length: int | None = None) -> dict[str, np.ndarray]:
    """The arrays the model reads from an input-pipeline batch, padded to one frame length.

    Each process's length bucket may differ, and a global array has one frame length.
    `length`: a length all processes agreed on (>= this batch's own), as the train loop
    passes. None: with several processes, all-gather the longest, a blocking host collective
    (evaluation only: the train loop agrees without one). Padding never changes numerics.
    A packed batch (data/clip_packing.py) keeps its own shapes: one process only.
    """
    if clip_packing.is_packed(batch):
        if jax.process_count() > 1 or length is not None:
            raise ValueError("packed batches are not yet agreed over several processes")
        return {k: batch[k] for k in clip_packing.PACKED_INPUTS}
    batch = {k: batch[k] for k in input_keys(batch)}
    if length is None and jax.process_count() > 1:
        length = int(
            np.asarray(multihost_utils.process_allgather(np.int32(batch["pose"].shape[1]))).max()
        )
    if length is not None and length != batch["pose"].shape[1]:
        batch = pipeline.pad_to_length(batch, length)
    return batch


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """How the train loop turns a host batch into the step's inputs (data.packing).

    Padded: the batch's model inputs at one frame length. Packed: the same, with captions cut
    to the batch's longest (rounded up to text_multiple), plus the slots of packed rows
    (data/clip_packing.py, `device_slots`); the step gathers the rows after its augmentation.
    `sizes(batch)` is what every process must agree on (their elementwise maximum): the
    padded frame length, and for packing the row count and the caption length.
    """

    packing: bool = False
    max_frames: int = 0
    row_len: int = 0  # tokens per packed row (>= max_frames + 2)
    row_multiple: int = 1
    text_multiple: int = 8
    shards: int = 1  # this process's batch shards
    microbatches: int = 1

    @classmethod
    def from_config(cls, config, max_frames: int, local_shards: int) -> InputLayout:
        """config.data.packing / packing_row_len (0: max_frames + 2) / packing_row_multiple /
        packing_text_multiple; max_frames: the model's; local_shards: this process's."""
        data = config.data
        if not data.get("packing", False):
            return cls()
        row_len = int(data.get("packing_row_len", 0)) or max_frames + 2
        if row_len < max_frames + 2:
            raise UserError(
                f"data.packing_row_len={row_len} is shorter than one full clip "
                f"(max_frames + 2 = {max_frames + 2})"
            )
        return cls(
            packing=True,
            max_frames=int(max_frames),
            row_len=row_len,
            row_multiple=max(int(data.get("packing_row_multiple", 8)), 1),
            text_multiple=max(int(data.get("packing_text_multiple", 8)), 1),
            shards=int(local_shards),
            microbatches=int(config.microbatches),
        )

    def clip_frames(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Frames per clip [B] as the step will see them, before its frame dropout: the
        resampled count where the host drew one (device augmentation), at most max_frames."""
        frames = clip_packing.frame_counts(batch["pose_mask"])
        if "aug_frames" in batch:
            drawn = np.asarray(batch["aug_frames"]).astype(np.int64)
            frames = np.where(drawn > 0, drawn, frames)
        return np.minimum(frames, self.max_frames)

    def sizes(self, batch: dict[str, np.ndarray]) -> tuple[int, ...]:
        """(frames,) padded; (frames, rows, caption tokens) packed."""
        length = int(batch["pose"].shape[1])
        if not self.packing:
            return (length,)
        rows = clip_packing.rows_needed(
            self.clip_frames(batch), row_len=self.row_len, max_frames=self.max_frames,
            shards=self.shards, microbatches=self.microbatches, row_multiple=self.row_multiple,
        )  # fmt: skip
        return length, rows, clip_packing.text_length(batch["text_mask"], self.text_multiple)

    def no_sizes(self) -> tuple[int, ...]:
        """The sizes of a batch past the last step: zeros, as many as `sizes` gives."""
        return (0,) * (3 if self.packing else 1)

    def inputs(
        self, batch: dict[str, np.ndarray], sizes: tuple[int, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """The step's host arrays at the agreed `sizes` (default: this batch's own; with
        several processes always pass the agreed ones)."""
        if not self.packing:
            return model_inputs(batch, None if sizes is None else sizes[0])
        length, rows, text_len = sizes if sizes is not None else self.sizes(batch)
        out = model_inputs(batch, length)
        return self.packed(self.clip_frames(batch), out, rows=rows, text_len=text_len)

    def packed(
        self,
        frames: np.ndarray,
        batch: dict[str, np.ndarray],
        *,
        rows: int | None = None,
        text_len: int | None = None,
    ) -> dict[str, np.ndarray]:
        """`batch` (with text_ids / text_mask [B, S]) with its captions cut to `text_len`
        (default: its longest, rounded up to text_multiple) and the slots of packed rows for
        clips of `frames` [B] (`rows` of them; default: as few as fit)."""
        if text_len is None:
            text_len = clip_packing.text_length(batch["text_mask"], self.text_multiple)
        slots = clip_packing.device_slots(
            frames, row_len=self.row_len, max_frames=self.max_frames, shards=self.shards,
            microbatches=self.microbatches, row_multiple=self.row_multiple, rows=rows,
        )  # fmt: skip
        return {**clip_packing.trim_text(batch, text_len), **slots}


@dataclasses.dataclass
class TrainStep:
    """What the train loop needs. `step(state, batch) -> (state, metrics)` donates `state`
    (a batch may carry AGREE rows [B, k]: metrics[AGREE] is then their maximum [k]);
    `embed(params, batch) -> (pose [B, H], text [B, H])` is the eval-mode forward and
    `embed_text(params, {"text_ids", "text_mask"}) -> [B, H]` its text tower alone (outputs
    replicated; B splits over the batch axes)."""

    state: dict[str, Any]
    state_sharding: Any
    param_sharding: Any
    batch_sharding: Any
    step: Callable
    embed: Callable
    embed_text: Callable
    schedule: optax.Schedule
    graphdef: Any


def make_train_step(
    config,
    model: nnx.Module,
    mesh: Mesh,
    batch_axes: tuple[str, ...],
    total_steps: int,
    *,
    augment: Callable[[dict[str, Any], jax.Array], dict[str, Any]] | None = None,
) -> TrainStep:
    """Initial (sharded) state and the jitted step for `model` (its current weights).

    config: the training config (loss, optimizer, microbatches, seed, max_bad_steps).
    optimizer.decay_steps = 0 decays over `total_steps`.
    augment: hook(batch, step) -> model batch, applied inside the step to batches that carry
    the device-augmentation inputs (data/augment_device.py, from_config).
    """
    opt_cfg = config.optimizer.copy_and_resolve_references()
    if not opt_cfg.decay_steps:  # 0: decay over this run's own length
        opt_cfg.decay_steps = total_steps
    tx, schedule = optim.make_optimizer(opt_cfg, max_bad_steps=config.max_bad_steps)

    # Parameters by the rules in sharding.py; optimiser state follows them.
    graphdef, model_params, model_rngs, model_rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    loss_params = losses.init_loss_params(config.loss.name, config.loss)
    param_sharding = {
        "model": sharding.param_shardings(model_params, mesh),
        "loss": jax.tree.map(lambda _: sharding.replicated(mesh), loss_params),
    }
    params = jax.device_put({"model": model_params, "loss": loss_params}, param_sharding)
    opt_sharding = sharding.optimizer_shardings(tx, params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    state = {
        "params": params,
        "opt": opt_state,
        "step": jax.device_put(np.int32(0), sharding.replicated(mesh)),
    }
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh, batch_axes)
    loss_fn = losses.make_loss_fn(config.loss.name, mesh, batch_axes)
    base_rng = jax.random.key(config.seed)
    shards = sharding.num_batch_shards(mesh, batch_axes)  # packed rows pool per shard
    max_frames = int(model.config.max_frames)

    def embed_train(p, batch, rng):
        # Dropout keys depend only on (seed, step, microbatch): a resumed run replays exactly.
        m = nnx.merge(graphdef, p["model"], _fresh_rngs(model_rngs, rng), _copy(model_rest))
        m.train()
        if clip_packing.is_packed(batch):  # [1, ...] leaves: see train_step
            batch = {k: v[0] for k, v in batch.items()}
        return m(batch, shards=shards)

    def train_step(state, batch):
        batch = dict(batch)
        agree = batch.pop(AGREE, None)  # multi-process agreement rows, not model inputs
        if augment is not None and "pose_observed" in batch:  # data.augment_on_device
            batch = augment(batch, state["step"])
        if clip_packing.is_slotted(batch):  # data.packing: the rows, from the augmented clips
            batch = clip_packing.pack_on_device(batch, max_frames=max_frames, shards=shards)
        if clip_packing.is_packed(batch):
            # Leaves lead with R rows or B clips: stacked by microbatch ([M, ...]), they share
            # the leading size GradCache splits, and its microbatch m is clip_packing's.
            batch = clip_packing.microbatch_major(batch, config.microbatches)
        rng = jax.random.fold_in(base_rng, state["step"])
        (loss, metrics), grads = grad_cache.accumulated_value_and_grad(
            embed_train,
            lambda pose_emb, text_emb, p: loss_fn(pose_emb, text_emb, p["loss"]),
            state["params"],
            batch,
            config.microbatches,
            rng=rng,
        )
        updates, opt = tx.update(grads, state["opt"], state["params"])
        metrics = {
            **metrics,
            "loss": loss,
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
            "skipped_steps": optim.skipped_steps(opt),
        }
        if agree is not None:
            # Rides on the step's own collectives: no extra program, no host round trip.
            metrics[AGREE] = jnp.max(agree, axis=0)
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt": opt,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    def mesh_trace(fn):
        """fn traced with the model's Pallas kernels run per batch shard (model/partition.py)."""

        def traced(*args):
            with partition.batch_sharded(mesh, batch_axes):
                return fn(*args)

        return traced

    step = jax.jit(
        mesh_trace(train_step),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    def embed_eval(p, batch):
        m = nnx.merge(graphdef, p["model"], _copy(model_rngs), _copy(model_rest))
        m.eval()
        return m(batch)

    embed = jax.jit(
        mesh_trace(embed_eval),
        in_shardings=(param_sharding, batch_sharding),
        out_shardings=sharding.replicated(mesh),
    )

    def embed_text_eval(p, batch):
        m = nnx.merge(graphdef, p["model"], _copy(model_rngs), _copy(model_rest))
        m.eval()
        return m.embed_text(batch["text_ids"], batch["text_mask"])

    embed_text = jax.jit(
        mesh_trace(embed_text_eval),
        in_shardings=(param_sharding, batch_sharding),
        out_shardings=sharding.replicated(mesh),
    )
    return TrainStep(
        state=state,
        state_sharding=state_sharding,
        param_sharding=param_sharding,
        batch_sharding=batch_sharding,
        step=step,
        embed=embed,
        embed_text=embed_text,
        schedule=schedule,
        graphdef=graphdef,
    )


def _fresh_rngs(rng_state, key):
    """The model's RNG streams with key i = fold_in(key, i) and counts reset.

    Built inside the traced step: NNX refuses to mutate variables created outside it.
    """
    leaves, treedef = jax.tree.flatten(rng_state)
    fresh = [
        jax.random.fold_in(key, i)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else jnp.zeros_like(x)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, fresh)


def _copy(state):
    return jax.tree.map(lambda x: x, state)


__all__ = [
    "AGREE",
    "MODEL_INPUTS",
    "InputLayout",
    "TrainStep",
    "input_keys",
    "make_train_step",
    "model_inputs",
]
