"""Load with hostile requests mixed in (issue 17): 20 clients x 50 requests against the real
gunicorn server (`python -m signclip_jax.serve`, 2 workers) on loopback, mixing good pose,
text and score requests with malformed JSON, bad base64, oversize bodies (Content-Length and
chunked), amplifying .pose files, corrupt .pose bytes, a wrong Content-Type, unknown routes
and methods, bad chunked bodies and bad request lines. Every answer must have the status
expected for its kind (good answers equal the server's own answers before the load; errors
are JSON), no worker may restart, and each worker's RSS (/proc/PID/status VmRSS) after the
load must be within 10% of its RSS after a warm-up pass of every kind.

Prints the durations, throughput and RSS numbers that docs/serving.md quotes:
  pytest tests/serving/test_load.py -s
"""

import base64
import collections
import concurrent.futures
import http.client
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.data.malformed import amplification, points_header
from tests.helpers import write_pose
from tests.serving.test_server import (
    TEXTS,
    Server,
    gunicorn_workers,
    proc_status_bytes,
    raw_exchange,
    start_server,
    stop,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux)")

CLIENTS, PER_CLIENT = 20, 50
MAX_BODY = 2**20
LIMITS = dict(max_body_bytes=MAX_BODY, max_items=16, max_text_chars=300, max_pose_frames=200)
MB = 2**20


