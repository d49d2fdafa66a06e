r"""Checkpoint converter: Orbax workdir <-> PyTorch.

  # the original MMPT/fairseq layout (reference section 8): strict-loadable by MMFusionSeparate
  python -m signclip_jax.convert to-pytorch --workdir=runs/st --format=mmpt --out=checkpoint_best.pt
  # a release folder for the PyTorch twin (torch_twin.TorchSignCLIP.from_pretrained)
  python -m signclip_jax.convert to-pytorch --workdir=runs/st --format=hf --out=release/
  # an original checkpoint (or a release folder) -> a workdir for evaluate/embed/serve/train
  python -m signclip_jax.convert from-pytorch --input=checkpoint_best.pt --out=runs/imported \
      --text_model=bert-base-cased

mmpt: `torch.save`d fairseq dict (`model` = the original state_dict keys with the `mmmodel.`
prefix, PyTorch layouts, every tensor the original holds, untouched vocabulary rows and poolers
included; `args`/`cfg` None, `optimizer_history`, `extra_state`, `task_state`, `criterion` as
fairseq's `--restore-file` reads them). Our own settings ride along under the extra top-level
key `signclip_jax`, which fairseq and MMPT ignore and `from-pytorch` reads back. The state_dict
has the 404 keys (baseline_temporal) that MMFusionSeparate holds under transformers >= 4.31, the
original's inference environment; `--position_ids` adds the two `position_ids` buffers that
transformers < 4.31 (its training environment, 3.4.0) also keeps, for a strict load there.

from-pytorch runs nothing from the file (interop/safe_pickle.py, driven by torch.load): tensors,
plain containers and a few numpy/argparse data types are read for real; objects of other
classes in the metadata (fairseq configs, meters, version objects) become inert placeholders,
reported in one warning line; a pickle that names code (os.system, eval, ...) is refused. A
release folder must hold float tensors only, and without its tokenizer files the text model's
tokenizer is used (a warning says which). Architecture comes from the tensor shapes; the number
of attention heads does not show in any shape, so it comes from the file's own config (our
exports), `--num_heads`, or the config of `--text_model` (whose tokenizer the checkpoint needs
anyway).

Both directions need PyTorch, an optional extra (`pip install 'signclip-jax[torch]'`): it
is imported where it is used, so `--help` works without it and a missing torch is one line.
The model and tokenizer are built by signclip_jax/run.py, the one factory: to-pytorch reads a
run with `run.load_run`; from-pytorch turns the file into a training config (`import_config`)
that `run.source_from_config` builds, and writes a run directory.

Outputs are written under a temporary name and renamed into place; an existing --out is
refused unless --force.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from signclip_jax import __version__, cli, extras
from signclip_jax import checkpoint as ckpt_lib
from signclip_jax import config as config_lib
from signclip_jax import run as run_lib
from signclip_jax.data import text as text_lib
from signclip_jax.errors import DataError, UserError
from signclip_jax.model import bert as bert_lib
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses

log = logging.getLogger("signclip_jax.convert")

PREFIX = "mmmodel."  # fairseq's FairseqMMModel wraps MMFusionSeparate as `mmmodel`
META_KEY = "signclip_jax"  # our extra top-level key in a fairseq dict
META_FORMAT = "signclip-jax/mmpt"
FORMATS = ("mmpt", "hf")
_LAYER = re.compile(r"^(video_encoder\.bert|text_encoder)\.encoder\.layer\.(\d+)\.")
TO_PYTORCH = "convert to-pytorch"
FROM_PYTORCH = "convert from-pytorch"


def _torch(what: str) -> ModuleType:
    """torch, an optional extra: MissingExtra (one line naming the pip extra) without it."""
    return extras.require("torch", "torch", what)


def _twin(what: str) -> ModuleType:
    """signclip_jax.interop.torch_twin (all torch, so imported only once torch is there)."""
    _torch(what)
    from signclip_jax.interop import torch_twin

    return torch_twin


# ----------------------------------------------------------------------------------- keys
def mmpt_key_shapes(model_config, *, position_ids: bool = False) -> dict[str, tuple[int, ...]]:
    """{"mmmodel.<key>": shape} of an mmpt export of `model_config`, without allocating it.

    `model_config`: a SignCLIPConfig or anything `signclip.model_config` reads (a training
    config, its model section). `position_ids` adds the two [1, max_positions] int64 buffers
    that transformers < 4.31 (the original's training environment) keeps in the state_dict.
    """
    mcfg = signclip_model.model_config(model_config)
    abstract = signclip_model.abstract_model(mcfg)
    shapes = {}
    for path, var in bert_lib.param_items(abstract):
        key, transpose = bert_lib.hf_key(path)
        shape = tuple(int(d) for d in var.shape)
        shapes[PREFIX + key] = shape[::-1] if transpose else shape
    if position_ids:
        for key in _position_id_keys():
            shapes[PREFIX + key] = (1, mcfg.bert.max_position_embeddings)
    return shapes


def _position_id_keys() -> tuple[str, str]:
    return ("video_encoder.bert.embeddings.position_ids", "text_encoder.embeddings.position_ids")


# -------------------------------------------------------------------------------- to-pytorch
def _export_meta(run, dtype: str, format_tag: str) -> dict[str, Any]:
    """Our settings for the way back: model config, input settings, loss, training config."""
    settings = run.settings
    return {
        "format": format_tag,
        "format_version": 1,
        "signclip_jax_version": __version__,
        "torch_dtype": "float16" if dtype in ("fp16", "float16") else "float32",
        "model": run.model_config.to_dict(),
        "inputs": {
            "max_frames": int(settings.spec.max_frames),
            "pose_components": settings.spec.components,
            "include_z": bool(settings.spec.include_z),
            "prompt_template": settings.prompt_template,
            "text_max_len": int(settings.text_max_len),
        },
        "loss": {
            "name": str(run.config.loss.name),
            "params": {k: float(np.asarray(v)) for k, v in run.loss_params.items()},
        },
        "training_config": json.loads(run.config.to_json_best_effort()),
        "source": {"checkpoint": str(run.step_dir), "step": int(run.step)},
    }


def _step_meta(step_dir) -> dict[str, Any]:
    path = Path(str(step_dir)) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def mmpt_state_dict(model, *, dtype: str = "fp32", position_ids: bool = False):
    """OrderedDict {"mmmodel.<key>": torch.Tensor} of a JAX SignCLIP (original layouts)."""
    torch = _torch(TO_PYTORCH)
    target = _twin(TO_PYTORCH).torch_dtype(dtype)
    out = collections.OrderedDict()
    for key, value in signclip_model.to_state_dict(model).items():
        out[PREFIX + key] = torch.from_numpy(np.array(value, order="C")).to(target)  # writable copy
    if position_ids:
        n = model.config.bert.max_position_embeddings
        for key in _position_id_keys():
            out[PREFIX + key] = torch.arange(n, dtype=torch.int64)[None]
    return out


def fairseq_checkpoint(run, *, dtype: str = "fp32", position_ids: bool = False) -> dict[str, Any]:
    """The dict fairseq's Trainer saves (reference 8.1/8.4), with `run`'s parameters."""
    meta = _step_meta(run.step_dir)
    val_loss = (meta.get("metrics") or {}).get("val/loss")
    half = dtype in ("fp16", "float16")
    return {
        "args": None,
        "cfg": None,  # allowed by fairseq; a made-up fairseq config could not be checked here
        "model": mmpt_state_dict(run.model, dtype=dtype, position_ids=position_ids),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "MMCriterion",
                "optimizer_name": "FP16Optimizer" if half else "FairseqAdam",
                "lr_scheduler_state": {"best": val_loss},
                "num_updates": max(int(run.step), 0),
            }
        ],
        "task_state": {},
        "extra_state": {
            "metrics": {},
            "previous_training_time": 0.0,
            "train_iterator": {
                "version": 2,
                "epoch": 1,
                "iterations_in_epoch": 0,
                "shuffle": True,
            },
            # fairseq compares a restored "best" with new losses: only a real value goes in
            **({"val_loss": val_loss, "best": val_loss} if val_loss is not None else {}),
        },
        META_KEY: _export_meta(run, dtype, META_FORMAT),
    }


def export_mmpt(
    run, out: str | Path, *, dtype: str = "fp32", position_ids: bool = False, force: bool = False
) -> Path:
    """Writes `fairseq_checkpoint(run)` to `out` with torch.save (atomically)."""
    torch, twin = _torch(TO_PYTORCH), _twin(TO_PYTORCH)
    ckpt = fairseq_checkpoint(run, dtype=dtype, position_ids=position_ids)
    with twin.staged_output(out, force=force) as tmp:
        torch.save(ckpt, tmp)
    return Path(out)


def export_hf(run, out: str | Path, *, dtype: str = "fp32", force: bool = False) -> Path:
    """Writes a release folder for `TorchSignCLIP.from_pretrained` (atomically)."""
    torch_twin = _twin(TO_PYTORCH)
    meta = _export_meta(run, dtype, torch_twin.HF_FORMAT)
    extra = {k: meta[k] for k in ("loss", "training_config", "source")}
    config = torch_twin.pretrained_config(
        run.model_config.to_dict(), inputs=meta["inputs"], dtype=dtype, extra=extra
    )
    return torch_twin.write_pretrained(
        out, signclip_model.to_state_dict(run.model), config, tokenizer=run.tokenizer, force=force
    )


def to_pytorch(
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    which: str = "latest",
    format: str,
    out: str | Path,
    dtype: str = "fp32",
    position_ids: bool = False,
    force: bool = False,
) -> Path:
    """Restores a workdir's latest/best checkpoint (or one step dir) and exports it."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {format!r}")
    twin = _twin(TO_PYTORCH)  # before the (long) restore, as the checks below
    twin.torch_dtype(dtype)
    twin.check_output(out, force)
    run = run_lib.load_run(workdir, checkpoint, which=which)
    if format == "mmpt":
        _note_original_settings(run)
        return export_mmpt(run, out, dtype=dtype, position_ids=position_ids, force=force)
    if position_ids:
        raise UserError("--position_ids applies to --format=mmpt only")
    return export_hf(run, out, dtype=dtype, force=force)


def _note_original_settings(run) -> None:
    """The original code takes max_video_len / max_len / multimodal_projection from its YAML,
    not from the checkpoint: say what to set where it differs from baseline_temporal's."""
    s = run.settings
    projection = run.model_config.projection
    if projection != "none":
        value = "true" if projection == "linear" else "'l2_norm'"
        log.warning(
            "this model has %s projection heads: set model.multimodal_projection: %s in the "
            "original's YAML",
            projection,
            value,
        )
    if run.config.loss.name != "signclip":
        log.warning(
            "trained with the %s loss: its learned scale/bias (kept in the file's %r entry) "
            "has no place in the original, which scores with raw dot products",
            run.config.loss.name,
            META_KEY,
        )
    if s.spec.max_frames != 256 or s.text_max_len != 64:
        log.warning(
            "this model was trained with max_frames=%d and text_max_len=%d; the original "
            "configs use dataset.max_video_len=256 and max_len=64. Set those to %d and %d "
            "in the original's YAML for the same embeddings.",
            s.spec.max_frames,
            s.text_max_len,
            s.spec.max_frames,
            s.text_max_len,
        )


# ------------------------------------------------------------------------------ from-pytorch
def _safe_pickle(what: str) -> ModuleType:
    """signclip_jax.interop.safe_pickle (torch's unpickler machinery: imported with torch)."""
    _torch(what)
    from signclip_jax.interop import safe_pickle

    return safe_pickle


def load_torch_file(path: str | Path) -> Any:
    """A torch.save file (zip or legacy format) read on the CPU by `safe_pickle`: tensors exactly
    as torch.load(weights_only=True) reads them; objects of other classes (fairseq configs,
    meters, version objects) as inert placeholders (`safe_pickle.placeholders_in` finds them).

    A pickle that names code (os.system, eval, subprocess, ...) is a UserError; nothing of the
    file is run either way.
    """
    safe_pickle = _safe_pickle(FROM_PYTORCH)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input {path} does not exist")
    try:
        return safe_pickle.torch_load(path)
    except safe_pickle.UnsafePickle as e:
        raise UserError(
            f"refusing to read {path}: {e}; nothing in it was run. Weights do not need code: "
            "re-save just them where you trust the file, torch.save({'model': ckpt['model']})"
        ) from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read {path} as a PyTorch checkpoint: {first[:300]}") from None


def _to_numpy(value, key: str, source: str) -> np.ndarray:
    torch = _torch(FROM_PYTORCH)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # fp16 -> fp32 is exact; bf16 has no numpy form
        return t.numpy()
    if isinstance(value, np.ndarray):
        return value
    name = getattr(value, "pickled_name", None)  # a safe_pickle placeholder
    what = f"an object of {name}, a class not loaded" if name else f"a {type(value).__name__}"
    raise DataError(f"{source}: {key} is {what}, not a tensor")


def read_source(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """A fairseq dict / bare state_dict (.pt) or a release folder -> (bare state_dict as
    numpy without `mmmodel.` prefix or position_ids buffers, our meta or None, kind)."""
    torch_twin = _twin(FROM_PYTORCH)
    path = Path(path)
    if path.is_dir():
        config = torch_twin.read_pretrained_config(path)
        weights = torch_twin.read_pretrained_weights(path)
        sd = {k: _to_numpy(v, k, str(path)) for k, v in weights.items()}
        return _strip(sd), config, "hf"
    if path.suffix == ".safetensors" and path.is_file():  # a bare state_dict
        from safetensors.torch import load_file  # imports torch: an optional extra

        try:
            weights = load_file(str(path))
        except Exception as e:
            raise DataError(f"cannot read {path}: {e}") from None
        return (
            _strip({k: _to_numpy(v, k, str(path)) for k, v in weights.items()}),
            None,
            "state_dict",
        )
    obj = whole = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise DataError(f"{path}: expected a dict (fairseq checkpoint or state_dict)")
    kind = "state_dict"
    meta = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        kind, meta, obj = "mmpt", obj.get(META_KEY), obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if meta is not None and (not isinstance(meta, Mapping) or meta.get("format") != META_FORMAT):
        meta = None
    sd = {str(k): _to_numpy(v, str(k), str(path)) for k, v in obj.items()}
    if not sd:
        raise DataError(f"{path}: the state_dict is empty")
    found = _safe_pickle(FROM_PYTORCH).placeholders_in(whole)
    if found:  # the weights are all tensors (above): what was not loaded is metadata
        log.warning("%s: %s; weights unaffected", path, _safe_pickle(FROM_PYTORCH).report(found))
    return _strip(sd), meta, kind


def _strip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sd.items():
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if bare in _position_id_keys():
            continue  # a buffer (0..n-1) of transformers < 4.31, not a parameter
        out[bare] = value
    return out


def _shape(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise DataError(f"the checkpoint has no {key} (is it a SignCLIP MMFusionSeparate?)")
    shape = tuple(int(d) for d in sd[key].shape)
    if len(shape) != ndim:
        raise DataError(f"{key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _layers(sd: Mapping[str, np.ndarray], tower: str) -> int:
    found = {int(m[2]) for k in sd if (m := _LAYER.match(k)) and m[1] == tower}
    if not found:
        raise DataError(f"the checkpoint has no {tower}.encoder.layer.* tensors")
    gaps = sorted(set(range(max(found) + 1)) - found)
    if gaps:
        raise DataError(f"{tower}.encoder.layer.{{{','.join(map(str, gaps))}}}.* missing")
    return max(found) + 1


def infer_architecture(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sizes read off the tensor shapes of a bare original-layout state_dict.

    Returns vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
    intermediate_size, text_layers, video_layers, pose_dim, projection (bool). The number of
    attention heads is not among them: no tensor shape depends on it.
    """
    vocab, hidden = _shape(sd, "text_encoder.embeddings.word_embeddings.weight", 2)
    positions, _ = _shape(sd, "text_encoder.embeddings.position_embeddings.weight", 2)
    types, _ = _shape(sd, "text_encoder.embeddings.token_type_embeddings.weight", 2)
    inter, _ = _shape(sd, "text_encoder.encoder.layer.0.intermediate.dense.weight", 2)
    out, pose_dim = _shape(sd, "video_encoder.videomlp.linear1.weight", 2)
    if out != hidden:
        raise DataError(
            f"video_encoder.videomlp.linear1.weight {(out, pose_dim)} does not produce the "
            f"text tower's hidden size {hidden}"
        )
    heads = ("video_projection.linear.weight", "text_projection.linear.weight")
    present = [k in sd for k in heads]
    if any(present) and not all(present):
        raise DataError(f"only one projection head: {[k for k in heads if k in sd]}")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=positions,
        type_vocab_size=types,
        intermediate_size=inter,
        text_layers=_layers(sd, "text_encoder"),
        video_layers=_layers(sd, "video_encoder.bert"),
        pose_dim=pose_dim,
        projection=all(present),
    )


def _resolve_heads(
    arch: Mapping[str, Any], text_model: str, num_heads: int | None, where: str
) -> dict[str, Any]:
    """The BERT config of a checkpoint without our config: shapes from the tensors, the rest
    (heads, eps, activation, dropout) from `text_model`'s config, which must have the same
    sizes (its tokenizer has to fit the vocabulary table too)."""
    ref = bert_lib.BertConfig.from_hf(text_model)
    dims = ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")
    differ = [f"{d} {arch[d]} vs {getattr(ref, d)}" for d in dims if arch[d] != getattr(ref, d)]
    if differ and num_heads is None:
        raise UserError(
            f"{where} does not have the sizes of text model {text_model!r} "
            f"(checkpoint vs text model: {', '.join(differ)}); give --text_model=<the BERT it "
            "was trained from> (its tokenizer is needed too), or --num_heads to build it anyway"
        )
    bert = ref.to_dict()
    bert.update({d: arch[d] for d in (*dims, "type_vocab_size")})
    bert["num_hidden_layers"] = arch["text_layers"]
    if num_heads is not None:
        bert["num_attention_heads"] = int(num_heads)
    if bert["hidden_size"] % bert["num_attention_heads"]:
        raise UserError(
            f"hidden size {bert['hidden_size']} is not a multiple of "
            f"{bert['num_attention_heads']} heads; give --num_heads"
        )
    return bert


def import_config(
    arch: Mapping[str, Any],
    meta: Mapping[str, Any] | None,
    where: str,
    *,
    text_model: str | None = None,
    num_heads: int | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
) -> ml_collections.ConfigDict:
    """The training config of a converted checkpoint's run directory.

    Starts from `config_file`, else the training config our export carries (`meta`), else the
    package's recipe. Its model section then describes the checkpoint's network, so that
    `run.source_from_config` builds exactly that: our export's model config, else the shapes
    of `arch` (`infer_architecture`) with the rest of the BERT config (heads, eps, activation)
    from the text model. `overrides` ("model.projection=linear_l2") come last.
    """
    if config_file:
        config = config_lib.load_config_file(config_file)
    elif meta and isinstance(meta.get("training_config"), Mapping):
        config = ml_collections.ConfigDict(dict(meta["training_config"]))
    else:
        config = config_lib.base_config()
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    model = config.model
    if text_model:
        model.text_model = text_model

    if meta and isinstance(meta.get("model"), Mapping):  # our export: its model config
        spec = dict(meta["model"])
        spec.pop("dtype", None), spec.pop("attention", None), spec.pop("remat", None)
        spec["text_model"] = model.get("text_model") or spec.get("text_model")
        bert = dict(spec.pop("bert"))
        if num_heads is not None:
            bert["num_attention_heads"] = int(num_heads)
        config.data.max_frames = int(spec.pop("max_frames"))  # model_config reads it there
        for key, value in spec.items():
            model[key] = value
    else:  # the shapes, plus what no shape tells from the text model
        bert = _resolve_heads(arch, str(model.text_model), num_heads, where)
        model.video_layers = arch["video_layers"]
        model.pose_dim = arch["pose_dim"]
        if arch["projection"] and model.get("projection", "none") == "none":
            if not any(o.startswith("model.projection=") for o in overrides):
                raise UserError(
                    f"{where} has projection heads (video_projection/text_projection); the "
                    "weights do not say whether they were L2-normalised: give "
                    "--config.model.projection=linear or =linear_l2"
                )
        if not arch["projection"]:
            model.projection = "none"
    model.bert = bert
    model.pretrained = False  # the weights come from checkpoints/0
    config.init_from = ""
    return config_lib.apply_overrides(config, overrides, new_keys=False)


def _loss_params(config, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The learnable loss scalars: our export's when it used config's loss, else fresh."""
    loss_name = str(config.loss.name)
    loss_params = losses.init_loss_params(loss_name, config.loss)
    saved = (meta or {}).get("loss") or {}
    if saved.get("name") == loss_name:
        for key, value in (saved.get("params") or {}).items():
            if key in loss_params:
                loss_params[key] = jax.numpy.float32(value)
    return loss_params


def _write_run(tmp: Path, config, mcfg, params: dict[str, Any], tokenizer, meta: dict) -> None:
    """The run directory training would write, with `params` as checkpoints/0."""
    run_lib.save_config(tmp, config)
    run_lib.save_model_files(tmp, mcfg, tokenizer)
    ckpt = ckpt_lib.Checkpointer(tmp, keep=1, keep_best=0, async_save=False)
    try:
        ckpt.save(0, params=params, train_state={"step": np.int32(0)}, meta=meta, force=True)
    finally:
        ckpt.close()


def from_pytorch(
    input: str | Path,
    out: str | Path,
    *,
    text_model: str | None = None,
    num_heads: int | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """An original SignCLIP checkpoint, a state_dict or a release folder -> a run directory.

    The run directory (config.json, model_config.json, bert_config.json, tokenizer/,
    checkpoints/0/ with params {"model", "loss"}) restores with `run_lib.load_run(out)` and
    initialises training with `--config.init_from=OUT`.
    """
    twin = _twin(FROM_PYTORCH)
    twin.check_output(out, force)
    sd, meta, kind = read_source(input)
    arch = infer_architecture(sd)
    where = f"{input} ({kind})"
    config = import_config(
        arch,
        meta,
        where,
        text_model=text_model,
        num_heads=num_heads,
        config_file=config_file,
        overrides=overrides,
    )

    # Tokenizer: the release folder's own, else the text model's (offline-safe loader).
    text_model = str(config.model.text_model)
    if kind == "hf" and twin.has_tokenizer(input):
        tokenizer = text_lib.load_tokenizer(str(Path(input)))
    elif kind == "hf":
        missing = f"{input} has no tokenizer files ({' / '.join(twin.TOKENIZER_FILES)})"
        try:
            tokenizer = text_lib.load_tokenizer(text_lib.resolve_text_model(text_model))
        except UserError as e:
            raise UserError(
                f"{missing}, and the tokenizer of its text model {text_model!r} cannot be "
                f"loaded: {e}. Give --text_model=<the BERT it was trained from>"
            ) from None
        log.warning("%s: using the tokenizer of text model %r instead", missing, text_model)
    else:
        tokenizer = text_lib.load_tokenizer(text_lib.resolve_text_model(text_model))
    if len(tokenizer) > arch["vocab_size"]:
        raise UserError(
            f"the tokenizer of {text_model!r} has {len(tokenizer)} tokens but the "
            f"checkpoint's vocabulary table {arch['vocab_size']} rows: give --text_model=<the "
            "BERT the checkpoint was trained from>"
        )
    mcfg = run_lib.source_from_config(config, tokenizer=tokenizer).model_config

    # Strict: every tensor of this architecture with its shape (PyTorch layout), no extras.
    expected = {k[len(PREFIX) :]: v for k, v in mmpt_key_shapes(mcfg).items()}
    twin.check_state_dict(expected, sd, source=f"{where} (keys without the {PREFIX} prefix)")
    twin.check_floating(sd, source=where)  # an int weight or bias would load as garbage
    abstract = signclip_model.abstract_model(mcfg)
    report = signclip_model.from_state_dict(abstract, sd, source=where)
    params = {"model": nnx.state(abstract, nnx.Param), "loss": _loss_params(config, meta)}
    step_meta = {"converted_from": str(input), "source_format": kind, "tensors": len(report.loaded)}
    with twin.staged_output(out, force=force, directory=True) as tmp:
        _write_run(tmp, config, mcfg, params, tokenizer, step_meta)
    return Path(out)


# ------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.convert",
        description="Convert checkpoints between signclip-jax (Orbax workdirs) and PyTorch: "
        "the original MMPT/fairseq layout, or a release folder for the PyTorch twin.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "to-pytorch",
        help="export a workdir checkpoint to PyTorch",
        description="mmpt: a fairseq-style .pt whose 'model' loads strictly into the original "
        "MMFusionSeparate (keys 'mmmodel.'-prefixed). hf: model.safetensors + config.json + "
        "tokenizer, loaded by signclip_jax.torch_twin.TorchSignCLIP.from_pretrained(DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_checkpoint_args(t)
    t.add_argument("--format", required=True, choices=FORMATS)
    t.add_argument("--out", required=True, help="FILE.pt for mmpt, a folder for hf")
    t.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="tensor dtype")
    t.add_argument(
        "--position_ids",
        action="store_true",
        help="mmpt: add the position_ids buffers that transformers < 4.31 (the original's "
        "training environment, 3.4.0) expects; omit for transformers >= 4.31 (its inference "
        "environment, 4.51)",
    )
    t.add_argument("--force", action="store_true", help="replace an existing --out")

    f = sub.add_parser(
        "from-pytorch",
        help="import a PyTorch checkpoint into a workdir",
        description="Reads an original SignCLIP checkpoint (fairseq dict with 'model', fp16 or "
        "fp32, with or without position_ids buffers), a bare state_dict, or a release folder "
        "written by to-pytorch --format=hf, and writes a workdir (config.json, "
        "model_config.json, tokenizer/, checkpoints/0) for evaluate, embed, serve and "
        "train --config.init_from=OUT. Extra --config.KEY=VALUE arguments (with '=') set "
        "values of the training config written there, e.g. --config.model.projection=linear_l2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    f.add_argument("--input", required=True, help="FILE.pt or a release folder")
    f.add_argument("--out", required=True, help="workdir to create")
    f.add_argument(
        "--text_model",
        help="BERT folder, hub name or 'minilm' whose tokenizer (and, for a checkpoint without "
        "our config, attention-head count) the model uses; unset: the file's own config, "
        "else bert-base-cased as the original",
    )
    f.add_argument(
        "--num_heads", type=int, help="attention heads (no tensor shape tells them apart)"
    )
    f.add_argument(
        "--config", dest="config_file", help="training config (CONFIG.py[:arg]) to start from"
    )
    f.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if args.command == "from-pytorch" and item.startswith("--config."):
            overrides.append(item[len("--config.") :])
        else:
            parser.error(f"unrecognized argument: {item}")
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr
    )
    log.setLevel(logging.INFO)
    # Cheap checks first: they need no torch (an optional extra) and no checkpoint read.
    if Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} already exists; pass --force to replace it")
    if args.command == "from-pytorch" and not Path(args.input).exists():
        raise UserError(f"--input {args.input} does not exist")
    if args.command == "to-pytorch":
        out = to_pytorch(
            workdir=args.workdir,
            checkpoint=args.checkpoint,
            which=args.which,
            format=args.format,
            out=args.out,
            dtype=args.dtype,
            position_ids=args.position_ids,
            force=args.force,
        )
        print(f"wrote {out} ({args.format}, {args.dtype})")
    else:
        out = from_pytorch(
            args.input,
            args.out,
            text_model=args.text_model,
            num_heads=args.num_heads,
            config_file=args.config_file,
            overrides=overrides,
            force=args.force,
        )
        print(f"wrote workdir {out} (checkpoints/0)")
    return 0
