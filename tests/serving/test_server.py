"""python -m signclip_jax.serve over real HTTP on loopback: the original's routes and shapes,
equality with the embed CLI, batch independence, a malformed-input corpus (4xx + JSON every
time), CORS, a bounded concurrent load, gunicorn's own CLI on `signclip_jax.serve:create_app()`,
and the server's own failure modes (no model, no Flask). The model thread: test_batcher.py."""

import base64
import concurrent.futures
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import portpicker
import pytest

from signclip_jax.errors import UserError
from signclip_jax.extras import MissingExtra
from signclip_jax.serving import app as app_lib
from signclip_jax.serving import embed as embed_lib
from signclip_jax.serving import server as server_lib
from signclip_jax.serving import validation, video_input
from signclip_jax.serving.batcher import QueueFull
from signclip_jax.serving.settings import ServeSettings
from tests.helpers import write_pose

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["<en> <ase> house", "<en> <ase> tree", "hello", "<en> <ase> a much longer caption here"]
LIMITS = dict(max_body_bytes=4 * 2**20, max_items=16, max_text_chars=300, max_pose_frames=200)
TIMEOUTS = dict(header_timeout_s=2, body_timeout_s=3)  # short, for the slow-client tests


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


# ---------------------------------------------------------------------------------- server
class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def request(self, method, path, body=None, headers=None, conn=None):
        """-> (status, headers dict, parsed JSON or raw bytes)."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            if own:
                conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw
        return resp.status, hdrs, data

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                status, _, data = self.request("GET", "/ready")
                if status == 200:
                    return data
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log.read_text()}")


def start_server(
    args, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:
    port = portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "signclip_jax.serve", f"--port={port}", *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, port


def gunicorn_workers(master: int) -> list[int]:
    """The pids of a gunicorn master's workers (its children that run the app; not the
    multiprocessing helpers a spawn context may leave beside them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # a process that just ended
        if ppid == master and b"multiprocessing" not in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def proc_status_bytes(pid: int, key: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM, ...) in bytes."""
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M)[1]) * 1024


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # gunicorn: graceful stop of master and workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def poses(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve_poses")
    frames = {"p12": 12, "p30": 30, "p60": 60, "p90": 90, "long": 150, "huge": 250}
    return {k: write_pose(d / f"{k}.pose", t, seed) for seed, (k, t) in enumerate(frames.items())}


@pytest.fixture(scope="module")
def server(tiny_workdir, tmp_path_factory):
    """Two gunicorn workers (each loads the model after fork); not waited for here, so that
    `expected` computes while the workers compile."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    limits = [f"--{k}={v}" for k, v in {**LIMITS, **TIMEOUTS}.items()]
    proc, port = start_server(
        [f"--workdir={tiny_workdir}", "--workers=2", "--threads=16", "--batch_size=8", *limits],
        log,
    )
    try:
        yield Server(proc, port, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def expected(tiny_workdir, poses, tmp_path_factory) -> dict:
    """The embed CLI's output for every test pose and TEXTS: name -> row."""
    out = tmp_path_factory.mktemp("serve_expected") / "emb.npz"
    argv = [f"--workdir={tiny_workdir}", "--poses", *map(str, poses.values()), "--texts", *TEXTS,
            f"--out={out}", "--batch_size=8", "-q"]  # fmt: skip
    with redirect_stderr(io.StringIO()):
        assert embed_lib.main(argv) == 0
    npz = np.load(out)
    rows = dict(zip([Path(p).stem for p in npz["pose_files"]], npz["pose_embeddings"]))
    rows.update(zip(npz["texts"], npz["text_embeddings"]))
    return rows


@pytest.fixture(scope="module")
def api(server, expected) -> Server:
    server.wait_ready(timeout=240)
    return server


# ---------------------------------------------------------------------------------- happy paths
def test_health_and_ready(api):
    status, _, data = api.request("GET", "/health")
    assert status == 200 and data["status"] == "ok" and len(data["models"]) == 1
    model = data["models"][0]
    assert (model["name"], model["hidden_size"], model["max_frames"]) == ("default", 32, 96)
    assert model["checkpoint"].endswith("checkpoints/4")
    status, _, data = api.request("GET", "/ready")
    assert status == 200 and data["status"] == "ready"
    assert data["hidden_size"] == 32 and data["step"] == 4 and data["max_frames"] == 96
    assert data["checkpoint"].endswith("checkpoints/4")
    assert [m["model_name"] for m in data["models"]] == ["default"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_embeddings_equal_the_embed_cli(api, expected, poses, method):
    # One string -> one row; a list -> rows in order (the original's shapes).
    status, hdrs, data = api.request(method, "/api/embed/text", {"text": TEXTS[0]})
    assert status == 200 and hdrs["content-type"] == "application/json"
    assert list(data) == ["embeddings"] and np.shape(data["embeddings"]) == (1, 32)
    np.testing.assert_allclose(data["embeddings"][0], expected[TEXTS[0]], atol=1e-5)
    status, _, data = api.request(
        method, "/api/embed/text", {"text": TEXTS[::-1], "model_name": "default"}
    )
    assert status == 200
    np.testing.assert_allclose(data["embeddings"], [expected[t] for t in TEXTS[::-1]], atol=1e-5)

    names = ["p60", "p12", "long"]
    status, _, data = api.request(
        method, "/api/embed/pose", {"pose": [b64(poses[n]) for n in names]}
    )
    assert status == 200 and np.shape(data["embeddings"]) == (3, 32)
    np.testing.assert_allclose(data["embeddings"], [expected[n] for n in names], atol=1e-5)
    status, _, data = api.request(method, "/api/embed/pose", {"pose": b64(poses["p30"])})
    assert status == 200
    np.testing.assert_allclose(data["embeddings"], [expected["p30"]], atol=1e-5)


def test_scores_are_dot_products(api, expected, poses):
    body = {"pose": [b64(poses["p12"]), b64(poses["p90"])], "text": TEXTS[:3]}
    status, _, data = api.request("POST", "/api/score", body)
    assert status == 200 and np.shape(data["scores"]) == (2, 3)
    want = (
        np.array([expected["p12"], expected["p90"]]) @ np.array([expected[t] for t in TEXTS[:3]]).T
    )
    np.testing.assert_allclose(data["scores"], want, rtol=1e-5, atol=1e-4)


def test_pose_alone_equals_pose_among_longer_ones(api, poses):
    """The original padded a request's poses to the longest and pooled the padding."""
    _, _, alone = api.request("POST", "/api/embed/pose", {"pose": b64(poses["p12"])})
    mates = [b64(poses[n]) for n in ("p90", "long", "p12", "p60")]
    _, _, together = api.request("POST", "/api/embed/pose", {"pose": mates})
    np.testing.assert_allclose(together["embeddings"][2], alone["embeddings"][0], atol=1e-5)
    assert np.abs(np.subtract(together["embeddings"][2], together["embeddings"][1])).max() > 1e-3


def test_base64_with_line_breaks(api, expected, poses):
    wrapped = base64.encodebytes(poses["p30"].read_bytes()).decode()  # 76-column lines
    status, _, data = api.request("POST", "/api/embed/pose", {"pose": [wrapped]})
    assert status == 200
    np.testing.assert_allclose(data["embeddings"][0], expected["p30"], atol=1e-5)


def test_cors(api):
    status, hdrs, _ = api.request(
        "OPTIONS",
        "/api/embed/text",
        headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"},
    )  # fmt: skip
    assert status == 200 and hdrs["access-control-allow-origin"] == "*"
    assert "POST" in hdrs["access-control-allow-methods"]
    assert hdrs["access-control-allow-headers"] == "content-type"
    _, hdrs, _ = api.request("GET", "/api/embed/text", {"text": "a"})
    assert hdrs["access-control-allow-origin"] == "*"
    _, hdrs, _ = api.request("GET", "/api/embed/text", {"text": 1})  # errors too
    assert hdrs["access-control-allow-origin"] == "*"
    _, hdrs, _ = api.request("GET", "/health")
    assert "access-control-allow-origin" not in hdrs


# ---------------------------------------------------------------------------------- bad input
def malformed_corpus(poses: dict[str, Path]) -> list[tuple[str, str, bytes | dict | str, int]]:
    """(method, path, body, expected status): none of these may give a 2xx or a 5xx."""
    good = poses["p12"].read_bytes()
    header_only = good[: len(good) // 10]
    flipped = bytearray(good)
    flipped[0:40] = bytes(255 - b for b in flipped[0:40])  # header garbage
    fake = lambda b: base64.b64encode(bytes(b)).decode()
    too_big = {"text": "x" * (LIMITS["max_body_bytes"] + 10)}
    deep = "[" * 100_000 + "]" * 100_000
    real_path = str(poses["p12"])
    t, p = "/api/embed/text", "/api/embed/pose"
    return [
        # not JSON / not an object / not UTF-8 / empty
        ("POST", t, b"", 400),
        ("POST", t, b"{", 400),
        ("POST", t, b'{"text": "a"} trailing', 400),
        ("POST", t, b"nope", 400),
        ("POST", t, deep, 400),
        ("POST", t, b"\xff\xfe{\x00}", 400),
        ("POST", t, '{"text": "caf\u00e9"}'.encode("latin-1"), 400),
        ("POST", t, b"[1, 2]", 400),
        ("POST", t, b'"text"', 400),
        ("POST", t, b"null", 400),
        # missing fields / wrong types / empty lists
        ("POST", t, {}, 400),
        ("POST", t, {"txt": "a"}, 400),
        ("POST", t, {"text": None}, 400),
        ("POST", t, {"text": 3}, 400),
        ("POST", t, {"text": {"a": 1}}, 400),
        ("POST", t, {"text": ["a", 2]}, 400),
        ("POST", t, {"text": [["a"]]}, 400),
        ("POST", t, {"text": []}, 400),
        ("POST", t, {"text": "a", "model_name": 3}, 400),
        ("POST", t, {"text": "a", "model_name": "asl_citizen"}, 400),
        ("POST", t, '{"text": "\\ud800"}', 400),  # a lone surrogate
        ("POST", p, {}, 400),
        ("POST", p, {"text": "a"}, 400),
        ("POST", p, {"pose": []}, 400),
        ("POST", p, {"pose": 5}, 400),
        ("POST", p, {"pose": [None]}, 400),
        ("POST", p, {"pose": ""}, 400),
        ("POST", p, {"pose": "!!!!"}, 400),
        ("POST", p, {"pose": "caf\u00e9"}, 400),
        ("POST", p, {"pose": "abc"}, 400),  # bad padding
        ("POST", "/api/score", {"pose": fake(good)}, 400),
        ("POST", "/api/score", {"text": "a"}, 400),
        # never a server-side path: the string is base64 or nothing
        ("POST", p, {"pose": real_path}, 400),
        ("POST", p, {"pose": fake(real_path.encode())}, 422),
        # corrupt .pose bytes
        ("POST", p, {"pose": fake(b"hello")}, 422),
        ("POST", p, {"pose": fake(header_only)}, 422),
        ("POST", p, {"pose": fake(flipped)}, 422),
        ("POST", p, {"pose": fake(os.urandom(5000))}, 422),
        ("POST", p, {"pose": [fake(good), fake(good[:-7])]}, 422),
        # limits: body size, items, text length, frames
        ("POST", t, too_big, 413),
        ("POST", t, {"text": ["a"] * (LIMITS["max_items"] + 1)}, 413),
        ("POST", t, {"text": "y" * (LIMITS["max_text_chars"] + 1)}, 413),
        ("POST", p, {"pose": [fake(good)] * (LIMITS["max_items"] + 1)}, 413),
        ("POST", p, {"pose": b64(poses["huge"])}, 413),  # 250 frames > max_pose_frames 200
        # unknown routes and wrong methods
        ("POST", "/api/embed/video", {"text": "a"}, 404),
        ("POST", "/api/embed/", {"text": "a"}, 404),
        ("GET", "/api/embed", None, 404),
        ("GET", "/nothing", None, 404),
        ("DELETE", t, None, 405),
        ("PUT", p, {"pose": fake(good)}, 405),
        ("POST", "/health", None, 405),
        ("PATCH", "/api/score", None, 405),
    ]


def test_malformed_inputs_get_4xx_json(api, poses, expected):
    for method, path, body, want in malformed_corpus(poses):
        status, _, data = api.request(method, path, body)
        what = f"{method} {path} {str(body)[:80]!r}"
        assert status == want, f"{what}: {status} {data}"
        assert isinstance(data, dict) and isinstance(data.get("error"), str), what
        assert data["status"] == status and data["error"], what
    # Chunked upload over the limit (no Content-Length to check up front).
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    chunks = (b"x" * 65536 for _ in range(LIMITS["max_body_bytes"] // 65536 + 4))
    conn.request("POST", "/api/embed/text", body=chunks, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "error" in json.loads(resp.read())
    conn.close()
    # Still serving, and nothing above reached the internal-error handler.
    status, _, data = api.request("POST", "/api/embed/text", {"text": TEXTS[1]})
    assert status == 200
    np.testing.assert_allclose(data["embeddings"][0], expected[TEXTS[1]], atol=1e-5)
    log = api.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


def raw_exchange(port: int, data: bytes, wait_s: float = 15.0) -> tuple[int, dict, float]:
    """Sends raw bytes, reads until the server closes -> (status, JSON body, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:500]
    return int(head.split(b" ", 2)[1]), json.loads(body), time.monotonic() - start


def test_protocol_errors_get_4xx_json(api):
    """Issue 17: errors gunicorn answers before the app sees the request, and a malformed
    chunked body, are JSON {"error", "status"}, never HTML or a 500."""
    ok = b"Host: x\r\nContent-Type: application/json\r\n"
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"POST /api/embed/text HTTP/1.1\r\n" + ok + b"Content-Length: abc\r\n\r\n", 400),
        (b"POST /api/embed/text HTTP/1.1\r\n" + ok + b"Content-Length: -5\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
         + b"\r\n", 431),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"POST /api/embed/text HTTP/1.1\r\n" + ok + b"Transfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n{}\r\n0\r\n\r\n", 400),
        (b"POST /api/embed/text HTTP/1.1\r\n" + ok + b"Transfer-Encoding: chunked\r\n\r\n"
         b"5\r\n{}\r\n0\r\n\r\n", 400),
    ]  # fmt: skip
    for data, want in cases:
        status, body, _ = raw_exchange(api.port, data)
        assert (status, body["status"]) == (want, want), (data[:80], status, body)
        assert isinstance(body["error"], str) and body["error"], body
    assert "Invalid chunk size" in raw_exchange(api.port, cases[-2][0])[1]["error"]
    status, _, _ = api.request("POST", "/api/embed/text", {"text": TEXTS[0]})
    assert status == 200
    log = api.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


def test_slow_clients_are_cut_off_while_others_are_served(api):
    """Issue 17: more half-sent requests than a worker has request threads (2 x 16) used to
    hold every thread for good; each now gets 408 within header_timeout_s (body_timeout_s for
    a half-sent body) of its first byte, and a normal client is answered meanwhile."""
    half_headers = b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: app"
    half_body = (b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 b"Content-Type: application/json\r\n\r\n{\"text\": ")  # fmt: skip
    slow = [half_headers] * 40 + [half_body] * 2
    with concurrent.futures.ThreadPoolExecutor(len(slow)) as pool:
        futures = [pool.submit(raw_exchange, api.port, data, 30.0) for data in slow]
        time.sleep(0.5)  # every thread of both workers is now waiting on a slow client
        start = time.monotonic()
        status, _, data = api.request("POST", "/api/embed/text", {"text": TEXTS[0]})
        served_s = time.monotonic() - start
        results = [f.result(timeout=60) for f in futures]
    assert status == 200 and np.shape(data["embeddings"]) == (1, 32)
    assert served_s < TIMEOUTS["header_timeout_s"] + 8, served_s
    for (status, body, took), data in zip(results, slow):
        limit = TIMEOUTS["header_timeout_s" if data is half_headers else "body_timeout_s"]
        what = "headers" if data is half_headers else "body"
        assert (status, body["status"]) == (408, 408), body
        assert body["error"] == f"request {what} not received within {limit:g} s"
        assert limit - 0.5 < took < limit + 8, (what, took)


def _worker_peak_rss(master: int) -> dict[int, int]:
    """pid -> peak RSS in bytes (VmHWM) of each gunicorn worker (children of `master`)."""
    out = {}
    for pid in gunicorn_workers(master):
        try:
            out[pid] = proc_status_bytes(pid, "VmHWM")
        except (OSError, TypeError):
            continue  # a process that just ended
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_amplifying_pose_files_are_refused_before_decoding(api):
    """Issue 17: a ~150 KB v0.0 file declaring 65,535 empty frames (3 GB to decode), its
    65,535-point variant (~128 GB), and a file within the frame limit but over the decoding
    memory the body limit allows: 413 each, worker peak RSS grows by < 50 MB."""
    from tests.data.malformed import amplification, points_header

    fake = lambda b: base64.b64encode(bytes(b)).decode()
    cases = {
        "frames": amplification(),
        "points": amplification(points_header(65_535)),
        "memory": amplification(points_header(4_000), LIMITS["max_pose_frames"] - 1),
    }
    before = _worker_peak_rss(api.proc.pid)
    assert before, "no gunicorn workers found"
    for kind, data in cases.items():
        for _ in range(3):  # both workers, most likely
            status, _, body = api.request("POST", "/api/embed/pose", {"pose": fake(data)})
            assert status == 413, (kind, status, body)
            assert body["error"].startswith("'pose'[0]: "), body
    after = _worker_peak_rss(api.proc.pid)
    for pid, peak in before.items():
        assert after.get(pid, peak) - peak < 50 * 2**20, (pid, peak, after.get(pid))


def test_video_field_without_video_support(api):
    """`video` (base64 of a video file) goes through signclip_jax.video when installed; without
    it the answer says so (501), never a 500."""
    status, _, data = api.request("POST", "/api/embed/pose", {"video": "AAAA"})
    if status == 501:
        assert data["error"] == "'video'[0]: " + video_input.VIDEO_HELP  # no server paths
    else:  # the video module exists in this tree: four zero bytes are no video
        assert status == 422 and "video" in data["error"]


def test_real_recordings(api, shared_pose, tmp_path, tiny_workdir):
    house = shared_pose("spreadthesign-ase-house.pose")
    reduced = shared_pose("pose-format-mediapipe.pose")
    out = tmp_path / "house.npz"
    with redirect_stderr(io.StringIO()):
        code = embed_lib.main([f"--workdir={tiny_workdir}", "--poses", str(house),
                               f"--out={out}", "--batch_size=8", "-q"])  # fmt: skip
    assert code == 0
    status, _, data = api.request("POST", "/api/embed/pose", {"pose": b64(house)})
    assert status == 200
    np.testing.assert_allclose(data["embeddings"], np.load(out)["pose_embeddings"], atol=1e-5)
    status, _, data = api.request("POST", "/api/embed/pose", {"pose": b64(reduced)})
    assert status == 422 and "POSE_LANDMARKS lacks" in data["error"]


# ---------------------------------------------------------------------------------- load
@pytest.mark.slow
def test_concurrent_load(api, poses, expected):
    """8 clients x 50 requests (texts, poses, scores) on keep-alive connections: every answer
    correct, zero errors; prints latency percentiles and throughput."""
    clients, per_client = 8, 50
    bodies = {
        "p12": {"pose": b64(poses["p12"])},
        "p30": {"pose": b64(poses["p30"])},
    }
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        try:
            for i in range(per_client):
                kind = ("text", "pose", "score")[(k + i) % 3]
                text = TEXTS[rng.integers(len(TEXTS))]
                pose = ("p12", "p30")[rng.integers(2)]
                if kind == "text":
                    path, body, want = "/api/embed/text", {"text": text}, [expected[text]]
                elif kind == "pose":
                    path, body, want = "/api/embed/pose", bodies[pose], [expected[pose]]
                else:
                    path, body = "/api/score", {**bodies[pose], "text": [text]}
                    want = [[float(expected[pose] @ expected[text])]]
                start = time.perf_counter()
                status, _, data = api.request("POST", path, body, conn=conn)
                took = time.perf_counter() - start
                key = "scores" if kind == "score" else "embeddings"
                ok = status == 200 and np.allclose(data[key], want, atol=1e-4)
                with lock:
                    latencies.append(took)
                    if not ok:
                        errors.append(f"{path} {status} {str(data)[:200]}")
        finally:
            conn.close()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        done, not_done = concurrent.futures.wait(futures, timeout=120)
    wall = time.perf_counter() - start
    assert not not_done, "load test did not finish in 120 s"
    for f in done:
        f.result()
    assert errors == [], errors[:5]
    assert len(latencies) == clients * per_client
    ms = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    print(
        f"\nload: {clients} clients x {per_client} requests in {wall:.2f} s = "
        f"{len(latencies) / wall:.1f} req/s; latency p50 {ms[0]:.1f} ms, p90 {ms[1]:.1f} ms, "
        f"p99 {ms[2]:.1f} ms"
    )
    # Concurrent requests were merged into shared model calls (counters of the worker asked).
    _, _, ready = api.request("GET", "/ready")
    assert ready["model_calls"] < ready["requests"], ready


# ---------------------------------------------------------------------------------- failures
def test_cli_help_and_usage_errors(tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "signclip_jax.serve", *a], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    r = run("--help")
    assert r.returncode == 0 and "/api/embed/pose" in r.stdout and "--workers" in r.stdout
    r = run(f"--workdir={tmp_path}", "--port=1")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no checkpoints in")
    assert "Traceback" not in r.stderr
    r = run(f"--workdir={tmp_path}", "--port=99999")
    assert r.returncode == 2 and "--port" in r.stderr


def _mismatched_copy(tiny_workdir: Path, tmp_path: Path) -> Path:
    """A copy of the run whose model_config.json asks for one more video layer."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_workdir, broken)
    spec = json.loads((broken / "model_config.json").read_text())
    spec["video_layers"] += 1
    (broken / "model_config.json").write_text(json.dumps(spec))
    return broken


def test_checkpoint_that_cannot_load_is_refused_before_gunicorn_starts(tiny_workdir, tmp_path):
    """The checkpoint is read in full before any worker forks (in a spawned process): a
    checkpoint that does not match its model_config.json is a usage error, exit 2, and
    gunicorn never starts. (Damaged steps: tests/test_damaged_checkpoint.py.)"""
    broken = _mismatched_copy(tiny_workdir, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "signclip_jax.serve", f"--workdir={broken}", "--port=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {broken / 'checkpoints' / '4'}: the checkpoint does not")
    assert "Traceback" not in r.stderr and "gunicorn" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_worker_that_cannot_load_stops_gunicorn(tiny_workdir, tmp_path):
    """gunicorn's own CLI (no check before the workers fork): the worker reports the error and
    exits, gunicorn stops with code 4 instead of serving 503s or restarting it forever."""
    broken = _mismatched_copy(tiny_workdir, tmp_path)
    port = portpicker.pick_unused_port()
    env = {**os.environ, "SIGNCLIP_WORKDIR": str(broken), "SIGNCLIP_BATCH_SIZE": "8"}
    log = tmp_path / "gunicorn.log"
    cmd = [sys.executable, "-m", "gunicorn", "-k", server_lib.WORKER_CLASS, "-w", "1",
           "-b", f"127.0.0.1:{port}", "--timeout", "600", "--no-control-socket",
           "signclip_jax.serve:create_app()"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(180)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == app_lib.APP_LOAD_ERROR, text[-2000:]
    assert "error: loading the model failed" in text and "does not match" in text


# ---------------------------------------------------------------------------------- units
def test_settings_from_env():
    s = ServeSettings.from_env(
        {"SIGNCLIP_WORKDIR": "/w", "SIGNCLIP_BATCH_SIZE": "16", "SIGNCLIP_WARM_UP": "false",
         "SIGNCLIP_BATCH_WAIT_MS": "0.5", "SIGNCLIP_MODEL_NAME": "", "OTHER": "x"}
    )  # fmt: skip
    assert (s.workdir, s.batch_size, s.warm_up, s.batch_wait_ms) == ("/w", 16, False, 0.5)
    assert s.model_name == "default" and s.checkpoint is None
    with pytest.raises(UserError, match="SIGNCLIP_BATCH_SIZE='many'"):
        ServeSettings.from_env({"SIGNCLIP_WORKDIR": "/w", "SIGNCLIP_BATCH_SIZE": "many"})
    with pytest.raises(UserError, match="no model"):
        ServeSettings.from_env({})
    with pytest.raises(UserError, match="max_items must be >= 1"):
        ServeSettings.from_env({"SIGNCLIP_CHECKPOINT": "/c", "SIGNCLIP_MAX_ITEMS": "0"})


def test_app_whose_model_failed_to_load(tmp_path):
    """In-process (Flask test client): liveness stays up, readiness and the API say 503."""
    settings = ServeSettings(workdir=str(tmp_path), exit_on_load_error=False)
    host = app_lib.ModelHost(settings)
    app = app_lib.create_app(settings, host=host.start())
    assert host.wait(60) == "failed"
    client = app.test_client()
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and r.json["status"] == "failed"
    assert "no checkpoints" in r.json["error"]
    r = client.post("/api/embed/text", json={"text": "a"})
    assert r.status_code == 503 and "failed to load" in r.json["error"]


def test_full_queue_is_a_503_with_retry_after():
    """The model thread refuses work beyond max_queue (QueueFull); the client hears 503."""

    class FullBatcher:
        def submit(self, poses, texts):
            raise QueueFull("too many requests waiting")

    host = app_lib.ModelHost(ServeSettings(workdir="/w"))
    host.status = "ready"
    host.models["default"] = app_lib.ServedModel("default", None, FullBatcher(), {})
    with pytest.raises(app_lib.ApiError) as e:
        host.embed([], ["a"])
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert e.value.message == "server busy: too many requests waiting"


def test_video_unavailable_names_no_server_path(monkeypatch):
    """The video module's detail names its virtualenv on the server: logged, not answered."""

    def unavailable(data, *, name):
        raise video_input.VideoUnavailable(
            f"{name}: {video_input.VIDEO_HELP} (/srv/secret/venv/bin/python: not found)"
        )

    monkeypatch.setattr(video_input, "video_to_pose_bytes", unavailable)
    with pytest.raises(validation.ApiError) as e:
        validation.video_pose_bytes(b"0000", "'video'[0]")
    assert e.value.status == 501 and e.value.message == "'video'[0]: " + video_input.VIDEO_HELP


def test_read_deadline_and_json_errors_units():
    """ServeWorker's pieces: settings validation, the JSON error bytes, the read deadline."""
    with pytest.raises(UserError, match="header_timeout_s"):
        ServeSettings(workdir="/w", header_timeout_s=0).validated()
    s = ServeSettings.from_env({"SIGNCLIP_WORKDIR": "/w", "SIGNCLIP_BODY_TIMEOUT_S": "7.5"})
    assert (s.header_timeout_s, s.body_timeout_s) == (10.0, 7.5)
    raw = server_lib.json_error_response(431, "too big")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert json.loads(body) == {"error": "too big", "status": 431}
    assert f"Content-Length: {len(body)}".encode() in head
    a, b = socket.socketpair()
    with a, b:
        reads = server_lib._ReadDeadline(a)
        b.sendall(b"GET")
        assert reads.recv(10) == b"GET"  # not armed: a plain read
        reads.arm("headers", 0.3)
        start = time.monotonic()
        with pytest.raises(validation.SlowClient, match=r"headers not received within 0\.3 s"):
            while True:
                reads.recv(10)
        assert 0.25 < time.monotonic() - start < 2 and a.gettimeout() is None


# ---------------------------------------------------------------------------------- no Flask
@pytest.mark.parametrize("missing", ["flask", "gunicorn"])
def test_missing_serve_extra_is_one_clear_error(missing, tmp_path, monkeypatch):
    """Without the `serve` extra, --help still works and serving says what to install: one
    line, exit 2 (the check comes before the checkpoint is looked up)."""
    hint = "pip install 'signclip-jax[serve]'"
    monkeypatch.setitem(sys.modules, missing, None)  # import flask -> ModuleNotFoundError
    with pytest.raises(MissingExtra, match=rf"'{missing}'.*{re.escape(hint)}"):
        server_lib.main([f"--workdir={tmp_path}", "--port=1"])
    if missing == "flask":
        settings = ServeSettings(workdir=str(tmp_path))
        with pytest.raises(MissingExtra, match=re.escape(hint)):
            app_lib.create_app(settings, host=app_lib.ModelHost(settings))

    code = (
        f"import sys; sys.modules[{missing!r}] = None; from signclip_jax.cli import run_cli; "
        "from signclip_jax.serve import main; run_cli(main)"
    )
    run = lambda *a: subprocess.run(
        [sys.executable, "-c", code, *a], cwd=ROOT, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    r = run("--help")
    assert r.returncode == 0 and "/api/embed/pose" in r.stdout
    r = run(f"--workdir={tmp_path}", "--port=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: serve needs the optional package {missing!r}, which is not installed: {hint}"
    ]


# ---------------------------------------------------------------------------------- gunicorn
@pytest.mark.slow
def test_gunicorn_cli_serves_the_entry_module_app(tiny_workdir, expected, tmp_path):
    """`gunicorn ... 'signclip_jax.serve:create_app()'` with SIGNCLIP_* settings, as the
    module docstring shows: the same embeddings as the embed CLI."""
    port = portpicker.pick_unused_port()
    env = {**os.environ, "SIGNCLIP_WORKDIR": str(tiny_workdir), "SIGNCLIP_BATCH_SIZE": "8",
           "SIGNCLIP_WARM_UP": "0"}  # fmt: skip
    log = tmp_path / "gunicorn.log"
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1",
           "-b", f"127.0.0.1:{port}", "--timeout", "600", "--no-control-socket",
           "signclip_jax.serve:create_app()"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        api = Server(proc, port, log)
        assert api.wait_ready(timeout=240)["checkpoint"].endswith("checkpoints/4")
        status, _, data = api.request("POST", "/api/embed/text", {"text": TEXTS[:2]})
        assert status == 200, data
        np.testing.assert_allclose(data["embeddings"], [expected[t] for t in TEXTS[:2]], atol=1e-5)
    finally:
        stop(proc)