# ---------------------------------------------------------------------------------- requests
def _exchange(
    port: int,
    method: str,
    path: str,
    body: bytes | object = b"",
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
    chunked: bool = False,
) -> tuple[int, dict | None]:
    """One request -> (status, JSON body). The body must be JSON (AssertionError if not)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
    finally:
        if own:
            conn.close()
    assert ctype == "application/json", (resp.status, ctype, raw[:200])
    return resp.status, json.loads(raw) if raw else None


JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BAD_CHUNKS = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"  # "zz": not hex
RAW_HEAD = b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


class Traffic:
    """Request kinds: name -> (expected status, send(port, conn) -> (status, JSON body)).

    Good kinds use the client's keep-alive connection; bad ones a connection of their own (the
    server may close it after an error)."""

    def __init__(self, poses: dict[str, bytes]):
        b64 = lambda data: base64.b64encode(data).decode()
        self.good_pose = {k: json.dumps({"pose": b64(v)}).encode() for k, v in poses.items()}
        self.poses = poses
        amp_frames = json.dumps({"pose": b64(amplification())}).encode()
        amp_points = json.dumps({"pose": b64(amplification(points_header(65_535)))}).encode()
        corrupt = json.dumps({"pose": b64(poses["p30"][: len(poses["p30"]) // 3])}).encode()
        oversize = json.dumps({"text": "x" * (MAX_BODY + 100)}).encode()
        p, t = "/api/embed/pose", "/api/embed/text"

        def post(path, body, want, headers=JSON, chunked=False):
            def send(port, conn):
                data = body() if callable(body) else body
                return _exchange(port, "POST", path, data, headers, chunked=chunked)

            return want, send

        def raw(data, want):
            return want, lambda port, conn: raw_exchange(port, data, 60.0)[:2]

        self.bad: dict[str, tuple[int, Callable]] = {
            "malformed_json": post(t, b'{"text": "a", ', 400),
            "bad_base64": post(p, b'{"pose": "!!!not base64!!!"}', 400),
            "form_body": post(t, b"text=hello", 400, FORM),
            "unknown_model": post(t, b'{"text": "a", "model_name": "other"}', 400),
            "too_many_items": post(t, json.dumps({"text": ["a"] * 17}).encode(), 413),
            "oversize_body": post(t, oversize, 413),
            "oversize_chunked": post(
                t, lambda: (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2)), 413, chunked=True
            ),
            "amplifying_frames": post(p, amp_frames, 413),
            "amplifying_points": post(p, amp_points, 413),
            "corrupt_pose": post(p, corrupt, 422),
            "unknown_route": post("/api/embed/video", b'{"text": "a"}', 404),
            "wrong_method": (405, lambda port, conn: _exchange(port, "DELETE", t)),
            "bad_chunked": raw(RAW_HEAD + BAD_CHUNKS, 400),
            "bad_request_line": raw(b"GARBAGE\r\n\r\n", 400),
        }

    def good(self, kind: str, i: int) -> tuple[str, str, bytes, dict[str, str]]:
        """(key of the expected answer, path, body, headers) of the i-th good request."""
        text = TEXTS[i % len(TEXTS)]
        pose = ("p12", "p30")[i % 2]
        if kind == "text":
            return f"text:{text}", "/api/embed/text", json.dumps({"text": text}).encode(), JSON
        if kind == "text_plain":  # a wrong Content-Type: the body is read as JSON anyway
            body = json.dumps({"text": text}).encode()
            return f"text:{text}", "/api/embed/text", body, {"Content-Type": "text/plain"}
        if kind == "pose":
            return f"pose:{pose}", "/api/embed/pose", self.good_pose[pose], JSON
        body = json.loads(self.good_pose[pose])
        body["text"] = text
        return f"score:{pose}:{text}", "/api/score", json.dumps(body).encode(), JSON

    GOOD = ("text", "text_plain", "pose", "score")

    @property
    def kinds(self) -> list[str]:
        return [*self.GOOD, *self.bad]


def _answer(data: dict | None) -> list:
    return (data or {}).get("embeddings") or (data or {}).get("scores")


def run_clients(
    traffic: Traffic, port: int, reference: dict[str, list], rounds: list[list[str]]
) -> tuple[collections.Counter, list[str], list[float]]:
    """Runs len(rounds) clients, client k sending the kinds rounds[k] in order ->
    (Counter of (kind, status), unexpected outcomes, latencies in s)."""
    counts: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i, kind in enumerate(rounds[k]):
                start = time.perf_counter()
                problem = None
                try:
                    if kind in traffic.GOOD:
                        key, path, body, headers = traffic.good(kind, k + i)
                        status, data = _exchange(port, "POST", path, body, headers, conn=conn)
                        want = 200
                        if status == 200 and not np.allclose(
                            _answer(data), reference[key], atol=1e-5
                        ):
                            problem = f"{kind}: answer differs from the reference"
                    else:
                        want, send = traffic.bad[kind]
                        status, data = send(port, conn)
                        ok = isinstance(data, dict) and data.get("status") == status
                        if not (ok and isinstance(data.get("error"), str) and data["error"]):
                            problem = f"{kind}: not a JSON error: {str(data)[:200]}"
                    if status != want:
                        problem = f"{kind}: {status} (want {want}) {str(data)[:200]}"
                except Exception as e:  # a refused, reset or non-JSON answer: counted
                    status, problem = -1, f"{kind}: {type(e).__name__}: {str(e)[:200]}"
                    conn.close()  # the next good request opens a new connection
                took = time.perf_counter() - start
                with lock:
                    counts[(kind, status)] += 1
                    latencies.append(took)
                    if problem:
                        unexpected.append(problem)
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(len(rounds)) as pool:
        futures = [pool.submit(client, k) for k in range(len(rounds))]
        done, not_done = concurrent.futures.wait(futures, timeout=300)
    assert not not_done, "clients did not finish in 300 s"
    for f in done:
        f.result()
    return counts, unexpected, latencies


def worker_rss(master: int) -> dict[int, int]:
    """pid -> VmRSS in bytes of each gunicorn worker of `master`."""
    return {pid: proc_status_bytes(pid, "VmRSS") for pid in gunicorn_workers(master)}


# ---------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def load_server(tiny_workdir, tmp_path_factory):
    """2 workers x 8 threads, each on one CPU device (XLA_FLAGS of the test process dropped,
    as a deployment would run), limits small enough that oversize bodies stay cheap.

    It serves a copy of the tiny run whose config has no length buckets (data.length_buckets
    = (), the base config's default): each worker warms up 2 pose programs instead of 8 (4
    lengths x 2 row counts) before it is ready. Bucketing is not what this load is about
    (tests/serving/test_server.py serves the tiny run as trained)."""
    log = tmp_path_factory.mktemp("load_log") / "server.log"
    workdir = tmp_path_factory.mktemp("load_run") / "run"
    shutil.copytree(tiny_workdir, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["length_buckets"] = []
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    limits = [f"--{k}={v}" for k, v in LIMITS.items()]
    proc, port = start_server(
        [f"--workdir={workdir}", "--workers=2", "--threads=8", "--batch_size=2", *limits],
        log,
        env,
    )
    try:
        yield Server(proc, port, log)
    finally:
        stop(proc)


def test_mixed_hostile_load(load_server, tmp_path):
    started = time.perf_counter()
    poses = {k: write_pose(tmp_path / f"{k}.pose", t, s).read_bytes()
             for s, (k, t) in enumerate({"p12": 12, "p30": 30}.items())}  # fmt: skip
    traffic = Traffic(poses)
    ready = load_server.wait_ready(timeout=240)
    boot_s = time.perf_counter() - started

    # The reference answers, one request at a time.
    reference = {}
    for i in range(2 * len(TEXTS)):
        for kind in ("text", "pose", "score"):
            key, path, body, headers = traffic.good(kind, i)
            status, data = _exchange(load_server.port, "POST", path, body, headers)
            assert status == 200, (kind, data)
            reference[key] = _answer(data)

    # Warm-up: every kind once from every client, concurrently.
    workers = gunicorn_workers(load_server.proc.pid)
    assert len(workers) == 2, workers
    start = time.perf_counter()
    counts, unexpected, _ = run_clients(
        traffic, load_server.port, reference, [traffic.kinds] * CLIENTS
    )
    warm_s = time.perf_counter() - start
    assert unexpected == [], unexpected[:10]
    rss_warm = worker_rss(load_server.proc.pid)

    # The load: 20 clients x 50 requests, kinds interleaved differently per client.
    kinds = traffic.kinds
    rounds = [[kinds[(7 * k + 3 * i) % len(kinds)] for i in range(PER_CLIENT)]
              for k in range(CLIENTS)]  # fmt: skip
    start = time.perf_counter()
    counts, unexpected, latencies = run_clients(traffic, load_server.port, reference, rounds)
    load_s = time.perf_counter() - start
    rss_end = worker_rss(load_server.proc.pid)
    peak = {pid: proc_status_bytes(pid, "VmHWM") for pid in rss_end}

    ms = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    by_status = collections.Counter()
    for (_, status), n in counts.items():
        by_status[status] += n
    print(
        f"\nload: boot {boot_s:.1f} s (workers ready: load {ready['load_s']} s, warm-up "
        f"{ready['warm_up_s']} s), warm-up pass {len(kinds) * CLIENTS} requests in "
        f"{warm_s:.1f} s; {CLIENTS} clients x {PER_CLIENT} requests in {load_s:.1f} s = "
        f"{len(latencies) / load_s:.0f} req/s, latency p50 {ms[0]:.0f} ms, p90 {ms[1]:.0f} "
        f"ms, p99 {ms[2]:.0f} ms; statuses {dict(sorted(by_status.items()))}"
    )
    for pid in sorted(rss_end):
        print(
            f"worker {pid}: VmRSS after warm-up {rss_warm.get(pid, 0) / MB:.1f} MiB, after "
            f"the load {rss_end[pid] / MB:.1f} MiB, peak (VmHWM) {peak[pid] / MB:.1f} MiB"
        )

    assert unexpected == [], f"{len(unexpected)} unexpected: {unexpected[:10]}"
    assert sum(counts.values()) == CLIENTS * PER_CLIENT
    assert {kind for kind, _ in counts} == set(kinds)  # every kind was sent
    # No worker died or was replaced (a fresh worker would hide any growth).
    assert gunicorn_workers(load_server.proc.pid) == workers == sorted(rss_warm)
    for pid in workers:
        assert rss_end[pid] <= 1.10 * rss_warm[pid], (pid, rss_warm[pid], rss_end[pid])
    log = load_server.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
