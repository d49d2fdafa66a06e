"""The Flask (WSGI) app of one server worker: `create_app()` and the `ModelHost` behind it.

Routes, JSON shapes and status codes: see signclip_jax/serving/server.py. JAX starts in the
worker, after fork: the model loads in `ModelHost`'s thread, never at import, so gunicorn's
master can import this module (`signclip_jax.serve:create_app()`) without starting JAX.
Flask comes with the `serve` extra and is imported where the app is built.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from signclip_jax import extras
from signclip_jax.errors import UserError
from signclip_jax.serving.batcher import Batcher, QueueFull
from signclip_jax.serving.settings import ServeSettings
from signclip_jax.serving.validation import (
    ApiError,
    check_model_name,
    check_texts,
    decode_base64,
    parse_json_body,
    pose_alloc_limit,
    pose_features,
    string_items,
    video_pose_bytes,
)

log = logging.getLogger(__name__)

APP_LOAD_ERROR = 4  # gunicorn's exit code for "App failed to load": the master then stops


# ---------------------------------------------------------------------------------- model host
class ServedModel:
    """One model of a server: its Embedder, its Batcher (own model thread, queue and batches)
    and what /ready and /health say about it."""

    def __init__(self, name: str, embedder: Any, batcher: Any, info: dict[str, Any]):
        self.name, self.embedder, self.batcher, self.info = name, embedder, batcher, info


class ModelHost:
    """Loads the served models (settings.served(): one, or several by name) in a background
    thread, then holds one ServedModel per name.

    status: "loading" -> "ready" (every model loaded and, with warm_up, compiled) or "failed".
    """

    def __init__(self, settings: ServeSettings, *, exit_on_failure: bool = False):
        self.settings = settings
        self.exit_on_failure = exit_on_failure  # os._exit: the only way out of a thread
        self.status = "loading"
        self.error: str | None = None
        self.served = settings.served()  # [(name, REF)]; REF "": settings.workdir/checkpoint
        self.names = [name for name, _ in self.served]
        self.models: dict[str, ServedModel] = {}
        self._thread = threading.Thread(target=self._load, name="signclip-load", daemon=True)

    def start(self) -> ModelHost:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> str:
        self._thread.join(timeout)
        return self.status

    def _load(self) -> None:
        current = self.names[0]
        try:
            for current, ref in self.served:
                self.models[current] = self._load_one(current, ref)
            self.status = "ready"
        except BaseException as e:  # reported through /ready or the exit code
            error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.error = f"model {current!r}: {error}" if len(self.served) > 1 else error
            self.status = "failed"
            if not isinstance(e, UserError):
                log.exception("loading model %r failed", current)
            print(f"error: loading the model failed: {self.error}", file=sys.stderr, flush=True)
            if self.exit_on_failure:
                os._exit(APP_LOAD_ERROR)

    def _load_one(self, name: str, ref: str) -> ServedModel:
        s = self.settings
        start = time.monotonic()
        from signclip_jax import models as models_lib
        from signclip_jax import run as run_lib  # jax starts here, in the worker, after fork
        from signclip_jax.serving import embedder as embedder_lib

        workdir, checkpoint = models_lib.resolve(ref) if ref else (s.workdir, s.checkpoint)
        run = run_lib.load_run(workdir, checkpoint, which=s.which, dtype=s.dtype)
        embedder = embedder_lib.Embedder(run, batch_size=s.batch_size)
        loaded = time.monotonic()
        if s.warm_up:
            embedder.warm_up()
        info = {
            "model_name": name,
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
        batcher = Batcher(
            embedder, batch_size=s.batch_size, wait_s=s.batch_wait_ms / 1000, max_queue=s.max_queue
        )
        log.info("model ready (pid %d): %s", os.getpid(), json.dumps(info))
        return ServedModel(name, embedder, batcher, info)

    def require_ready(self) -> None:
        if self.status == "loading":
            raise ApiError(503, "model is loading; retry shortly", {"Retry-After": "2"})
        if self.status != "ready":
            # The reason (which may name server paths) is in the log and on /ready.
            raise ApiError(503, "model failed to load; see the server log")

    def model(self, name: str | None = None) -> ServedModel:
        """The ready model called `name` (default: the first); 503 while not ready."""
        self.require_ready()
        return self.models[name or self.names[0]]

    def embed(self, poses: Sequence[np.ndarray], texts: Sequence[str], name: str | None = None):
        """-> (pose embeddings [P, H], text embeddings [T, H]) float32 of model `name`
        (default: the first), via that model's thread."""
        batcher = self.model(name).batcher
        try:
            future = batcher.submit(poses, texts)
        except QueueFull:
            raise ApiError(
                503, "server busy: too many requests waiting", {"Retry-After": "1"}
            ) from None
        try:
            return future.result(timeout=self.settings.request_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ApiError(503, "timed out waiting for the model", {"Retry-After": "5"}) from None

    def listing(self) -> list[dict[str, Any]]:
        """/health's list: every served model's name and, once loaded, its checkpoint (step
        directory), embedding size and max_frames."""
        out = []
        for name, _ in self.served:
            item: dict[str, Any] = {"name": name}
            served = self.models.get(name)
            if served is not None:
                keys = ("checkpoint", "hidden_size", "max_frames")
                item.update({k: served.info[k] for k in keys if k in served.info})
            out.append(item)
        return out


# ---------------------------------------------------------------------------------- requests
def request_poses(
    body: dict[str, Any], host: ModelHost, *, required: bool, name: str | None = None
) -> list[np.ndarray]:
    """The `pose` (and `video`) items of a request -> features for model `name`, in order."""
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
    spec = host.model(name).embedder.spec  # the spec comes with the model
    for i, v in enumerate(videos):
        name = f"'video'[{i}]"
        blobs.append(video_pose_bytes(decode_base64(v, name), name))
        names.append(name)
    # Frames, points and decoding memory are checked on the header, before pose-format
    # allocates: a small file must not be able to declare gigabytes of zeros (issue 17).
    limits = dict(max_frames=s.max_pose_frames, max_alloc_bytes=pose_alloc_limit(s.max_body_bytes))
    return [pose_features(b, spec, name=n, **limits) for b, n in zip(blobs, names)]


def request_texts(body: dict[str, Any], host: ModelHost) -> list[str]:
    texts = string_items(body, "text", host.settings.max_items)
    if texts is None:
        raise ApiError(400, "missing field 'text' (a string or a list of strings)")
    return check_texts(texts, host.settings.max_text_chars)


def _read_body(request: Any, limit: int) -> bytes:
    """The request body, or 413 when over `limit` bytes. Chunked bodies (no Content-Length) are
    read up to limit + 1 bytes: werkzeug's own stream silently cuts them at the limit.
    A body that cannot be read (a malformed chunk, a reset connection) is a 400, a client too
    slow to send it a 408 (`SlowClient`, from the worker's socket reads): never a 500."""
    from werkzeug.exceptions import HTTPException  # werkzeug comes with flask (extra)

    try:
        return _read_body_bytes(request, limit)
    except (ApiError, HTTPException):  # 408 SlowClient; werkzeug's 413 and 400 (disconnect)
        raise
    except Exception as e:  # e.g. gunicorn's InvalidChunkSize: the bytes are the client's
        log.debug("unreadable request body", exc_info=True)
        reason = str(e)[:200] or type(e).__name__
        raise ApiError(400, f"could not read the request body ({reason})") from None


def _read_body_bytes(request: Any, limit: int) -> bytes:
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
    `host`: an already started ModelHost (tests). MissingExtra when Flask is not installed.
    """
    flask = extras.require("flask", "serve", "serve")
    from werkzeug.exceptions import HTTPException  # werkzeug comes with flask

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

    def body() -> tuple[dict[str, Any], str]:
        """The request's JSON object and the model it names (`model_name`, default the first)."""
        data = parse_json_body(_read_body(flask.request, settings.max_body_bytes))
        return data, check_model_name(data, host.names)

    @app.get("/health")
    def health():
        return {"status": "ok", "models": host.listing()}

    @app.get("/ready")
    def ready():
        if host.status == "ready":
            models = []
            for served in host.models.values():
                stats = {"requests": served.batcher.requests, "model_calls": served.batcher.batches}
                models.append({**served.info, **stats})
            # The first (default) model's fields at the top, as with one model; all in "models".
            return {"status": "ready", **models[0], "models": models}
        payload = {"status": host.status}
        if host.error:
            payload["error"] = host.error
        return flask.jsonify(payload), 503

    @app.route("/api/embed/<modality>", methods=["GET", "POST"])
    def embed(modality: str):
        if modality not in ("pose", "text"):
            raise ApiError(404, f"unknown modality {modality!r}: use /api/embed/pose or /text")
        data, name = body()
        if modality == "text":
            _, emb = host.embed([], request_texts(data, host), name)
        else:
            emb, _ = host.embed(request_poses(data, host, required=True, name=name), [], name)
        return {"embeddings": emb.tolist()}

    @app.route("/api/score", methods=["GET", "POST"])
    def score():
        data, name = body()
        texts = request_texts(data, host)
        poses = request_poses(data, host, required=True, name=name)
        pose_emb, text_emb = host.embed(poses, texts, name)
        # Raw dot products, as the original's score_pose_and_text (section 9.2).
        return {"scores": (pose_emb @ text_emb.T).tolist()}

    return app


__all__ = ["APP_LOAD_ERROR", "ApiError", "ModelHost", "ServedModel", "create_app"]
