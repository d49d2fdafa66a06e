"""The run directory: what training writes and every later command reads back.

`load_run(workdir=... | checkpoint=...)` rebuilds the model offline from the files training
wrote (config.json, model_config.json, tokenizer/) and restores one checkpoint's parameters.
signclip_jax/serving/embedder.py turns a loaded run into embeddings.

"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax.data import pipeline
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
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
