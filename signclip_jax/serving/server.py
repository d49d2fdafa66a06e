r"""HTTP API over a trained model: `python -m signclip_jax.serve`.

  python -m signclip_jax.serve --workdir=runs/demo --port=3030 [--host=127.0.0.1] [--workers=1]
  python -m signclip_jax.serve --model=asl=runs/asl --model=hf-hub:ORG/NAME --port=3030
  # the same with gunicorn's own CLI (settings from SIGNCLIP_* environment variables;
  # --timeout covers the model load and compile, during which the worker cannot heartbeat):
  SIGNCLIP_WORKDIR=runs/demo gunicorn -k signclip_jax.serving.server.ServeWorker \
      --threads 32 -w 1 -b 127.0.0.1:3030 --timeout 600 --no-control-socket \
      'signclip_jax.serve:create_app()'

Routes (the original `app.py`'s, reference section 9.1, plus extensions marked +):
  GET|POST /api/embed/text   {"text": str | [str, ...], "model_name"?: str}
  GET|POST /api/embed/pose   {"pose": base64 .pose | [...], "video"?+: base64 video | [...]}
      -> {"embeddings": [[H floats], ...]}  one row per input, raw (not normalised) vectors
  GET|POST /api/score +      {"pose": ..., "text": ...} -> {"scores": [[P x T dot products]]}
  GET /health +              liveness: {"status": "ok", "models": [{"name", ...}, ...]}
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
- Several models per server (--model=[NAME=]REF, repeatable): a request's `model_name` picks
  one (default: the first; a single unnamed model is "default", or --model_name); an unknown
  name is a 400 listing the served names, not a 500. Each model has its own model thread,
  queue and batches in every worker, and every worker holds every model.
- Bad input of any kind is a 4xx with a JSON message, never a 500.
- Texts are embedded as given: send the prompt ("<en> <ase> house"), as with the original.

Before gunicorn starts, a spawned process resolves every model's checkpoint and reads it in
full on the CPU (`resolve_models`): a damaged step or one that does not match its
model_config.json is a UserError and exit 2 (a damaged step: one line naming the intact step
to pass with --checkpoint; with several models the line names the model), not workers that
die at boot. Inside one worker process: the models load after the worker starts (JAX is not
fork-safe, so never in a gunicorn master: no --preload), then `Embedder.warm_up()` compiles
every (rows, length bucket) shape once per model; only then does the worker accept
connections (or, with SIGNCLIP_WAIT_FOR_MODEL=0, it answers 503 until /ready says
ready). Request threads validate and preprocess their input, then hand it to the chosen
model's thread (`Batcher`, one per model) that merges concurrent requests (waiting at most
batch_wait_ms) into batches of up to batch_size rows per tower.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import http
import json
import multiprocessing
import sys
import time
from typing import Any

from signclip_jax import cli, extras
from signclip_jax.errors import UserError
from signclip_jax.serving.app import create_app
from signclip_jax.serving.settings import ServeSettings
from signclip_jax.serving.validation import ApiError, SlowClient

# ---------------------------------------------------------------------------------- worker
WORKER_CLASS = "signclip_jax.serving.server.ServeWorker"  # for gunicorn's -k / worker_class


class _ReadDeadline:
    """The socket as gunicorn's request parser reads it: each recv() is bounded by a deadline
    that starts at the first read of a request's headers (or body), so a client that trickles
    its request cannot hold a request thread for longer than the configured timeout. Past the
    deadline: SlowClient (408). Everything else is the socket's."""

    def __init__(self, sock: Any):
        self.sock = sock
        self.what, self.seconds, self.deadline = "", 0.0, None
        self.armed = False

    def arm(self, what: str, seconds: float) -> None:
        """The next recv() starts a deadline of `seconds` for the request's `what`."""
        self.what, self.seconds, self.deadline, self.armed = what, seconds, None, True

    def disarm(self) -> None:
        self.deadline, self.armed = None, False

    def recv(self, size: int) -> bytes:
        if not self.armed:
            return self.sock.recv(size)
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.seconds
        remaining = self.deadline - now
        if remaining <= 0:
            raise SlowClient(self.what, self.seconds)
        prior = self.sock.gettimeout()  # None in a request thread; gunicorn's drain sets one
        bounded = prior is None or remaining <= prior
        self.sock.settimeout(remaining if bounded else prior)
        try:
            return self.sock.recv(size)
        except TimeoutError:
            if bounded:
                raise SlowClient(self.what, self.seconds) from None
            raise
        finally:
            self.sock.settimeout(prior)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def json_error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer {"error": message, "status": status}, connection closed."""
    body = json.dumps({"error": message, "status": status}).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode("latin-1") + body


class _Captured:
    """Stands in for the client socket while gunicorn's handle_error writes its HTML answer,
    so that its status (and its log and access-log lines) stay gunicorn's own."""

    def __init__(self):
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


