"""The run directory, and the one factory that builds a model and its tokenizer.

A run directory is what training writes and every later command reads back:
  config.json         the training config
  model_config.json   the network (SignCLIPConfig): rebuilds the model offline
  bert_config.json    the text BERT's HF config plus the [CLS]/[SEP] ids (for other tools)
  tokenizer/          the tokenizer files
  checkpoints/STEP/   Orbax step directories (checkpoint.py)
`convert from-pytorch` writes the same layout, so a converted checkpoint is a run directory.

Every command builds its model here, as open_clip's `factory.create_model` is the one place
that builds a model:
  source_from_config(config)   training: a fresh model (architecture from model.text_model or
                               model.bert, tokenizer from the text model), or with
                               config.init_from the architecture, tokenizer and weights of that
                               run (or step directory) with this config's compute settings
  source_from_run(workdir | checkpoint)   the same from a run (latest or best step) or a step
  init_params_from(source, params, ...)   fine-tuning: the source's weights into the sharded
                                          parameters of a fresh model
  load_run(workdir | checkpoint)   evaluate, embed, serve, convert: the restored model
signclip_jax/serving/embedder.py turns a loaded run into embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from signclip_jax import config as config_lib
from signclip_jax import files
from signclip_jax.data import pipeline
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses, sharding

log = logging.getLogger("signclip_jax.run")

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
BERT_CONFIG_FILE = "bert_config.json"
TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------- reading and writing
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


def read_config(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a run was trained with (config.json)."""
    return ml_collections.ConfigDict(read_json(epath.Path(run_dir) / CONFIG_FILE))


def save_config(run_dir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes config.json (sorted keys, atomically)."""
    resolved = json.loads(config.to_json_best_effort())
    files.write_json_atomic(epath.Path(run_dir) / CONFIG_FILE, resolved, sort_keys=True)


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


def read_tokenizer(run_dir: str | os.PathLike, config: ml_collections.ConfigDict):
    """The tokenizer saved in the run, else `config.model.text_model`'s (offline-safe)."""
    saved = epath.Path(run_dir) / TOKENIZER_DIR
    if not saved.exists():
        return text_lib.load_tokenizer(text_lib.resolve_text_model(config.model.text_model))
    if not files.is_remote(saved):
        return text_lib.load_tokenizer(str(saved))
    with tempfile.TemporaryDirectory(prefix="scj-tok-") as tmp:  # remote: fetch the files
        for f in saved.iterdir():
            Path(tmp, f.name).write_bytes(f.read_bytes())
        return text_lib.load_tokenizer(tmp)


def save_model_files(
    run_dir: str | os.PathLike, model_config: signclip_model.SignCLIPConfig, tokenizer
) -> None:
    """Writes what rebuilds the model offline: model_config.json, bert_config.json, tokenizer/."""
    run_dir = epath.Path(run_dir)
    for name, obj in ((MODEL_CONFIG_FILE, model_config.to_dict()),
                      (BERT_CONFIG_FILE, model_config.bert_config_dict())):  # fmt: skip
        files.write_json_atomic(run_dir / name, obj, sort_keys=True)
    save_tokenizer(tokenizer, run_dir)


def resolve_run_dir(
    path: str | os.PathLike, *, which: str = "latest"
) -> tuple[epath.Path, epath.Path]:
    """(run directory, step directory) of a run directory (its latest or best step) or of one
    step directory WORKDIR/checkpoints/N (whose run is WORKDIR): init_from takes either."""
    path = epath.Path(path)
    if (path / "params").exists():
        return _locate(checkpoint=path)
    return _locate(workdir=path, which=which)


def _locate(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    which: str = "latest",
) -> tuple[epath.Path, epath.Path]:
    """(run directory, step directory) of --workdir (latest or best) or --checkpoint."""
    step_dir = ckpt_lib.resolve_step_dir(workdir, checkpoint, which=which)
    run_dir = epath.Path(workdir) if workdir and not checkpoint else workdir_of(step_dir)
    return run_dir, step_dir


# ---------------------------------------------------------------------------------- the factory
@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What builds a model: the network config, its tokenizer and where its weights are.

    run_dir / step_dir: the run and the checkpoint the weights come from, and run_config that
    run's config.json; all None for a fresh model (random init, or the pretrained BERT).
    """

    model_config: signclip_model.SignCLIPConfig
    tokenizer: Any
    run_dir: epath.Path | None = None
    step_dir: epath.Path | None = None
    run_config: ml_collections.ConfigDict | None = None


def source_from_config(config: ml_collections.ConfigDict, *, tokenizer=None) -> ModelSource:
    """The model a training config asks for.

    No `init_from`: a fresh model, its architecture from `config.model` (text_model's
    config.json, or a `model.bert` dict) and `data.max_frames`, the tokenizer `tokenizer` or
    the text model's. With `init_from` (a run directory or a step directory): that run's
    architecture, tokenizer and checkpoint, with this config's compute settings (dtype, remat,
    attention, dropout); the data must fit its max_frames.
    """
    if config_lib.get(config, "init_from"):
        return _finetune_source(config)
    if tokenizer is None:
        tokenizer = text_lib.load_tokenizer(text_lib.resolve_text_model(config.model.text_model))
    return ModelSource(signclip_model.model_config(config, tokenizer=tokenizer), tokenizer)


def source_from_run(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    which: str = "latest",
    dtype: str | None = None,
    remat: bool | None = None,
    attention: str | None = None,
    hidden_dropout: float | None = None,
    attention_dropout: float | None = None,
) -> ModelSource:
    """The model of a run directory's latest/best step (`workdir`) or of one step directory
    (`checkpoint`), as trained or converted: model_config.json with the given compute settings
    (None keeps the run's), the run's tokenizer, the step to restore."""
    run_dir, step_dir = _locate(workdir, checkpoint, which=which)
    return _open(
        run_dir,
        step_dir,
        dtype=dtype,
        remat=remat,
        attention=attention,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
    )


def _open(run_dir: epath.Path, step_dir: epath.Path, **compute: Any) -> ModelSource:
    config = read_config(run_dir)
    return ModelSource(
        model_config=read_model_config(run_dir).with_compute(**compute),
        tokenizer=read_tokenizer(run_dir, config),
        run_dir=run_dir,
        step_dir=step_dir,
        run_config=config,
    )


def _finetune_source(config: ml_collections.ConfigDict) -> ModelSource:
    """init_from's run with `config`'s compute settings; its data must fit the model."""
    m = config.model
    run_dir, step_dir = resolve_run_dir(config.init_from)
    source = _open(
        run_dir,
        step_dir,
        dtype=m.dtype,
        remat=m.remat,
        attention=m.attention,
        hidden_dropout=m.get("hidden_dropout"),
        attention_dropout=m.get("attention_dropout"),
    )
    mcfg = source.model_config
    if config.data.max_frames > mcfg.max_frames:
        raise UserError(
            f"data.max_frames={config.data.max_frames} exceeds the max_frames={mcfg.max_frames} "
            f"of the model in {run_dir} (init_from)"
        )
    if m.projection != mcfg.projection or m.video_layers != mcfg.video_layers:
        log.warning(
            "init_from %s: using its architecture (projection=%s, video_layers=%d) instead of "
            "model.projection=%s, model.video_layers=%d",
            run_dir, mcfg.projection, mcfg.video_layers, m.projection, m.video_layers,
        )  # fmt: skip
    return source


def _source_loss(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """(loss name, its learnable scalars' initial values) of the run a source comes from."""
    loss = config_lib.get(source.run_config, "loss") or {}
    name = str(config_lib.get(loss, "name", "signclip"))
    return name, losses.init_loss_params(name, loss)


def _read_params(
    source: ModelSource, abstract_model: Any, loss_sharding: jax.sharding.Sharding
) -> dict[str, Any]:
    """{"model", "loss"} of the source's step directory, restored into `abstract_model` (an
    nnx.State of ShapeDtypeStructs with shardings) and replicated loss scalars."""
    _, loss_params = _source_loss(source)
    abstract = {
        "model": abstract_model,
        "loss": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=loss_sharding), loss_params
        ),
    }
    try:
        return ckpt_lib.restore_params(source.step_dir, abstract)
    except (ValueError, KeyError) as e:
        # Orbax's message is a multi-line tree diff: one line, cut short, keeps the contract.
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise UserError(
            f"{source.step_dir}: the checkpoint does not match "
            f"{source.run_dir / MODEL_CONFIG_FILE} ({detail})"
        ) from None


