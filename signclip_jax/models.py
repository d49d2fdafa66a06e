"""Model references: one name for a trained model wherever it lives (`--model=REF`, `load`).

REF is one of
  a run directory         what `train` or `convert from-pytorch` writes: used in place (its
                          latest checkpoint, or the best with --which=best)
  a step directory        RUN/checkpoints/N: that checkpoint
  a release folder        `convert to-pytorch --format=hf` output (model.safetensors, config.json,
                          tokenizer, model card): imported once into a run directory in the
                          model cache, then used from there
  hf-hub:ORG/NAME[@REV]   a release folder on the Hugging Face Hub: fetched by huggingface_hub
                          (its cache: HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE; HF_TOKEN; the
                          HTTPS_PROXY family), then as a release folder. REV: a branch, tag or
                          commit (default main)

`resolve(REF)` gives the (workdir, checkpoint) pair that `run.load_run` takes, so every command
that loads a run accepts --model beside --workdir / --checkpoint (`cli.add_checkpoint_args`,
then `checkpoint_args(args)`), and `load(REF)` gives a `Model` that embeds poses and texts.

The model cache (SIGNCLIP_MODEL_CACHE, default ~/.cache/signclip_jax/models) holds one run
directory per release content: its name is a hash of the folder's weights, config and tokenizer
files (`release_key`), so a changed release is imported again and an unchanged one, under any
path or Hub revision, is not. An import is written to a temporary folder and renamed into
place, so concurrent processes never see half a run; the loser of a race uses the winner's.
A release needs neither torch nor network once it is in the Hub cache: with HF_HUB_OFFLINE=1
(or no reachable hub) the cached snapshot is used, and a model that is not cached is one
clear error.

Nothing here imports JAX until a release is imported or a model loaded, so the PyTorch twin
(interop/torch_twin.py) resolves hf-hub references through `hub_snapshot` without it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from signclip_jax import __version__, files
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
from signclip_jax.interop import release

log = logging.getLogger("signclip_jax.models")

HUB_PREFIX = "hf-hub:"
CACHE_ENV = "SIGNCLIP_MODEL_CACHE"
# Part of every cache key: bump it when an import would write a different run directory.
IMPORT_VERSION = 1
IMPORT_MARKER = ".signclip-import.json"  # written last into a cached run: it is complete
# The files of a release that make the model (weights, configs, tokenizer), fetched from the
# Hub and hashed for the cache key; the model card and anything else are not.
RELEASE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ references
def is_hub_ref(ref: Any) -> bool:
    """True for "hf-hub:..." (whether or not the rest is valid)."""
    return isinstance(ref, str) and ref.startswith(HUB_PREFIX)


def check_repo_id(repo_id: str, what: str) -> str:
    """`repo_id` ("ORG/NAME" or "NAME") if the Hub accepts it, else a UserError naming `what`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"{what}: {repo_id!r} is not a Hub repository id ({e})") from None
    return repo_id


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """ "hf-hub:ORG/NAME[@REVISION]" -> (repo id, revision or None)."""
    if not is_hub_ref(ref):
        raise UserError(f"{ref!r} is not a Hub reference ({HUB_PREFIX}ORG/NAME[@REVISION])")
    body = ref[len(HUB_PREFIX) :].strip()
    repo_id, at, revision = body.partition("@")  # a repo id has no "@"; a branch may have "/"
    if not repo_id or (at and not revision):
        raise UserError(f"{ref!r}: expected {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION")
    return check_repo_id(repo_id, ref), (revision or None)


def name_of(ref: str | os.PathLike) -> str:
    """A short human name of a reference: NAME of hf-hub:ORG/NAME, else the folder's name
    (a step directory: its run's)."""
    ref = str(ref)
    if is_hub_ref(ref):
        return parse_hub_ref(ref)[0].split("/")[-1]
    path = Path(ref.rstrip("/"))
    if path.parent.name == "checkpoints" and path.name.isdigit():
        path = path.parent.parent
    return path.name or "model"