@functools.cache
def serve_worker_class() -> type:
    """gunicorn's gthread worker, with two changes (gunicorn is imported here: the extra):

    - every error gunicorn answers itself (a bad request line, invalid Content-Length,
      headers over its limits: before the app sees the request) is JSON
      {"error", "status"} with gunicorn's status, like the app's own errors;
    - reading a request's headers and body is bounded by the app's `header_timeout_s` /
      `body_timeout_s` (408, then the connection closes).
    TLS and HTTP/2 connections (not configured by `serve`) keep gthread's behaviour.
    """
    gthread = extras.require("gunicorn.workers.gthread", "serve", "serve")
    from gunicorn import http as gunicorn_http
    from gunicorn import util
    from gunicorn.http2 import negotiation

    class ServeWorker(gthread.ThreadWorker):
        _timeouts: tuple[float, float] | None = None

        def timeouts(self) -> tuple[float, float]:
            """(header, body) seconds from the app's settings (defaults for another app)."""
            if self._timeouts is None:
                host = getattr(self.wsgi, "extensions", {}).get("signclip")
                s = getattr(host, "settings", None) or ServeSettings()
                self._timeouts = (s.header_timeout_s, s.body_timeout_s)
            return self._timeouts

        def handle(self, conn):
            reads = getattr(conn, "signclip_reads", None)
            plain = not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(
                self.cfg, conn.client
            )
            if reads is None and conn.parser is None and plain:
                # What TConn.init() would build, reading through the deadline.
                reads = conn.signclip_reads = _ReadDeadline(conn.sock)
                conn.parser = gunicorn_http.get_parser(self.cfg, reads, conn.client)
            if reads is not None:
                reads.arm("headers", self.timeouts()[0])
            try:
                return super().handle(conn)
            finally:
                if reads is not None:
                    reads.disarm()

        def handle_request(self, req, conn):
            reads = getattr(conn, "signclip_reads", None)
            if reads is not None:
                reads.arm("body", self.timeouts()[1])
            try:
                return super().handle_request(req, conn)
            finally:
                if reads is not None:  # the drain after the answer keeps gunicorn's limits
                    reads.disarm()

        def handle_error(self, req, client, addr, exc):
            if isinstance(exc, ApiError):  # SlowClient while reading headers
                self.log.info("request from %s refused: %s", (addr or ("",))[0], exc.message)
                status, message = exc.status, exc.message
            else:
                captured = _Captured()
                super().handle_error(req, captured, addr, exc)
                try:
                    status = int(captured.data.split(b" ", 2)[1])
                except (IndexError, ValueError):
                    status = 500
                message = (str(exc) or "bad request") if status < 500 else "internal server error"
            try:
                util.write_nonblock(client, json_error_response(status, message))
            except Exception:
                self.log.debug("Failed to send error message.")

    ServeWorker.__module__ = __name__
    ServeWorker.__qualname__ = "ServeWorker"
    return ServeWorker


def __getattr__(name: str) -> Any:
    # `ServeWorker` is built on first use, so that importing this module needs no gunicorn.
    if name == "ServeWorker":
        return serve_worker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------- CLI
def _verified_step_dir(
    workdir: str | None, checkpoint: str | None, which: str, dtype: str | None, ref: str = ""
) -> str:
    """Runs in a spawned child: the step directory every worker will load (so all workers
    serve the same checkpoint even while training writes new ones), read in full once, or a
    UserError. `ref`: a model reference (models.resolve: a release is imported here, once)
    instead of workdir / checkpoint. A damaged step (checkpoint.DamagedCheckpoint: it names
    the newest intact step) or one that does not match model_config.json is then a usage
    error (exit 2) before gunicorn starts, instead of workers that die at boot. The check runs
    on the CPU: this child must not take an accelerator (a TPU has one owner) that the
    workers need next."""
    import jax  # only in this child

    jax.config.update("jax_platforms", "cpu")
    from signclip_jax import checkpoint as ckpt_lib
    from signclip_jax import models as models_lib
    from signclip_jax import run as run_lib

    if ref:
        workdir, checkpoint = models_lib.resolve(ref)
    step_dir = ckpt_lib.resolve_step_dir(workdir, checkpoint, which=which)
    run_dir = step_dir.parent.parent
    for name in ("config.json", "model_config.json"):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir / name} not found (is this a signclip-jax workdir?)")
    run_lib.load_run(checkpoint=step_dir, dtype=dtype)  # restores every parameter
    return str(step_dir)


