"""Release folders without PyTorch: the format, reading one as numpy, staged writes.

A release folder (`python -m signclip_jax.convert to-pytorch --format=hf`) is a complete
Hugging Face model repository: `model.safetensors` (the original MMFusionSeparate state_dict
keys, no `mmmodel.` prefix), `config.json` (format tag and version, the model config with its
BERT config, the input settings, the training config and loss), the tokenizer files and a
generated model card, `README.md` (interop/model_card.py).

The PyTorch twin (interop/torch_twin.py) reads it with torch; the JAX side (interop/importer.py,
signclip_jax/models.py) with this module, which needs neither torch nor JAX: a release
imports into a run directory on the core install.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from signclip_jax.errors import DataError, UserError

# The release folder format (config.json "format" / "format_version").
HF_FORMAT = "signclip-jax/torch-twin"
HF_FORMAT_VERSION = 1
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
MODEL_CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either one makes a loadable BERT tokenizer


def is_release_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder with a release config.json (format tag checked)."""
    file = Path(path) / HF_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == HF_FORMAT


def read_pretrained_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a release folder, checked (UserError naming the file when it is not one)."""
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        raise UserError(f"{path} is not a signclip-jax release folder (no {HF_CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != HF_FORMAT:
        raise UserError(f"{file}: not a signclip-jax release config (format != {HF_FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > HF_FORMAT_VERSION:
        raise UserError(
            f"{file}: format_version {version!r} is newer than this code reads "
            f"({HF_FORMAT_VERSION}); update signclip-jax"
        )
    if not isinstance(config.get("model"), dict) or "bert" not in config["model"]:
        raise UserError(f"{file}: no model config (key 'model' with its 'bert' config)")
    return config


def read_safetensors_numpy(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays in their stored dtype (bf16 through ml_dtypes);
    DataError naming the file when it cannot be read."""
    import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy, which safetensors asks for)
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise DataError(f"cannot read {file}: {e}") from None


def read_weights_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """model.safetensors of a release folder as numpy arrays (dtype as stored), float only."""
    file = Path(path) / HF_WEIGHTS
    if not file.is_file():
        raise UserError(f"{path} has no {HF_WEIGHTS}")
    weights = read_safetensors_numpy(file)
    check_floating(weights, source=str(file))
    return weights


def check_state_dict(expected: Mapping[str, Any], given: Mapping[str, Any], *, source: str) -> None:
    """DataError naming missing, unexpected and mis-shaped tensors of `given` (one line).

    Values are tensors/arrays, or (in `expected`) shape tuples.
    """
    shape = lambda v: tuple(v) if isinstance(v, tuple | list) else tuple(v.shape)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k} {shape(given[k])} != {shape(expected[k])}"
        for k in expected
        if k in given and shape(given[k]) != shape(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"missing tensor(s) {missing}")
    if unexpected:
        parts.append(f"unexpected tensor(s) {unexpected}")
    if mismatched:
        parts.append(f"shape mismatch (file != model) {mismatched}")
    if parts:
        raise DataError(f"cannot load {source}: " + "; ".join(parts))


def check_floating(tensors: Mapping[str, Any], *, source: str) -> None:
    """DataError naming the tensors (torch or numpy) that are not floating point.

    For state_dicts whose every tensor is a float parameter: a weight or bias stored as
    integers (or bools) is a corrupt or mis-written file, and casting it would load garbage.
    """
    wrong = []
    for key, value in tensors.items():
        if hasattr(value, "is_floating_point"):  # a torch tensor (torch is not imported here)
            ok, dtype = value.is_floating_point(), str(value.dtype).removeprefix("torch.")
        else:
            dtype = np.asarray(value).dtype
            # bfloat16 (ml_dtypes) is not a numpy floating subtype: its kind is "V"
            ok = np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"
            dtype = str(dtype)
        if not ok:
            wrong.append(f"{key} ({dtype})")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise DataError(
            f"{source}: {shown} not floating point where the model has float parameters "
            "(a corrupt or mis-converted file; re-export it)"
        )


def has_tokenizer(path: str | os.PathLike) -> bool:
    """True when the release folder holds tokenizer files (TOKENIZER_FILES)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


# ------------------------------------------------------------------------------ staged writes
def check_output(out: str | os.PathLike, force: bool) -> Path:
    """`out` as a Path; UserError when it exists and `force` is off."""
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    return out


def remove(path: Path) -> None:
    """Deletes a file, link or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def fresh_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder in `parent` with ordinary permissions (mkdtemp makes it private)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike, *, force: bool = False, directory: bool = False
) -> Iterator[Path]:
    """Yields a temporary path beside `out` (a fresh folder if `directory`); when the block
    succeeds it takes `out`'s place in one rename, else it is deleted. Readers never see a
    half-written `out`. An existing `out` is refused unless `force`."""
    out = check_output(out, force).absolute()  # Orbax refuses relative paths
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = fresh_dir(out.parent, f".{out.name}.")
    else:
        tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        if os.path.lexists(out):
            check_output(out, force)  # appeared meanwhile
            aside = out.parent / f".{out.name}.{os.getpid()}.old"
            remove(aside)
            os.replace(out, aside)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(aside, out)
                raise
            remove(aside)
        else:
            os.replace(tmp, out)
    finally:
        remove(tmp)