# --------------------------------------------------------------------------------- the Hub
def hub_snapshot(ref: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The local folder of release `ref` (hf-hub:ORG/NAME[@REV]) in the Hugging Face cache,
    downloaded first when the hub is reachable and HF_HUB_OFFLINE is not set.

    `cache_dir`: the hub cache (default: huggingface_hub's, HF_HUB_CACHE / HF_HOME). Offline
    or unreachable, only the cache is read: a model that is not there is a UserError saying so,
    never a wait. The folder must be a signclip-jax release (config.json format checked).
    """
    repo_id, revision = parse_hub_ref(ref)
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = text_lib.hub_offline()
    local_only = offline or not text_lib.hub_reachable()
    where = f"the Hugging Face cache ({cache_dir or _hub_cache()})"
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_only,
            allow_patterns=[*RELEASE_PATTERNS, release.MODEL_CARD],
            library_name="signclip-jax",
            library_version=__version__,
        )
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{ref}: the repository has no revision {revision!r}") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        raise UserError(
            f"{ref}: no such model repository on the Hub, or it is private or gated (log in "
            "with `hf auth login` or set HF_TOKEN)"
        ) from None
    except hf_errors.LocalEntryNotFoundError:  # IncompleteSnapshotError is one too
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is not reachable"
        raise UserError(
            f"{ref} is not in {where} and {why}: download it once where the hub is "
            f"reachable (`{fetch}`, with the same HF_HOME / HF_HUB_CACHE)"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{ref}: cannot download it: {first}") from None
    if not release.is_release_folder(folder):
        raise UserError(
            f"{ref} is not a signclip-jax release: its {release.HF_CONFIG} does not have format "
            f"{release.HF_FORMAT!r} (upload the folder `convert to-pytorch --format=hf` writes)"
        )
    return str(folder)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


# --------------------------------------------------------------------- release -> cached run
def cache_dir() -> Path:
    """Where imported releases live: SIGNCLIP_MODEL_CACHE, else ~/.cache/signclip_jax/models."""
    default = os.path.join("~", ".cache", "signclip_jax", "models")
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or default)).absolute()


def _release_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or not path.is_file():
            continue
        if any(fnmatch.fnmatch(path.name, p) for p in RELEASE_PATTERNS):
            out.append(path)
    return out


def _digest(path: Path) -> str:
    """sha256 of a file's content. In a Hugging Face cache snapshot a large (LFS) file links to
    blobs/<its sha256>, checked on download: that name is taken instead of reading the weights
    again. (Small files' blobs are named by git's sha1: those are hashed here.)"""
    target = Path(os.path.realpath(path))
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def release_key(folder: str | os.PathLike) -> str:
    """The cache key of a release folder: sha256 of its model files' names and content hashes
    (not of its path or model card) and of IMPORT_VERSION. A folder and its Hub snapshot
    share it."""
    h = hashlib.sha256(f"signclip-jax release import v{IMPORT_VERSION}\n".encode())
    for path in _release_files(Path(folder)):
        h.update(f"{path.name}\0{_digest(path)}\n".encode())
    return h.hexdigest()[:32]


def _complete(run_dir: Path) -> bool:
    return (run_dir / IMPORT_MARKER).is_file()


def is_cached_run(run_dir: str | os.PathLike) -> bool:
    """True when `run_dir` is an imported release in the model cache (not a user's run)."""
    return not files.is_remote(run_dir) and _complete(Path(str(run_dir)))


def import_release(folder: str | os.PathLike, *, source: str | None = None) -> Path:
    """The run directory of release `folder` in the model cache, imported now if not there yet
    (interop/importer.py; no torch needed). `source` (e.g. the hf-hub reference) is recorded in
    the run's import marker."""
    folder = Path(folder)
    release.read_pretrained_config(folder)  # a clear error before hashing the weights
    key = release_key(folder)
    root = cache_dir()
    target = root / key
    if _complete(target):
        return target
    from signclip_jax.interop import importer  # JAX: only for a new import

    log.info("importing %s into the model cache %s", source or folder, target)
    imported = importer.prepare_import(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = release.fresh_dir(root, f".{key}.")
    except OSError as e:
        raise UserError(f"cannot write the model cache {root} ({CACHE_ENV}): {e}") from None
    try:
        importer.write_run(staging, imported)
        marker = {
            "source": source or str(folder.absolute()),
            "release_key": key,
            "import_version": IMPORT_VERSION,
            "signclip_jax_version": __version__,
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        files.write_json_atomic(staging / IMPORT_MARKER, marker, sort_keys=True)
        _publish(staging, target)
    finally:
        release.remove(staging)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Renames the finished `staging` run to `target`. Another process may have published the
    same import meanwhile (then its copy is kept); an incomplete left-over is replaced."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if _complete(target):
            return  # the same content, imported by someone else
    aside = target.parent / f".{target.name}.{os.getpid()}.old"
    os.rename(target, aside)  # an incomplete folder (e.g. files deleted by hand)
    try:
        os.rename(staging, target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------- resolving
def _looks_like_repo_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@\S+)?", ref))


def resolve(
    ref: str | os.PathLike, *, hub_cache: str | os.PathLike | None = None
) -> tuple[str | None, str | None]:
    """(workdir, checkpoint) for `run.load_run` of model reference `ref` (see the module doc):
    a run directory -> (it, None); a step directory -> (None, it); a release folder or
    hf-hub:ORG/NAME[@REV] -> (its cached run directory, None). UserError for anything else.
    `hub_cache`: the Hugging Face cache to read (default: huggingface_hub's)."""
    ref = str(ref).strip()
    if not ref:
        raise UserError("--model is empty: give a run directory, a release folder or "
                        f"{HUB_PREFIX}ORG/NAME")  # fmt: skip
    if is_hub_ref(ref):
        return str(import_release(hub_snapshot(ref, cache_dir=hub_cache), source=ref)), None
    if files.is_remote(ref):  # gs://: runs only (a release is imported from a local folder)
        path = files.as_path(ref)
        if (path / "params").exists():
            return None, ref
        if (path / "model_config.json").exists():
            return ref, None
        raise UserError(f"--model {ref} is not a run directory (no model_config.json); a "
                        "release folder must be local or on the Hub")  # fmt: skip
    path = Path(ref).expanduser()
    if not path.exists():
        hint = (f"; for a Hub model write --model={HUB_PREFIX}{ref}"
                if _looks_like_repo_id(ref) else "")  # fmt: skip
        raise UserError(f"--model {ref} does not exist{hint}")
    if not path.is_dir():
        raise UserError(
            f"--model {ref} is a file; give a run directory, a release folder or "
            f"{HUB_PREFIX}ORG/NAME (a .pt checkpoint: `convert from-pytorch` it into a run)"
        )
    if (path / "params").is_dir():
        return None, str(path)
    if (path / "model_config.json").is_file() or (path / "checkpoints").is_dir():
        return str(path), None
    if release.is_release_folder(path):
        return str(import_release(path)), None
    raise UserError(
        f"--model {ref} is neither a run directory (model_config.json, checkpoints/) nor a "
        f"release folder ({release.HF_CONFIG} of format {release.HF_FORMAT!r}, "
        f"{release.HF_WEIGHTS})"
    )


def checkpoint_args(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(workdir, checkpoint) of the flags of `cli.add_checkpoint_args`: --model resolved,
    else --workdir / --checkpoint as given."""
    model = getattr(args, "model", None)
    if model:
        return resolve(model)
    return getattr(args, "workdir", None), getattr(args, "checkpoint", None)


# ------------------------------------------------------------------------------ Python use
class Model:
    """A loaded model: `signclip_jax.load(REF)`.

    `run` is the restored run (run.Run: config, model_config, model, tokenizer, step) and
    `embedder` serving's Embedder, which embeds each pose on its own mask (the result never
    depends on batch-mates) with jitted towers over all local devices.
    """

    def __init__(self, run: Any, *, batch_size: int = 64):
        from signclip_jax.serving import embedder as embedder_lib

        self.run = run
        self.embedder = embedder_lib.Embedder(run, batch_size=batch_size)

    @property
    def hidden_size(self) -> int:
        return int(self.run.model_config.hidden_size)

    @property
    def settings(self):
        """The input settings (pose spec, prompt template, text length) it was trained with."""
        return self.embedder.settings

    def prompt(self, text: str, *, spoken: str | None = None, signed: str | None = None) -> str:
        """`text` in the prompt format of training, e.g. "house" -> "<en> <ase> house"
        (spoken / signed language codes: default the data's)."""
        s = self.settings
        signed = signed or s.sign_language
        return text_lib.render_prompt(
            s.prompt_template,
            text=text,
            spoken=spoken or s.spoken_language,
            signed=signed,
            signed_name=dict(s.signed_names).get(signed, signed),
        )

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts used as given (write the prompt, or use `prompt`) -> [N, H] float32."""
        return self.embedder.embed_texts([texts] if isinstance(texts, str) else list(texts))

    def embed_poses(self, poses: Sequence[Any]) -> np.ndarray:
        """Poses -> [N, H] float32. Each one a `.pose` path or its bytes, a pose_format.Pose,
        or features [T, D] (D = settings.spec.feature_dim); the first max_frames frames count."""
        from pose_format import Pose

        from signclip_jax.data import pose as pose_lib

        spec = self.settings.spec
        features = []
        for i, item in enumerate(poses):
            if isinstance(item, np.ndarray):
                features.append(item)
            elif isinstance(item, Pose):
                arr = pose_lib.pose_to_array(item, spec, name=f"pose {i}")
                features.append(pose_lib.to_features(arr, spec))
            elif isinstance(item, str | os.PathLike | bytes | bytearray):
                features.append(self.embedder.pose_features(item))
            else:
                raise UserError(
                    f"pose {i}: a {type(item).__name__}; expected a .pose path or bytes, a "
                    "pose_format.Pose or a features array [T, D]"
                )
        return self.embedder.embed_features(features)

    def __repr__(self) -> str:
        return f"Model({self.run.step_dir}, hidden_size={self.hidden_size})"


def load(
    ref: str | os.PathLike,
    *,
    which: str = "latest",
    dtype: str | None = None,
    batch_size: int = 64,
) -> Model:
    """The model `ref` names (run directory, step directory, release folder or
    hf-hub:ORG/NAME[@REV]), restored onto the first local device, ready to embed.

    `dtype` overrides the compute dtype (e.g. "bfloat16"); `which` picks a run's latest or
    best checkpoint; `batch_size` is the most rows per model call.
    """
    from signclip_jax import run as run_lib

    workdir, checkpoint = resolve(ref)
    return Model(
        run_lib.load_run(workdir, checkpoint, which=which, dtype=dtype), batch_size=batch_size
    )