def init_params_from(
    source: ModelSource, params: dict[str, Any], config: ml_collections.ConfigDict, mesh
) -> dict[str, Any]:
    """Fine-tuning: `params` ({"model", "loss"}, sharded over `mesh`) with the model part read
    from the source's step directory in the same shardings; the loss scalars too when the
    source run trained with `config.loss.name`, else they keep their fresh init."""
    restored = _read_params(
        source, ckpt_lib.abstract_like(params["model"]), sharding.replicated(mesh)
    )
    source_loss, _ = _source_loss(source)
    keep_loss = source_loss == config.loss.name
    if not keep_loss:
        log.info("init_from used loss %r: %r starts from its own init", source_loss,
                 config.loss.name)  # fmt: skip
    return {"model": restored["model"], "loss": restored["loss"] if keep_loss else params["loss"]}


# ----------------------------------------------------------------------------- a restored run
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


def load_run(
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    which: str = "latest",
    dtype: str | None = None,
    attention: str | None = None,
) -> Run:
    """Restores the latest/best checkpoint of `workdir`, or the step directory `checkpoint`,
    onto the first local device.

    `dtype`/`attention` override the compute settings the model was trained with (e.g.
    "bfloat16" for fast inference); parameters stay fp32.
    """
    source = source_from_run(workdir, checkpoint, which=which, dtype=dtype, attention=attention)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = signclip_model.abstract_model(source.model_config)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.state(shapes, nnx.Param),
    )
    params = _read_params(source, abstract, device)
    model = _materialise(shapes, params["model"])
    model.eval()
    step_dir = source.step_dir
    return Run(
        config=source.run_config,
        model_config=source.model_config,
        model=model,
        loss_params=dict(params["loss"]),
        tokenizer=source.tokenizer,
        workdir=source.run_dir,
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