def _verified_models(settings: ServeSettings) -> list[tuple[str, str]]:
    """Spawned child: [(name, verified step directory)] of every served model, in order; a
    UserError names the model when there are several."""
    served = settings.served()
    out = []
    for name, ref in served:
        try:
            step_dir = _verified_step_dir(
                settings.workdir, settings.checkpoint, settings.which, settings.dtype, ref
            )
        except UserError as e:
            if len(served) == 1:
                raise
            raise UserError(f"model {name!r}: {e}") from None
        out.append((name, step_dir))
    return out


def resolve_models(settings: ServeSettings) -> ServeSettings:
    """`settings` with every model resolved and verified (it restores into the model of its
    run) in a spawned process, as model=("NAME=STEP_DIR", ...): this (gunicorn master)
    process must not start JAX before it forks the workers, and every worker then serves the
    same checkpoints. UserError (DamagedCheckpoint included) when one cannot be served."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        verified = pool.submit(_verified_models, settings).result()
    return dataclasses.replace(
        settings, workdir=None, checkpoint=None, model=tuple(f"{n}={d}" for n, d in verified)
    )


def resolve_checkpoint(settings: ServeSettings) -> str:
    """The step directory of the first (default) served model, resolved and verified."""
    return resolve_models(settings).served()[0][1]


def build_parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    p = cli.Parser(
        prog="python -m signclip_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_checkpoint_args(p, repeat_model=True)
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
    p.add_argument(
        "--model_name",
        default=d.model_name,
        help="the name of a single model given without NAME= (default: default)",
    )
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--batch_wait_ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--max_queue", type=int, default=d.max_queue)
    p.add_argument("--request_timeout_s", type=float, default=d.request_timeout_s)
    p.add_argument("--max_body_bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max_items", type=int, default=d.max_items)
    p.add_argument("--max_text_chars", type=int, default=d.max_text_chars)
    p.add_argument("--max_pose_frames", type=int, default=d.max_pose_frames)
    p.add_argument(
        "--header_timeout_s",
        type=float,
        default=d.header_timeout_s,
        help="a request's headers must arrive within this time of their first byte (else 408)",
    )
    p.add_argument(
        "--body_timeout_s",
        type=float,
        default=d.body_timeout_s,
        help="a request's body must arrive within this time of its first byte (else 408)",
    )
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
    # Both optional (the serve extra): one clear error now rather than a worker that dies.
    extras.require("flask", "serve", "serve")
    extras.require("gunicorn", "serve", "serve")
    settings = ServeSettings(
        workdir=args.workdir,
        checkpoint=args.checkpoint,
        model=tuple(args.model or ()),
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
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        warm_up=not args.no_warm_up,
        exit_on_load_error=True,
    ).validated()
    settings = resolve_models(settings)
    options = {
        "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
        "workers": args.workers,
        "worker_class": WORKER_CLASS,  # gthread + JSON errors + read deadlines
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
    gunicorn_base = extras.require("gunicorn.app.base", "serve", "serve")

    workers = {}  # the worker object, in each worker process (post_fork runs there)

    def post_fork(server, worker):
        workers["self"] = worker

    class _App(gunicorn_base.BaseApplication):
        def load_config(self):
            for key, value in {**options, "post_fork": post_fork}.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self):
            # Keeps the worker's heartbeat going while the model loads and compiles.
            return create_app(settings, heartbeat=workers["self"].notify)

    served = ", ".join(f"{name}={ref}" for name, ref in settings.served())
    print(
        f"serving {served} on http://{options['bind']} "
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
    "WORKER_CLASS",
    "build_parser",
    "json_error_response",
    "main",
    "resolve_checkpoint",
    "resolve_models",
    "run_gunicorn",
    "serve_worker_class",
]
