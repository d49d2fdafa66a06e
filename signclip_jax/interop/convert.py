r"""Checkpoint converter: Orbax workdir <-> PyTorch.

  # the original MMPT/fairseq layout (reference section 8): strict-loadable by MMFusionSeparate
  python -m signclip_jax.convert to-pytorch --workdir=runs/st --format=mmpt --out=checkpoint_best.pt
  # a release folder: a Hub model repository (--model, TorchSignCLIP.from_pretrained)
  python -m signclip_jax.convert to-pytorch --workdir=runs/st --format=hf --out=release/ \
      [--repo_id=ORG/NAME] [--license=mit]
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

hf: a release folder, a complete Hugging Face model repository (interop/release.py): the
weights as model.safetensors, config.json, the tokenizer and a model card README.md generated
from the run (interop/model_card.py: prompt format, pose features, training, the run's
evaluation numbers). Upload it (`hf upload ORG/NAME FOLDER`) and every command takes
`--model=hf-hub:ORG/NAME` (signclip_jax/models.py).

from-pytorch is interop/importer.py behind a command line: it runs nothing from the file
(interop/safe_pickle.py, driven by torch.load), checks every tensor, infers the architecture
from the shapes and writes a run directory. `--input` may also be hf-hub:ORG/NAME[@REVISION].

Both directions need PyTorch, an optional extra (`pip install 'signclip-jax[torch]'`): it
is imported where it is used, so `--help` works without it and a missing torch is one line.
(`--model=RELEASE_FOLDER` in the other commands imports a release without torch.)
The model and tokenizer are built by signclip_jax/run.py, the one factory: to-pytorch reads a
run with `run.load_run`; from-pytorch turns the file into a training config
(`importer.import_config`) that `run.source_from_config` builds, and writes a run directory.

Outputs are written under a temporary name and renamed into place; an existing --out is
refused unless --force.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from signclip_jax import __version__, cli, extras, models
from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.interop import importer, model_card, release
from signclip_jax.interop.importer import FROM_PYTORCH, META_FORMAT, META_KEY, PREFIX
from signclip_jax.model import signclip as signclip_model

log = logging.getLogger("signclip_jax.convert")

FORMATS = ("mmpt", "hf")
TO_PYTORCH = "convert to-pytorch"


def _torch(what: str) -> ModuleType:
    """torch, an optional extra: MissingExtra (one line naming the pip extra) without it."""
    return extras.require("torch", "torch", what)


def _twin(what: str) -> ModuleType:
    """signclip_jax.interop.torch_twin (all torch, so imported only once torch is there)."""
    _torch(what)
    from signclip_jax.interop import torch_twin

    return torch_twin


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
        for key in importer.position_id_keys():
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
    torch = _torch(TO_PYTORCH)
    ckpt = fairseq_checkpoint(run, dtype=dtype, position_ids=position_ids)
    with release.staged_output(out, force=force) as tmp:
        torch.save(ckpt, tmp)
    return Path(out)


def export_hf(
    run,
    out: str | Path,
    *,
    dtype: str = "fp32",
    force: bool = False,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Writes a release folder (atomically): a complete Hub model repository for
    `TorchSignCLIP.from_pretrained` and `--model`: weights, config.json, tokenizer and the
    model card README.md generated from the run (interop/model_card.py; `repo_id` goes into
    its usage examples, `license` into its front matter)."""
    torch_twin = _twin(TO_PYTORCH)
    meta = _export_meta(run, dtype, release.HF_FORMAT)
    extra = {k: meta[k] for k in ("loss", "training_config", "source")}
    config = torch_twin.pretrained_config(
        run.model_config.to_dict(), inputs=meta["inputs"], dtype=dtype, extra=extra
    )
    card = model_card.render(run, dtype=config["torch_dtype"], repo_id=repo_id, license=license)
    return torch_twin.write_pretrained(
        out,
        signclip_model.to_state_dict(run.model),
        config,
        tokenizer=run.tokenizer,
        card=card,
        force=force,
    )


def to_pytorch(
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    model: str | None = None,
    which: str = "latest",
    format: str,
    out: str | Path,
    dtype: str = "fp32",
    position_ids: bool = False,
    force: bool = False,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Restores a workdir's latest/best checkpoint, one step dir, or a `--model` reference
    (signclip_jax/models.py: run dir, release folder, hf-hub:ORG/NAME) and exports it."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {format!r}")
    if position_ids and format != "mmpt":
        raise UserError("--position_ids applies to --format=mmpt only")
    if (repo_id or license) and format != "hf":
        raise UserError("--repo_id and --license go into the model card of --format=hf")
    if repo_id:
        models.check_repo_id(repo_id, "--repo_id")
    twin = _twin(TO_PYTORCH)  # before the (long) restore, as the checks below
    twin.torch_dtype(dtype)
    twin.check_output(out, force)
    if model:
        workdir, checkpoint = models.resolve(model)
    run = run_lib.load_run(workdir, checkpoint, which=which)
    if format == "mmpt":
        _note_original_settings(run)
        return export_mmpt(run, out, dtype=dtype, position_ids=position_ids, force=force)
    return export_hf(run, out, dtype=dtype, force=force, repo_id=repo_id, license=license)


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
def read_source(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """importer.read_source for the command: needs torch (MissingExtra without it), as
    `from-pytorch` always has."""
    _torch(FROM_PYTORCH)
    return importer.read_source(path)


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
    """An original SignCLIP checkpoint, a state_dict or a release folder -> a run directory
    (importer.import_checkpoint). The command needs torch, whatever the input: one line
    naming the extra without it, before anything is read. `input` may be
    hf-hub:ORG/NAME[@REVISION], a release folder on the Hub (models.hub_snapshot)."""
    _torch(FROM_PYTORCH)
    if models.is_hub_ref(input):
        input = models.hub_snapshot(str(input))
    return importer.import_checkpoint(
        input,
        out,
        text_model=text_model,
        num_heads=num_heads,
        config_file=config_file,
        overrides=overrides,
        force=force,
    )


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
        "MMFusionSeparate (keys 'mmmodel.'-prefixed). hf: a release folder, a complete Hugging "
        "Face model repository (model.safetensors, config.json, tokenizer, a model card "
        "README.md generated from the run), loaded by --model=DIR or hf-hub:ORG/NAME once "
        "uploaded, and by signclip_jax.torch_twin.TorchSignCLIP.from_pretrained.",
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
    t.add_argument(
        "--repo_id", help="hf: the Hub repository ORG/NAME the folder is for (model card usage)"
    )
    t.add_argument(
        "--license",
        help="hf: the model card's license (a Hub license id, e.g. mit, cc-by-nc-4.0); "
        "default: the config's `license`, else 'other'",
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
    f.add_argument(
        "--input", required=True, help="FILE.pt, a release folder or hf-hub:ORG/NAME[@REVISION]"
    )
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
    if args.command == "from-pytorch" and models.is_hub_ref(args.input):
        models.parse_hub_ref(args.input)  # a bad reference: one line now
    elif args.command == "from-pytorch" and not Path(args.input).exists():
        raise UserError(f"--input {args.input} does not exist")
    if args.command == "to-pytorch":
        out = to_pytorch(
            workdir=args.workdir,
            checkpoint=args.checkpoint,
            model=args.model,
            which=args.which,
            format=args.format,
            out=args.out,
            dtype=args.dtype,
            position_ids=args.position_ids,
            force=args.force,
            repo_id=args.repo_id,
            license=args.license,
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
