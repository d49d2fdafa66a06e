"""Training configs: the package's defaults, config files, typed arguments and overrides.

`base_config()` is the original recipe; every file in configs/ starts from it and changes what
differs, so an installed package (no checkout) still has every default. `get_config(arg)` in
each config file receives the text after `:` in `--config=configs/x.py:arg`; `parse_arg` turns
`"key=value,flag"` into typed values. `section(config, "data")` accepts a whole config or the
section itself, for library functions that take either.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Collection, Iterable
from typing import Any

import ml_collections

from signclip_jax.errors import UserError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"a=1,b=x,flag"` against `defaults`, converting each value to its default's type.

    A bare name sets a boolean default to True. Unknown keys are an error.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise UserError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise UserError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
            continue
        out[key] = _convert(key, raw.strip(), default)
    return out


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"config argument {key}={raw!r} is not a boolean")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise UserError(
                f"config argument {key}={raw!r} is not a {type(default).__name__}"
            ) from None
    if isinstance(default, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise UserError(f"config argument {key}={raw!r} is not a tuple literal") from None
        return type(default)(value if isinstance(value, (tuple, list)) else (value,))
    return raw


# ---------------------------------------------------------------------------------------------
# --config.a.b=value overrides of a saved config (config.json of a workdir).


def parse_override_value(raw: str, current: Any, key: str) -> Any:
    """`raw` converted to the type of the value it replaces (a literal for new keys)."""
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--config.{key}={raw!r} is not a boolean")
    if isinstance(current, (int, float)):
        try:
            return type(current)(raw)
        except ValueError:
            if isinstance(current, int):
                try:  # an int field given a float ("1e3") that is whole
                    value = float(raw)
                    if value.is_integer():
                        return int(value)
                except ValueError:
                    pass
            raise UserError(f"--config.{key}={raw!r} is not a {type(current).__name__}") from None
    if isinstance(current, (list, tuple)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = [x.strip() for x in raw.split(",") if x.strip()]  # "en,de"
        if not isinstance(value, (list, tuple)):
            value = [value]
        return type(current)(value)
    if isinstance(current, str):
        return raw
    try:  # None or a new key: a Python literal, else the string itself
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(config, overrides: Iterable[str], *, new_keys: bool | Collection[str] = True):
    """A copy of `config` (ConfigDict) with "a.b=value" overrides applied.

    Existing keys keep their type; a new key is allowed where its parent exists (optional
    data keys such as data.pose_header), parsed as a Python literal or kept as a string, unless
    `new_keys` is False (or is a collection of the dotted keys that may be new). Used by
    evaluate, convert and bench (train uses ml_collections' flags).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"config override {item!r}: expected --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, p in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise UserError(
                    f"--config.{key}: {'.'.join(parents[: i + 1])} is not in the config"
                )
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: {'.'.join(parents)} is not a group of settings")
        current = node[leaf] if leaf in node else None
        if isinstance(current, ml_collections.ConfigDict):
            raise UserError(f"--config.{key} is a group; set one of its keys: {sorted(current)}")
        allowed = new_keys if isinstance(new_keys, bool) else key in new_keys
        if leaf not in node and not allowed:
            raise UserError(f"--config.{key}: unknown key (known: {sorted(node.keys())})")
        value = parse_override_value(raw, current, key)
        try:
            node[leaf] = value
        except TypeError:
            # A field that held None (or a literal of another type): replace, don't coerce.
            node[leaf] = None
            node[leaf] = value
    return config


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_signclip_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load config file {path}: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def section(config: Any, name: str) -> Any:
    """`config.NAME` when `config` is a whole config that has that section, else `config`.

    Library functions that read one section (data, model) accept either, so a caller can pass
    the whole config when a setting depends on another section (data.pose_dtype "auto")."""
    return getattr(config, name) if hasattr(config, name) else config


def get(node: Any, key: str, default: Any = None) -> Any:
    """`node[key]` of a ConfigDict, dict or plain object; `default` when absent or None."""
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


# ------------------------------------------------------------------------ the package's defaults


