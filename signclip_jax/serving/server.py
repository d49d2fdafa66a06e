r"""HTTP API over a trained model: `python -m signclip_jax.serve`.

  python -m signclip_jax.serve --workdir=runs/demo --port=3030 [--host=127.0.0.1] [--workers=1]
  # the same with gunicorn's own CLI (settings from SIGNCLIP_* environment variables;
  # --timeout covers the model load and compile, during which the worker cannot heartbeat):
  SIGNCLIP_WORKDIR=runs/demo gunicorn -k gthread --threads 32 -w 1 -b 127.0.0.1:3030 \
      --timeout 600 --no-control-socket 'signclip_jax.serve:create_app()'

Routes (the original `app.py`'s, reference section 9.1, plus extensions marked +):
  GET|POST /api/embed/text   {"text": str | [str, ...], "model_name"?: str}
  GET|POST /api/embed/pose   {"pose": base64 .pose | [...], "video"?+: base64 video | [...]}
      -> {"embeddings": [[H floats], ...]}  one row per input, raw (not normalised) vectors
  GET|POST /api/score +      {"pose": ..., "text": ...} -> {"scores": [[P x T dot products]]}
  GET /health +              liveness: {"status": "ok"}
  GET /ready +               200 {"status": "ready", ...} once the model is loaded and compiled
                             for every length bucket; 503 {"status": "loading"|"failed"} before
Errors are JSON {"error": message, "status": code}: 400 malformed request, 413 over a limit,
422 unusable pose data, 404/405 unknown route/method, 503 not ready/overloaded. `/api/*`
answers CORS requests from any origin, as flask_cors does for the original.

Differences from the original, on purpose:
- Each pose is embedded on its own mask. The original padded a request's poses to the longest
  and pooled the padding of the shorter ones (section 9.2), so its embeddings depended on the
  other poses of the request; here they never do.
- Poses longer than max_frames keep their first max_frames frames (the original asserted).
- POST is accepted as well as GET-with-a-body (many HTTP clients cannot send the latter).
- One model per server: `model_name` may be omitted or must equal the served name ("default"
  unless --model_name says otherwise); anything else is a 400, not a 500.
- Bad input of any kind is a 4xx with a JSON message, never a 500.
- Texts are embedded as given: send the prompt ("<en> <ase> house"), as with the original.

Inside one worker process: the model loads after the worker starts (JAX is not fork-safe, so
never in a gunicorn master: no --preload), then `Embedder.warm_up()` compiles every (rows,
length bucket) shape once; only then does the worker accept connections (or, with
SIGNCLIP_WAIT_FOR_MODEL=0, it answers 503 until /ready says ready). Request threads validate
and preprocess their input, then hand it to a single model thread (`Batcher`) that merges
concurrent requests (waiting at most batch_wait_ms) into batches of up to batch_size rows per
tower.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from signclip_jax import cli
from signclip_jax.errors import DataError, UserError

log = logging.getLogger("signclip_jax.serve")

ENV_PREFIX = "SIGNCLIP_"
APP_LOAD_ERROR = 4  # gunicorn's exit code for "App failed to load": the master then stops


# ---------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What one worker needs. `from_env()` reads each field from SIGNCLIP_<FIELD> (upper case),
    e.g. SIGNCLIP_WORKDIR, SIGNCLIP_BATCH_SIZE, SIGNCLIP_MAX_BODY_BYTES."""

    workdir: str | None = None
    checkpoint: str | None = None  # a step directory; wins over workdir
    which: str = "latest"  # checkpoint of workdir: latest or best
    dtype: str | None = None  # compute dtype override, e.g. bfloat16
    model_name: str = "default"  # the `model_name` requests may give
    batch_size: int = 32  # rows per model call and tower
    batch_wait_ms: float = 2.0  # how long the model thread waits for more requests to merge
    max_queue: int = 256  # requests waiting for the model before new ones get 503
    request_timeout_s: float = 120.0  # a request waiting longer for the model gets 503
    max_body_bytes: int = 16 * 2**20  # whole request body (base64 inflates .pose bytes by 4/3)
    max_items: int = 64  # poses (+ videos) or texts per request
    max_text_chars: int = 2000  # per text (the tokenizer keeps text_max_len word pieces anyway)
    max_pose_frames: int = 10_000  # per pose file; frames past max_frames are ignored anyway
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
        if not self.workdir and not self.checkpoint:
            raise UserError(
                "no model: give --workdir=DIR or --checkpoint=STEP_DIR"
                f" ({ENV_PREFIX}WORKDIR or {ENV_PREFIX}CHECKPOINT for create_app())"
            )
        if self.which not in ("latest", "best"):
            raise UserError(f"which must be 'latest' or 'best', got {self.which!r}")
        for name in ("batch_size", "max_queue", "max_body_bytes", "max_items", "max_text_chars",
                     "max_pose_frames"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            raise UserError("batch_wait_ms must be >= 0 and request_timeout_s > 0")
        return self


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


# ---------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}  # fmt: skip


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------- batching
@dataclasses.dataclass
class _Job:
    poses: list[np.ndarray]  # features [T_i, D]
    texts: list[str]
    future: concurrent.futures.Future


class Batcher:
    """One model thread: merges concurrent requests into batches for an `Embedder`.

    `submit(poses, texts)` returns a Future of (pose embeddings [P, H], text embeddings [T, H]).
    The thread takes every request already queued, then waits up to `wait_s` for more while a
    tower has fewer than `batch_size` rows, and runs each tower once on the merged rows
    (`Embedder` splits anything larger into batch_size chunks, so no new shapes compile).
    """

    def __init__(self, embedder: Any, *, batch_size: int, wait_s: float, max_queue: int):
        self.embedder = embedder
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.batches = 0  # model calls made (pose and text towers together): for tests/stats
        self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="signclip-model", daemon=True)
        self._thread.start()

    def submit(
        self, poses: Sequence[np.ndarray], texts: Sequence[str]
    ) -> concurrent.futures.Future:
        job = _Job(list(poses), list(texts), concurrent.futures.Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503, "server busy: too many requests waiting", {"Retry-After": "1"}
            ) from None
        return job.future

    def _collect(self) -> list[_Job]:
        jobs = [self._queue.get()]
        poses, texts = len(jobs[0].poses), len(jobs[0].texts)
        deadline = time.monotonic() + self.wait_s
        while poses < self.batch_size and texts < self.batch_size:
            try:  # everything already waiting, then whatever arrives before the deadline
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            jobs.append(job)
            poses, texts = poses + len(job.poses), texts + len(job.texts)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = [j for j in self._collect() if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            poses = [p for j in jobs for p in j.poses]
            texts = [t for j in jobs for t in j.texts]
            hidden = self.embedder.hidden_size
            pose_emb = self.embedder.embed_features(poses) if poses else np.zeros((0, hidden))
            text_emb = self.embedder.embed_texts(texts) if texts else np.zeros((0, hidden))
        except BaseException as e:  # every waiting request must hear of it
            log.exception("model call failed")
            for j in jobs:
                j.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(jobs)
        p = t = 0
        for j in jobs:
            j.future.set_result(
                (
                    pose_emb[p : p + len(j.poses)].astype(np.float32),
                    text_emb[t : t + len(j.texts)].astype(np.float32),
                )
            )
            p, t = p + len(j.poses), t + len(j.texts)


# ---------------------------------------------------------------------------------- model host
class ModelHost:
    """Loads the model in a background thread, then holds the Embedder and the Batcher.

    status: "loading" -> "ready" (loaded and, with warm_up, compiled) or "failed".
    """

    def __init__(self, settings: ServeSettings, *, exit_on_failure: bool = False):
        self.settings = settings
        self.exit_on_failure = exit_on_failure  # os._exit: the only way out of a thread
        self.status = "loading"
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.embedder: Any = None
        self.batcher: Batcher | None = None
        self._thread = threading.Thread(target=self._load, name="signclip-load", daemon=True)

    def start(self) -> ModelHost:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> str:
        self._thread.join(timeout)
        return self.status

    def _load(self) -> None:
        s = self.settings
        try:
            start = time.monotonic()
            from signclip_jax import run as run_lib  # jax starts here, in the worker, after fork
            from signclip_jax.serving import embedder as embedder_lib

            run = run_lib.load_run(s.workdir, s.checkpoint, which=s.which, dtype=s.dtype)
            embedder = embedder_lib.Embedder(run, batch_size=s.batch_size)
            loaded = time.monotonic()
            if s.warm_up:
                embedder.warm_up()
            self.embedder = embedder
            self.info = {
                "model_name": s.model_name,
                "checkpoint": str(run.step_dir),
                "step": run.step,
                "hidden_size": embedder.hidden_size,
                "max_frames": embedder.spec.max_frames,
                "feature_dim": embedder.spec.feature_dim,
                "length_buckets": list(embedder.settings.lengths),
                "batch_rows": list(embedder.row_sizes),
                "devices": len(embedder.mesh.devices.flat),
                "dtype": run.model_config.dtype,
                "load_s": round(loaded - start, 2),
                "warm_up_s": round(time.monotonic() - loaded, 2),
            }
            self.batcher = Batcher(
                embedder,
                batch_size=s.batch_size,
                wait_s=s.batch_wait_ms / 1000,
                max_queue=s.max_queue,
            )
            self.status = "ready"
            log.info("model ready (pid %d): %s", os.getpid(), json.dumps(self.info))
        except BaseException as e:  # reported through /ready or the exit code
            self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.status = "failed"
            if not isinstance(e, UserError):
                log.exception("loading the model failed")
            print(f"error: loading the model failed: {self.error}", file=sys.stderr, flush=True)
            if self.exit_on_failure:
                os._exit(APP_LOAD_ERROR)

    def require_ready(self) -> None:
        if self.status == "loading":
            raise ApiError(503, "model is loading; retry shortly", {"Retry-After": "2"})
        if self.status != "ready":
            raise ApiError(503, f"model failed to load: {self.error}")

    def embed(self, poses: Sequence[np.ndarray], texts: Sequence[str]):
        """-> (pose embeddings [P, H], text embeddings [T, H]) float32, via the model thread."""
        self.require_ready()
        assert self.batcher is not None
        future = self.batcher.submit(poses, texts)
        try:
            return future.result(timeout=self.settings.request_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ApiError(503, "timed out waiting for the model", {"Retry-After": "5"}) from None


# ---------------------------------------------------------------------------------- requests
def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Request body bytes -> JSON object, or ApiError(400)."""
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(body)}")
    return body


def string_items(body: dict[str, Any], field: str, limit: int) -> list[str] | None:
    """`field` as a non-empty list of strings (a single string is a list of one); None if absent."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(
            400, f"'{field}' must be a string or a list of strings, got {_json_type(value)}"
        )
    if not value:
        raise ApiError(400, f"'{field}' is an empty list")
    if len(value) > limit:
        raise ApiError(413, f"'{field}' has {len(value)} items; at most {limit} per request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(400, f"'{field}'[{i}] must be a string, got {_json_type(item)}")
    return value


def check_model_name(body: dict[str, Any], served: str) -> None:
    name = body.get("model_name", served)
    if not isinstance(name, str):
        raise ApiError(400, f"'model_name' must be a string, got {_json_type(name)}")
    if name != served:
        raise ApiError(400, f"unknown model_name {name!r}: this server serves {served!r}")


def check_texts(texts: list[str], max_chars: int) -> list[str]:
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise ApiError(413, f"'text'[{i}] has {len(text)} characters; at most {max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'text'[{i}] is not valid Unicode (lone surrogate)") from None
    return texts


def decode_base64(value: str, what: str) -> bytes:
    """Standard base64 (line breaks and spaces allowed, as `base64 FILE` writes) -> bytes."""
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what}: not valid base64 ({e})") from None
    if not data:
        raise ApiError(400, f"{what}: empty")
    return data


def pose_features(data: bytes, spec: Any, *, name: str, max_frames: int) -> np.ndarray:
    """.pose bytes -> features [min(T, spec.max_frames), D] exactly as `Embedder.pose_features`,
    with the frame count checked before any per-frame work. ApiError 413/422 when unusable."""
    from signclip_jax.data import pose as pose_lib

    try:
        pose = pose_lib.read_pose(data, name=name)
        frames = pose.body.data.shape[0]
        if frames > max_frames:
            raise ApiError(413, f"{name}: {frames} frames; at most {max_frames} per pose")
        return pose_lib.to_features(pose_lib.pose_to_array(pose, spec, name=name), spec)
    except DataError as e:
        raise ApiError(422, str(e)) from None
    except (ApiError, MemoryError):
        raise
    except Exception as e:  # a crafted file must give a 4xx, not a 500
        log.debug("unusable pose %s", name, exc_info=True)
        raise ApiError(422, f"{name}: not a usable .pose file ({type(e).__name__})") from None


def video_pose_bytes(data: bytes, name: str) -> bytes:
    """Video bytes -> .pose bytes through the optional video module (embed's hook): 501 when
    the video environment is not installed, 422 for a video it cannot convert."""
    from signclip_jax.serving import embed as embed_lib

    try:
        return embed_lib.video_to_pose_bytes(data, name=name)
    except embed_lib.VideoUnavailable as e:
        raise ApiError(501, str(e)) from None
    except UserError as e:
        raise ApiError(422, str(e)) from None


def request_poses(body: dict[str, Any], host: ModelHost, *, required: bool) -> list[np.ndarray]:
    """The `pose` (and `video`) items of a request -> features, in that order."""
    s = host.settings
    poses = string_items(body, "pose", s.max_items) or []
    videos = string_items(body, "video", s.max_items) or []
    if not poses and not videos:
        if required:
            raise ApiError(400, "missing field 'pose' (base64 of a .pose file, or a list)")
        return []
    if len(poses) + len(videos) > s.max_items:
        raise ApiError(413, f"{len(poses) + len(videos)} poses; at most {s.max_items} per request")
    blobs = [decode_base64(p, f"'pose'[{i}]") for i, p in enumerate(poses)]
    names = [f"'pose'[{i}]" for i in range(len(poses))]
    host.require_ready()  # the spec comes with the model
    for i, v in enumerate(videos):
        name = f"'video'[{i}]"
        blobs.append(video_pose_bytes(decode_base64(v, name), name))
        names.append(name)
    spec = host.embedder.spec
    return [
        pose_features(b, spec, name=n, max_frames=s.max_pose_frames) for b, n in zip(blobs, names)
    ]


def request_texts(body: dict[str, Any], host: ModelHost) -> list[str]:
    texts = string_items(body, "text", host.settings.max_items)
    if texts is None:
        raise ApiError(400, "missing field 'text' (a string or a list of strings)")
    return check_texts(texts, host.settings.max_text_chars)


def _read_body(request: Any, limit: int) -> bytes:
    """The request body, or 413 when over `limit` bytes. Chunked bodies (no Content-Length) are
    read up to limit + 1 bytes: werkzeug's own stream silently cuts them at the limit."""
    from werkzeug.exceptions import RequestEntityTooLarge

    if request.content_length is not None:
        return request.get_data(cache=False)  # werkzeug answers 413 above max_content_length
    if not request.environ.get("wsgi.input_terminated"):
        return b""  # a server that cannot end a chunked body safely: werkzeug's rule
    stream, chunks, total = request.environ["wsgi.input"], [], 0
    while total <= limit:
        chunk = stream.read(min(1 << 16, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _drain_body(environ: dict[str, Any], limit: int) -> None:
    """Reads and drops up to `limit` bytes of a refused body. Clients that send the whole body
    before reading the answer (Python's http.client, urllib3) otherwise see a broken pipe
    instead of the 413; beyond `limit` the connection is cut anyway."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit() and int(length) > limit:
        return
    stream = environ.get("wsgi.input")
    try:
        while stream is not None and limit > 0:
            chunk = stream.read(min(limit, 1 << 16))
            if not chunk:
                break
            limit -= len(chunk)
    except Exception:  # the client went away: nothing left to answer
        pass


# ---------------------------------------------------------------------------------- app
def create_app(
    settings: ServeSettings | None = None,
    *,
    host: ModelHost | None = None,
    heartbeat: Callable[[], None] | None = None,
):
    """The Flask (WSGI) app of one worker. Settings default to `ServeSettings.from_env()`.

    Loads the model (JAX starts here): call it after fork (gunicorn without --preload does),
    never in a process that forks afterwards. With settings.wait_for_model it returns once the
    model is warm, calling `heartbeat()` every second meanwhile (gunicorn's worker.notify);
    a load failure then exits with code 4 (exit_on_load_error), which stops gunicorn.
    `host`: an already started ModelHost (tests).
    """
    import flask
    from werkzeug.exceptions import HTTPException

    if settings is None:
        settings = ServeSettings.from_env()
    if not logging.getLogger().handlers:  # under gunicorn: our INFO lines, others' warnings
        logging.basicConfig(level=logging.WARNING, format="[%(process)d] %(levelname)s %(message)s")
        logging.getLogger("signclip_jax").setLevel(logging.INFO)
    if host is None:
        background = not settings.wait_for_model
        host = ModelHost(settings, exit_on_failure=background and settings.exit_on_load_error)
        host.start()
        if settings.wait_for_model:
            while host.wait(1.0) == "loading":
                if heartbeat:
                    heartbeat()
            if host.status == "failed" and settings.exit_on_load_error:
                sys.exit(APP_LOAD_ERROR)

    app = flask.Flask("signclip_jax.serve")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["signclip"] = host

    def error(status: int, message: str, headers: dict[str, str] | None = None):
        response = flask.jsonify({"error": message, "status": status})
        response.status_code = status
        response.headers.update(headers or {})
        return response

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error(e.status, e.message, e.headers)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            _drain_body(flask.request.environ, 4 * settings.max_body_bytes)
            message = f"request body over the limit of {settings.max_body_bytes} bytes"
        response = error(e.code or 500, message)
        if e.code == 405 and getattr(e, "valid_methods", None):
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        log.exception("unhandled error on %s %s", flask.request.method, flask.request.path)
        return error(500, "internal server error")

    @app.after_request
    def _cors(response):
        # As flask_cors(app) does for the original's /api/*: any origin.
        if flask.request.path.startswith("/api/"):
            response.headers["Access-Control-Allow-Origin"] = "*"
            if flask.request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = flask.request.headers.get(
                    "Access-Control-Request-Headers", "Content-Type"
                )
                response.headers["Access-Control-Max-Age"] = "86400"
        return response

    def body() -> dict[str, Any]:
        data = parse_json_body(_read_body(flask.request, settings.max_body_bytes))
        check_model_name(data, settings.model_name)
        return data

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        if host.status == "ready":
            stats = {"requests": host.batcher.requests, "model_calls": host.batcher.batches}
            return {"status": "ready", **host.info, **stats}
        payload = {"status": host.status}
        if host.error:
            payload["error"] = host.error
        return flask.jsonify(payload), 503

    @app.route("/api/embed/<modality>", methods=["GET", "POST"])
    def embed(modality: str):
        if modality not in ("pose", "text"):
            raise ApiError(404, f"unknown modality {modality!r}: use /api/embed/pose or /text")
        data = body()
        if modality == "text":
            _, emb = host.embed([], request_texts(data, host))
        else:
            emb, _ = host.embed(request_poses(data, host, required=True), [])
        return {"embeddings": emb.tolist()}

    @app.route("/api/score", methods=["GET", "POST"])
    def score():
        data = body()
        texts = request_texts(data, host)
        pose_emb, text_emb = host.embed(request_poses(data, host, required=True), texts)
        # Raw dot products, as the original's score_pose_and_text (section 9.2).
        return {"scores": (pose_emb @ text_emb.T).tolist()}

    return app


# ---------------------------------------------------------------------------------- CLI
def _resolve_step_dir(workdir: str | None, checkpoint: str | None, which: str) -> str:
    """Runs in a spawned child: the step directory every worker will load (so all workers
    serve the same checkpoint even while training writes new ones), or a UserError."""
    from signclip_jax import checkpoint as ckpt_lib

    step_dir = ckpt_lib.resolve_step_dir(workdir, checkpoint, which=which)
    run_dir = step_dir.parent.parent
    for name in ("config.json", "model_config.json"):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir / name} not found (is this a signclip-jax workdir?)")
    return str(step_dir)


def resolve_checkpoint(settings: ServeSettings) -> str:
    """The step directory, resolved in a spawned process: this (gunicorn master) process must
    not start JAX before it forks the workers."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        future = pool.submit(
            _resolve_step_dir, settings.workdir, settings.checkpoint, settings.which
        )
        return future.result()


def build_parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    p = cli.Parser(
        prog="python -m signclip_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_checkpoint_args(p)
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each with its own model copy; 1 per accelerator (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=32,
        help="request threads per worker (they share one model thread)",
    )
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
    p.add_argument("--model_name", default=d.model_name)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--batch_wait_ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--max_queue", type=int, default=d.max_queue)
    p.add_argument("--request_timeout_s", type=float, default=d.request_timeout_s)
    p.add_argument("--max_body_bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max_items", type=int, default=d.max_items)
    p.add_argument("--max_text_chars", type=int, default=d.max_text_chars)
    p.add_argument("--max_pose_frames", type=int, default=d.max_pose_frames)
    p.add_argument("--no_warm_up", action="store_true", help="compile on first use instead")
    p.add_argument("--timeout", type=int, default=120, help="gunicorn worker timeout (s)")
    p.add_argument("--access_log", action="store_true", help="log every request to stderr")
    p.add_argument("--log_level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.workers < 1 or args.threads < 1:
        raise UserError("--workers and --threads must be >= 1")
    settings = ServeSettings(
        workdir=args.workdir,
        checkpoint=args.checkpoint,
        which=args.which,
        dtype=args.dtype,
        model_name=args.model_name,
        batch_size=args.batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        max_body_bytes=args.max_body_bytes,
        max_items=args.max_items,
        max_text_chars=args.max_text_chars,
        max_pose_frames=args.max_pose_frames,
        warm_up=not args.no_warm_up,
        exit_on_load_error=True,
    ).validated()
    settings = dataclasses.replace(settings, checkpoint=resolve_checkpoint(settings), workdir=None)
    options = {
        "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
        "workers": args.workers,
        "worker_class": "gthread",
        "threads": args.threads,
        "timeout": args.timeout,
        "graceful_timeout": 30,
        "keepalive": 5,
        "preload_app": False,  # JAX is not fork-safe: each worker loads after fork
        "control_socket_disable": True,  # a fixed socket path would clash between servers
        "accesslog": "-" if args.access_log else None,
        "errorlog": "-",
        "loglevel": args.log_level,
        "proc_name": "signclip-serve",
    }
    return run_gunicorn(settings, options)


def run_gunicorn(settings: ServeSettings, options: dict[str, Any]) -> int:
    """Runs gunicorn in this process with create_app(settings) in each worker; returns when
    it stops (SIGTERM/SIGINT: graceful). Exit code 4 if a worker could not load the model."""
    from gunicorn.app.base import BaseApplication

    workers = {}  # the worker object, in each worker process (post_fork runs there)

    def post_fork(server, worker):
        workers["self"] = worker

    class _App(BaseApplication):
        def load_config(self):
            for key, value in {**options, "post_fork": post_fork}.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self):
            # Keeps the worker's heartbeat going while the model loads and compiles.
            return create_app(settings, heartbeat=workers["self"].notify)

    print(
        f"serving {settings.checkpoint} on http://{options['bind']} "
        f"({options['workers']} worker(s) x {options['threads']} threads)",
        file=sys.stderr,
        flush=True,
    )
    try:
        _App().run()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


__all__ = [
    "ApiError",
    "Batcher",
    "ModelHost",
    "ServeSettings",
    "create_app",
    "main",
    "parse_json_body",
    "run_gunicorn",
]
