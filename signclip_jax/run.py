"""A trained model, ready to embed: what evaluate, embed, serve and convert share.

`load_run(workdir=... | checkpoint=...)` rebuilds the model offline from the files training
wrote (config.json, model_config.json, tokenizer/) and restores one checkpoint's parameters.
`Embedder` turns poses and texts into embeddings:

  poses: `.pose` path / bytes / features [T, D] -> first max_frames frames -> padded to the
    smallest length bucket that holds it, each on its own mask (the original server padded a
    request's poses together; here a pose's embedding never depends on its batch-mates);
  texts: strings as given (no prompt template: the caller writes "<en> <ase> house") ->
    tokenised as in training (text_max_len).

Batches are padded to a few fixed row counts (powers of two up to `batch_size`) so each
(rows, length) shape compiles once; rows are split over all local devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax.data import pipeline
from signclip_jax.data import pose as pose_lib
from signclip_jax.data import text as text_lib
from signclip_jax.errors import DataError, UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Run:
    """A restored model and what is needed to feed it.

    config: the training config (config.json) as a ConfigDict; `model_config` the network
    spec; `model` the SignCLIP with restored parameters, in eval mode; `loss_params` the
    learnable loss scalars ({} for signclip); `step_dir` the checkpoint read.
    """

    config: ml_collections.ConfigDict
    model_config: signclip_model.SignCLIPConfig
    model: signclip_model.SignCLIP
    loss_params: dict[str, Any]
    tokenizer: Any
    workdir: epath.Path
    step_dir: epath.Path
    step: int

    @property
    def settings(self) -> pipeline.InputSettings:
        return pipeline.settings_from_config(self.config)

    def params(self) -> dict[str, Any]:
        """{"model": nnx.State of the parameters, "loss": ...}: the checkpoint's tree."""
        return {"model": nnx.state(self.model, nnx.Param), "loss": self.loss_params}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = epath.Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (is this a signclip-jax workdir?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def workdir_of(step_dir: str | os.PathLike) -> epath.Path:
    """WORKDIR of WORKDIR/checkpoints/STEP."""
    return epath.Path(step_dir).parent.parent


def save_tokenizer(tokenizer, workdir: str | os.PathLike) -> None:
    """Writes the tokenizer files to WORKDIR/tokenizer/ (local path or gs://), all or none."""
    target = epath.Path(workdir) / TOKENIZER_DIR
    with tempfile.TemporaryDirectory(prefix="scj-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        staging = epath.Path(f"{target}.tmp{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(tmp):
            (staging / name).write_bytes(Path(tmp, name).read_bytes())
        if target.exists():
            target.rmtree()
        staging.rename(target)


def load_tokenizer_for(workdir: epath.Path, config: ml_collections.ConfigDict):
    """The tokenizer saved beside the checkpoints, else the config's text model (offline-safe)."""
    saved = epath.Path(workdir) / TOKENIZER_DIR
    if not saved.exists():
        return text_lib.load_tokenizer(text_lib.resolve_text_model(config.model.text_model))
    if "://" not in str(saved):
        return text_lib.load_tokenizer(str(saved))
    with tempfile.TemporaryDirectory(prefix="scj-tok-") as tmp:  # remote: fetch the files
        for f in saved.iterdir():
            Path(tmp, f.name).write_bytes(f.read_bytes())
        return text_lib.load_tokenizer(tmp)


def resolve_run_dir(
    path: str | os.PathLike, *, which: str = "latest"
) -> tuple[epath.Path, epath.Path]:
    """(run directory, step directory) of a workdir or of one checkpoint step directory."""
    path = epath.Path(path)
    if (path / "params").exists():
        return workdir_of(path), ckpt_lib.resolve_step_dir(checkpoint=path)
    return path, ckpt_lib.resolve_step_dir(path, which=which)


def read_model_config(
    run_dir: str | os.PathLike, **overrides: Any
) -> signclip_model.SignCLIPConfig:
    """The SignCLIPConfig a run was trained with (model_config.json), with `overrides` of its
    fields (e.g. dtype="bfloat16"; None values are ignored)."""
    spec = read_json(epath.Path(run_dir) / MODEL_CONFIG_FILE)
    spec.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return signclip_model.SignCLIPConfig.from_dict(spec)
    except TypeError as e:
        raise UserError(f"{epath.Path(run_dir) / MODEL_CONFIG_FILE}: {e}") from None


def load_run(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    which: str = "latest",
    dtype: str | None = None,
    attention: str | None = None,
) -> Run:
    """Restores the latest/best checkpoint of `workdir`, or the step directory `checkpoint`.

    `dtype`/`attention` override the compute settings the model was trained with (e.g.
    "bfloat16" for fast inference); parameters stay fp32.
    """
    step_dir = ckpt_lib.resolve_step_dir(workdir, checkpoint, which=which)
    run_dir = epath.Path(workdir) if workdir and not checkpoint else workdir_of(step_dir)
    config = ml_collections.ConfigDict(read_json(run_dir / CONFIG_FILE))
    mcfg = read_model_config(run_dir, dtype=dtype, attention=attention)
    tokenizer = load_tokenizer_for(run_dir, config)

    shapes = signclip_model.abstract_model(mcfg)
    abstract = {
        "model": nnx.state(shapes, nnx.Param),
        "loss": losses.init_loss_params(config.loss.name, config.loss),
    }
    replicated = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    try:
        params = ckpt_lib.restore_params(step_dir, abstract)
    except (ValueError, KeyError) as e:
        raise UserError(
            f"{step_dir}: the checkpoint does not match {run_dir / MODEL_CONFIG_FILE} ({e})"
        ) from None
    model = _materialise(shapes, params["model"])
    model.eval()
    return Run(
        config=config,
        model_config=mcfg,
        model=model,
        loss_params=dict(params["loss"]),
        tokenizer=tokenizer,
        workdir=run_dir,
        step_dir=step_dir,
        step=int(step_dir.name) if step_dir.name.isdigit() else -1,
    )


def _materialise(shapes: signclip_model.SignCLIP, params: Any) -> signclip_model.SignCLIP:
    """A concrete SignCLIP from the shape-only one and `params` (no random init of the large
    tensors). Non-parameter state gets zeros; RNG keys (unused in eval) a fixed key."""

    def concrete(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)

    graphdef, _, rest = nnx.split(shapes, nnx.Param, ...)
    return nnx.merge(graphdef, params, jax.tree.map(concrete, rest))


# ---------------------------------------------------------------------------------- embedding
def row_buckets(batch_size: int, multiple: int) -> tuple[int, ...]:
    """Padded row counts: powers of two times `multiple`, up to `batch_size` (rounded up)."""
    top = -(-max(batch_size, 1) // multiple) * multiple
    sizes, n = [], multiple
    while n < top:
        sizes.append(n)
        n *= 2
    return (*sizes, top)


class Embedder:
    """Jitted pose and text towers of a `Run`, batched over all local devices.

    Each distinct (rows, frames) shape compiles once; `warm_up()` compiles them all ahead.
    """

    def __init__(self, run: Run, *, batch_size: int = 64, devices: Sequence[Any] | None = None):
        self.run = run
        self.settings = run.settings
        self.spec = self.settings.spec
        self.text_max_len = self.settings.text_max_len
        devices = list(devices or jax.local_devices())
        self.mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        self._rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.row_sizes = row_buckets(batch_size, len(devices))
        graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
        self._params = jax.device_put(params, replicated)

        def pose_fn(p, pose, mask):
            return nnx.merge(graphdef, p, rest).embed_pose(pose, mask)

        def text_fn(p, ids, mask):
            return nnx.merge(graphdef, p, rest).embed_text(ids, mask)

        self._pose_fn = jax.jit(pose_fn, out_shardings=replicated)
        self._text_fn = jax.jit(text_fn, out_shardings=replicated)

    @property
    def hidden_size(self) -> int:
        return self.run.model_config.hidden_size

    # -- inputs -------------------------------------------------------------------------------

    def pose_features(self, source: str | os.PathLike | bytes, *, name: str | None = None):
        """A `.pose` path or bytes -> features [min(T, max_frames), D] (DataError if unusable)."""
        return pose_lib.load_features(source, self.spec, name=name)

    def _rows_for(self, n: int) -> int:
        for size in self.row_sizes:
            if n <= size:
                return size
        return self.row_sizes[-1]

    def _put(self, array: np.ndarray):
        return jax.device_put(array, self._rows)

    # -- towers -------------------------------------------------------------------------------

    def embed_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Features [T_i, D] each (T_i >= 1; longer than max_frames keeps the first frames)
        -> [N, H] float32, in input order. Poses are grouped by length bucket."""
        out = np.zeros((len(features), self.hidden_size), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, f in enumerate(features):
            f = np.asarray(f)
            if f.ndim != 2 or f.shape[1] != self.spec.feature_dim or f.shape[0] == 0:
                raise DataError(
                    f"pose {i}: features of shape {f.shape}, expected [T >= 1, "
                    f"{self.spec.feature_dim}]"
                )
            length = pipeline.bucket_length(min(f.shape[0], self.spec.max_frames), self.settings)
            by_length.setdefault(length, []).append(i)
        top = self.row_sizes[-1]
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), top):
                chunk = indices[start : start + top]
                rows = self._rows_for(len(chunk))
                pose = np.zeros((rows, length, self.spec.feature_dim), np.float32)
                mask = np.zeros((rows, length), bool)
                for r, i in enumerate(chunk):
                    pose[r], mask[r] = pose_lib.pad_frames(np.asarray(features[i]), length)
                emb = self._pose_fn(self._params, self._put(pose), self._put(mask))
                out[chunk] = np.asarray(emb)[: len(chunk)]
        return out

    def embed_poses(self, sources: Iterable[str | os.PathLike | bytes]) -> np.ndarray:
        """`.pose` paths or bytes -> [N, H] float32 (first bad file raises a DataError)."""
        return self.embed_features([self.pose_features(s) for s in sources])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings, used as given -> [N, H] float32."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        top = self.row_sizes[-1]
        for start in range(0, len(texts), top):
            chunk = texts[start : start + top]
            ids, mask = text_lib.encode_texts(self.run.tokenizer, chunk, self.text_max_len)
            rows = self._rows_for(len(chunk))
            ids = np.pad(ids, ((0, rows - len(chunk)), (0, 0)))
            mask = np.pad(mask, ((0, rows - len(chunk)), (0, 0)))
            emb = self._text_fn(self._params, self._put(ids), self._put(mask))
            out[start : start + len(chunk)] = np.asarray(emb)[: len(chunk)]
        return out

    def warm_up(self) -> None:
        """Compiles every (rows, length) shape the pose tower can see, and the text tower."""
        for length in self.settings.lengths:
            for rows in self.row_sizes:
                pose = np.zeros((rows, length, self.spec.feature_dim), np.float32)
                mask = np.zeros((rows, length), bool)
                mask[:, 0] = True
                self._pose_fn(self._params, self._put(pose), self._put(mask)).block_until_ready()
        for rows in self.row_sizes:
            ids, mask = text_lib.encode_texts(self.run.tokenizer, [""] * rows, self.text_max_len)
            self._text_fn(self._params, self._put(ids), self._put(mask)).block_until_ready()


__all__ = [
    "Embedder",
    "Run",
    "load_run",
    "read_json",
    "read_model_config",
    "resolve_run_dir",
    "row_buckets",
    "save_tokenizer",
    "workdir_of",
]