def base_config() -> ml_collections.ConfigDict:
    """The original SignCLIP baseline_temporal recipe (reference sections 1, 4, 6)."""
    c = ml_collections.ConfigDict()
    c.seed = 1  # fairseq's default seed
    c.batch_size = 448  # global: all devices, all hosts
    c.num_epochs = 25
    c.total_steps = 0  # > 0 overrides num_epochs
    c.microbatches = (
        1  # > 1: contrastive-correct accumulation (embed all, one loss, backprop per micro-batch)
    )
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.init_from = ""  # a checkpoint step dir or workdir to start from (fine-tuning)
    c.max_bad_steps = 100  # NaN/inf steps are skipped; more than this many fails the run
    # Persistent XLA compilation cache ("" = off; gs:// works). One train step of the original
    # recipe took ~100 s to compile on an H100 (BENCHMARKS.md), and every padded length
    # (data.length_buckets) is its own program: a restart or a second run reads them back.
    c.compilation_cache_dir = "~/.cache/signclip_jax/jax_cache"
    # JAX profiler trace of training steps START:STOP (Python range: "100:103" traces steps 100,
    # 101 and 102; "100" just step 100) into WORKDIR/profile/, for TensorBoard's profile tab
    # (tensorboard --logdir=WORKDIR). Every process traces its own host. "" = off.
    c.profile_steps = ""

    c.model = ml_collections.ConfigDict()
    c.model.text_model = "bert-base-cased"  # HF folder or hub name (tokenizer and weights)
    c.model.video_layers = 12
    c.model.projection = "none"  # none | linear | linear_l2
    c.model.pose_dim = 609
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.remat = False
    # xla | cudnn | auto (jax.nn.dot_product_attention implementation) | pallas (our flash
    # kernel with attention dropout, model/flash_dropout.py: Triton on GPU, opt-in, unmeasured)
    c.model.attention = "xla"
    c.model.pretrained = True  # initialise both towers from text_model's weights

    c.data = ml_collections.ConfigDict()
    c.data.source = "spreadthesign"
    c.data.csv_path = ""  # SperadTheSign.csv [sic]: pose, videoLanguage, language, text
    c.data.pose_dir = ""
    c.data.split_dir = ""  # {train,val,test}.txt row ids (1.0.0-uzh); empty -> generated split
    c.data.split_seed = 3407
    c.data.val_fraction = 0.001
    c.data.test_fraction = 0.001
    c.data.languages = ("en",)
    c.data.manifest = ""
    c.data.tfds_name = ""
    c.data.data_dir = ""
    c.data.shards = ""
    c.data.max_frames = 256
    c.data.pose_components = "reduced_face"
    c.data.include_z = True
    c.data.prompt_template = "spreadthesign"
    c.data.text_max_len = 64
    c.data.length_buckets = ()  # e.g. (64, 128, 256); empty -> always pad to max_frames
    # K > 1: training sorts each window of K batches by clip length before cutting batches, so
    # the buckets pad less (without it the longest of 448 clips is nearly always > 192 frames).
    # Batches then hold clips of similar length (their negatives too). 0 = off, as the original.
    c.data.length_group_batches = 0
    # Host dtype of the poses. auto: model.dtype when it is 16-bit (the same embeddings bit for
    # bit, half the bytes to move and hold), else float32.
    c.data.pose_dtype = "auto"
    c.data.workers = 4
    c.data.max_bad_fraction = 0.01
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.temporal = True
    c.data.augment.temporal_std = 0.2
    c.data.augment.spatial = False
    c.data.augment.spatial_std = 0.2
    c.data.augment.noise = False
    c.data.augment.noise_std = 0.001
    c.data.augment.flip_prob = 0.0
    c.data.augment.frame_dropout_rate = 0.0
    # Augment inside the jitted train step (data/augment_device.py): the host only reads, pads
    # and draws each clip's resampled frame count (same distributions as data/augment.py, exact
    # resume, other random draws than it). False: augment on the host, in the grain workers.
    c.data.augment_on_device = True
    # Clip packing (data/clip_packing.py): several clips share a row of the video tower, so
    # attention and the layers run on real frames instead of padding (the same embeddings and
    # loss; random batches stay random). The host sends each batch's clips and the rows'
    # slots; the step packs them after its augmentation. Each (rows, caption length) pair is
    # one compiled program: rows are rounded up to packing_row_multiple, captions to
    # packing_text_multiple tokens. Use it without length_buckets (they only add programs).
    c.data.packing = False
    c.data.packing_row_len = 0  # tokens per row; 0: max_frames + 2 (one full clip)
    c.data.packing_row_multiple = 8
    c.data.packing_text_multiple = 8

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "signclip"  # signclip | clip | siglip

    # fairseq Adam + polynomial_decay (power 1, end 0) as the original (train/optim.py).
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay_steps = 1_000_000  # fairseq total_num_update
    c.optimizer.end_lr = 0.0
    c.optimizer.clip_norm = 2.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1)  # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp")

    # What training evaluates (evaluation/evaluators.py, the classes `evaluate` runs): name ->
    # type (retrieval | zeroshot | fewshot | probe), split, every_steps (0: eval_every_steps,
    # < 0: off; every evaluator also runs at the last step), the type's settings. Logged as
    # metrics.jsonl rows with "split": NAME and checkpoint metrics NAME/KEY (val/loss picks
    # the best checkpoint).
    c.evals = ml_collections.ConfigDict()
    c.evals.val = ml_collections.ConfigDict({"type": "retrieval", "split": "val"})
    # Zero-shot recognition of the val split's signs, off unless asked for, e.g.
    # --config.evals.zeroshot.every_steps=0 (then as often as val).
    c.evals.zeroshot = ml_collections.ConfigDict(
        {"type": "zeroshot", "split": "val", "every_steps": -1}
    )
    return c
