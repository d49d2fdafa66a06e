"""Checkpoints from elsewhere -> run directories: release folders, original .pt files, state_dicts.

The library behind `python -m signclip_jax.convert from-pytorch` and `--model=REF`
(signclip_jax/models.py), which imports a release folder or a Hub model into a cached run:

  read_source(path)        a release folder, a fairseq dict / bare state_dict (.pt) or a bare
                           .safetensors -> (state_dict as numpy, our meta or None, kind)
  prepare_import(path)     -> Imported: the training config, network config, parameters and
                           tokenizer of the run directory it makes (nothing written yet)
  write_run(dir, imported) the run directory training would write, checkpoints/0 holding them
  import_checkpoint(path, out)   both, written atomically to `out`

A release folder needs neither torch nor any code from the file: model.safetensors is read as
numpy (interop/release.py). A `.pt` file needs torch (an optional extra) and is read by
interop/safe_pickle.py: tensors, plain containers and a few numpy/argparse data types for real,
objects of other classes as inert placeholders (reported in one warning line), a pickle that
names code refused. Architecture comes from the tensor shapes; the number of attention heads
does not show in any shape, so it comes from the file's own config (our exports), `num_heads`,
or the config of `text_model` (whose tokenizer the checkpoint needs anyway). The model and
tokenizer are built by signclip_jax/run.py, the one factory (`run.source_from_config`).
"""

from __future__ import annotations

import dataclasses
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

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax import config as config_lib
from signclip_jax import extras
from signclip_jax import run as run_lib
from signclip_jax.data import text as text_lib
from signclip_jax.errors import DataError, UserError
from signclip_jax.interop import release
from signclip_jax.model import bert as bert_lib
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses

# The convert command's messages, whichever caller reads the file (tests filter on the name).
log = logging.getLogger("signclip_jax.convert")

PREFIX = "mmmodel."  # fairseq's FairseqMMModel wraps MMFusionSeparate as `mmmodel`
META_KEY = "signclip_jax"  # our extra top-level key in a fairseq dict
META_FORMAT = "signclip-jax/mmpt"
FROM_PYTORCH = "convert from-pytorch"
_LAYER = re.compile(r"^(video_encoder\.bert|text_encoder)\.encoder\.layer\.(\d+)\.")


def _safe_pickle(what: str) -> ModuleType:
    """signclip_jax.interop.safe_pickle (torch's unpickler machinery: imported with torch)."""
    extras.require("torch", "torch", what)
    from signclip_jax.interop import safe_pickle

    return safe_pickle


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
        for key in position_id_keys():
            shapes[PREFIX + key] = (1, mcfg.bert.max_position_embeddings)
    return shapes


def position_id_keys() -> tuple[str, str]:
    """The two position_ids buffers transformers < 4.31 keeps in a BertModel's state_dict."""
    return ("video_encoder.bert.embeddings.position_ids", "text_encoder.embeddings.position_ids")


# ------------------------------------------------------------------------------------ reading
def load_torch_file(path: str | Path) -> Any:
    """A torch.save file (zip or legacy format) read on the CPU by `safe_pickle`: tensors exactly
    as torch.load(weights_only=True) reads them; objects of other classes (fairseq configs,
    meters, version objects) as inert placeholders (`safe_pickle.placeholders_in` finds them).

    A pickle that names code (os.system, eval, subprocess, ...) is a UserError; nothing of the
    file is run either way. Needs torch (MissingExtra without it).
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
    """A tensor of a checkpoint as numpy; 16-bit floats widened to float32 (exact)."""
    torch = sys.modules.get("torch")  # imported by whoever read a .pt; never imported here
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # bf16 has no numpy form
        return t.numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.name in ("float16", "bfloat16"):
            return value.astype(np.float32)
        return value
    name = getattr(value, "pickled_name", None)  # a safe_pickle placeholder
    what = f"an object of {name}, a class not loaded" if name else f"a {type(value).__name__}"
    raise DataError(f"{source}: {key} is {what}, not a tensor")


def read_source(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """A release folder, a fairseq dict / bare state_dict (.pt) or a bare .safetensors ->
    (bare state_dict as numpy without `mmmodel.` prefix or position_ids buffers, our meta or
    None, kind: "hf" | "mmpt" | "state_dict"). Only a .pt file needs torch."""
    path = Path(path)
    if path.is_dir():
        config = release.read_pretrained_config(path)
        weights = release.read_weights_numpy(path)
        sd = {k: _to_numpy(v, k, str(path)) for k, v in weights.items()}
        return _strip(sd), config, "hf"
    if path.suffix == ".safetensors" and path.is_file():  # a bare state_dict
        weights = release.read_safetensors_numpy(path)
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
        if bare in position_id_keys():
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


# ------------------------------------------------------------------------------------ import
@dataclasses.dataclass
class Imported:
    """What the run directory of an imported checkpoint holds: the training config, the network
    config, the parameters {"model", "loss"}, the tokenizer, and checkpoints/0's metadata."""

    config: ml_collections.ConfigDict
    model_config: signclip_model.SignCLIPConfig
    params: dict[str, Any]
    tokenizer: Any
    step_meta: dict[str, Any]


def prepare_import(
    input: str | Path,
    *,
    text_model: str | None = None,
    num_heads: int | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
) -> Imported:
    """Reads `input` (read_source) and builds the run it becomes, strictly: every tensor of
    the architecture with its shape (PyTorch layout), no extras, float only. Writes nothing."""
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
    if kind == "hf" and release.has_tokenizer(input):
        tokenizer = text_lib.load_tokenizer(str(Path(input)))
    elif kind == "hf":
        missing = f"{input} has no tokenizer files ({' / '.join(release.TOKENIZER_FILES)})"
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

    expected = {k[len(PREFIX) :]: v for k, v in mmpt_key_shapes(mcfg).items()}
    release.check_state_dict(expected, sd, source=f"{where} (keys without the {PREFIX} prefix)")
    release.check_floating(sd, source=where)  # an int weight or bias would load as garbage
    abstract = signclip_model.abstract_model(mcfg)
    report = signclip_model.from_state_dict(abstract, sd, source=where)
    params = {"model": nnx.state(abstract, nnx.Param), "loss": _loss_params(config, meta)}
    step_meta = {"converted_from": str(input), "source_format": kind, "tensors": len(report.loaded)}
    return Imported(config, mcfg, params, tokenizer, step_meta)


def write_run(directory: str | Path, imported: Imported) -> None:
    """The run directory training would write, into the existing (empty, absolute) `directory`,
    with the imported parameters as checkpoints/0."""
    run_lib.save_config(directory, imported.config)
    run_lib.save_model_files(directory, imported.model_config, imported.tokenizer)
    ckpt = ckpt_lib.Checkpointer(directory, keep=1, keep_best=0, async_save=False)
    try:
        ckpt.save(0, params=imported.params, train_state={"step": np.int32(0)},
                  meta=imported.step_meta, force=True)  # fmt: skip
    finally:
        ckpt.close()


def import_checkpoint(
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
    initialises training with `--config.init_from=OUT`. Written under a temporary name and
    renamed into place; an existing `out` is refused unless `force`.
    """
    release.check_output(out, force)
    imported = prepare_import(
        input, text_model=text_model, num_heads=num_heads, config_file=config_file,
        overrides=overrides,
    )  # fmt: skip
    with release.staged_output(out, force=force, directory=True) as tmp:
        write_run(tmp, imported)
    return Path(out)
