"""What one server worker needs: `ServeSettings`, from flags or SIGNCLIP_* environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from signclip_jax.errors import UserError

ENV_PREFIX = "SIGNCLIP_"
DEFAULT_NAME = "default"  # the name of a single unnamed model, as the original's
MODEL_SEPARATOR = ";"  # between the entries of SIGNCLIP_MODEL
# A model name (NAME=REF): no "/", ":" or "=", so that a path or hf-hub:ORG/NAME never reads as one.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What one worker needs. `from_env()` reads each field from SIGNCLIP_<FIELD> (upper case),
    e.g. SIGNCLIP_WORKDIR, SIGNCLIP_BATCH_SIZE, SIGNCLIP_MAX_BODY_BYTES."""

    workdir: str | None = None
    checkpoint: str | None = None  # a step directory; wins over workdir
    # Models to serve, each "REF" or "NAME=REF" (models.py: a run directory, a step directory,
    # a release folder or hf-hub:ORG/NAME[@REV]); instead of workdir / checkpoint. A string is
    # one entry; SIGNCLIP_MODEL separates entries with ";".
    model: tuple[str, ...] | str | None = None
    which: str = "latest"  # checkpoint of workdir: latest or best
    dtype: str | None = None  # compute dtype override, e.g. bfloat16
    model_name: str = DEFAULT_NAME  # the name of a single model given without NAME=
    batch_size: int = 32  # rows per model call and tower
    batch_wait_ms: float = 2.0  # how long the model thread waits for more requests to merge
    max_queue: int = 256  # requests waiting for the model before new ones get 503
    request_timeout_s: float = 120.0  # a request waiting longer for the model gets 503
    max_body_bytes: int = 16 * 2**20  # whole request body (base64 inflates .pose bytes by 4/3)
    max_items: int = 64  # poses (+ videos) or texts per request
    max_text_chars: int = 2000  # per text (the tokenizer keeps text_max_len word pieces anyway)
    max_pose_frames: int = 10_000  # per pose file; frames past max_frames are ignored anyway
    # A request's headers (body) must arrive within this many seconds of their first byte, or
    # the client gets 408 and the connection closes: a slow or stalled client cannot hold a
    # request thread (enforced by server.py's worker class, ServeWorker).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0  # 16 MiB in 60 s: clients slower than ~280 KB/s are cut off
    warm_up: bool = True  # compile every shape before /ready says ready
    # create_app() returns once the model is ready, so a gunicorn worker accepts connections
    # only when it can answer them (gunicorn's --timeout must exceed the load time unless a
    # heartbeat is given, as `python -m signclip_jax.serve` does). False: load in the
    # background, answer 503 and let /ready tell a load balancer when to send traffic.
    wait_for_model: bool = True
    exit_on_load_error: bool = True  # a worker without a model exits (gunicorn then stops)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = ENV_PREFIX + field.name.upper()
            if key in environ:
                values[field.name] = _parse_env(key, environ[key], field.default)
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> ServeSettings:
        entries = self.model
        if isinstance(entries, str):
            entries = [e for e in entries.split(MODEL_SEPARATOR) if e.strip()]
        entries = tuple(e.strip() for e in entries or ())
        if entries and (self.workdir or self.checkpoint):
            raise UserError("give either --model=REF (repeatable) or --workdir / --checkpoint")
        if not entries and not self.workdir and not self.checkpoint:
            raise UserError(
                "no model: give --workdir=DIR, --checkpoint=STEP_DIR or --model=REF"
                f" ({ENV_PREFIX}WORKDIR, {ENV_PREFIX}CHECKPOINT or {ENV_PREFIX}MODEL for "
                "create_app())"
            )
        if not _NAME.match(self.model_name):
            raise UserError(f"model_name {self.model_name!r}: use letters, digits, _ . + -")
        self = dataclasses.replace(self, model=entries or None)
        self.served()  # names: valid and distinct
        if self.which not in ("latest", "best"):
            raise UserError(f"which must be 'latest' or 'best', got {self.which!r}")
        for name in ("batch_size", "max_queue", "max_body_bytes", "max_items", "max_text_chars",
                     "max_pose_frames"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            raise UserError("batch_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise UserError("header_timeout_s and body_timeout_s must be > 0")
        return self

    def served(self) -> list[tuple[str, str]]:
        """[(name, REF)] of the models to serve, in order (the first is the default);
        REF "" stands for workdir / checkpoint. A single model without NAME= is called
        model_name ("default"); several take their folder's (or Hub repository's) name.
        UserError for an empty entry, a bad name or two models of one name."""
        entries = (self.model,) if isinstance(self.model, str) else (self.model or ())
        if not entries:
            return [(self.model_name, "")]
        out: list[tuple[str, str]] = []
        for entry in entries:
            name, ref = split_model_entry(entry)
            if name is None:
                name = self.model_name if len(entries) == 1 else _name_of(ref)
            out.append((name, ref))
        names = [name for name, _ in out]
        for name in names:
            if names.count(name) > 1:
                raise UserError(
                    f"--model: two models are named {name!r}; name them with --model=NAME=REF"
                )
        return out


def split_model_entry(entry: str) -> tuple[str | None, str]:
    """ "NAME=REF" -> (NAME, REF); "REF" -> (None, REF). Text before the first "=" is a NAME
    only when it is one (no "/", ":" ...), so a path holding "=" stays a REF."""
    name, eq, ref = entry.strip().partition("=")
    if eq and _NAME.match(name.strip()):
        name, ref = name.strip(), ref.strip()
    else:
        name, ref = None, entry.strip()
    if not ref:
        raise UserError(f"--model {entry!r}: no model reference (REF or NAME=REF)")
    return name, ref


def _name_of(ref: str) -> str:
    from signclip_jax import models  # no JAX at import: safe in gunicorn's master

    name = models.name_of(ref)
    return name if _NAME.match(name) else re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _parse_env(key: str, raw: str, default: Any) -> Any:
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UserError(f"{key}={raw!r}: expected a {type(default).__name__}") from None
    return raw or default  # empty: the default (None for paths)


__all__ = ["DEFAULT_NAME", "ENV_PREFIX", "ServeSettings", "split_model_entry"]
