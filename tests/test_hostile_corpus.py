"""Every hostile input of issue 17 in one place, table-driven, on generated files (no network).

Each case ends in a clear error whose message is checked, or in a counted skip (a training
source's skipped examples, the embed CLI's failed files):

- AMPLIFYING: the issue's .pose files (65,535 declared frames of "0 people" in format v0.0,
  ~150 KB; its 65,535-point variant) through every reader of READERS (pose reads, the
  Embedder and the embed CLI's file loop, the server's request parsing, training records and
  sources), in one subprocess that loads the model once and measures each case's peak RSS
  growth (/proc/self/clear_refs, then VmHWM): at most RSS_BOUND.
- MALFORMED: the malformed-file corpus (tests/data/malformed.py) and the other hostile
  headers, through the readers' common entry (`load_features`) and the server's validation.
- damaged checkpoints (a truncated data file, a truncated manifest) through `load_run`, which
  embed, evaluate, convert and serve use.
- unwritable output paths (`train --workdir`, `embed --out`).
- bad HTTP requests against the real gunicorn server (`python -m signclip_jax.serve`).

Not repeated here (slower, each in its own test): the command lines' exit codes on a damaged
step (tests/test_damaged_checkpoint.py, including serve's) and train's resume from the
intact step; the unwritable train workdir through its CLI (tests/train/test_loop.py); slow
clients against two workers (tests/serving/test_server.py); hostile requests under load with
worker RSS (tests/serving/test_load.py); the control showing that the RSS method sees an
unchecked amplification (tests/data/test_hostile_pose.py); every malformed file skipped and
counted by the training pipeline (tests/data/test_pipeline.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signclip_jax import files
from signclip_jax.data import pipeline
from signclip_jax.data import pose as pose_lib
from signclip_jax.data.pose import PoseLimitError
from signclip_jax.errors import DataError, UserError
from signclip_jax.serving import app as app_lib
from signclip_jax.serving import validation
from signclip_jax.serving.settings import ServeSettings
from tests.data.malformed import amplification, hostile_poses, points_header, write_malformed_poses
from tests.data.test_hostile_pose import EXPECTED as HOSTILE_EXPECTED
from tests.helpers import write_pose
from tests.serving.test_server import Server, raw_exchange, start_server, stop
from tests.test_damaged_checkpoint import _biggest_data_file, _truncate

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
RSS_BOUND = 50 * MB  # peak RSS growth allowed per amplification case (decoding asks for GBs)

# name -> (bytes, words of the readers' refusal, words of the server's refusal: its own
# max_pose_frames, 10,000 by default, comes before the memory estimate)
AMPLIFYING = {
    "65535_empty_frames": (
        amplification(),
        HOSTILE_EXPECTED["v00_65535_empty_frames"][1],
        ["65535 frames; at most 10000 per pose"],
    ),
    "65535_points": (
        amplification(points_header(65_535)),
        HOSTILE_EXPECTED["v00_65535_points"][1],
        ["at least 65535 points per person", "MAX_POSE_POINTS"],
    ),
}


# ---------------------------------------------------------------------------------- readers
@dataclasses.dataclass
class Context:
    """What the readers need: the tiny run's Embedder and config, and two good poses."""

    embedder: Any
    config: Any
    good: list[Path]
    folder: Path

    @classmethod
    def create(cls, workdir: str | os.PathLike, folder: Path) -> Context:
        from signclip_jax import run as run_lib
        from signclip_jax.serving import embedder as embedder_lib

        run = run_lib.load_run(workdir)
        config = run.config.copy_and_resolve_references()
        config.data.max_bad_fraction = 1.0  # every example may be bad: we count them
        config.data.workers = 0
        good = [write_pose(folder / f"good{i}.pose", 30 + 10 * i, seed=i) for i in range(2)]
        return cls(embedder_lib.Embedder(run, batch_size=2), config, good, folder)

    def manifest(self, path: Path) -> Any:
        from signclip_jax.data import sources

        rows = [{"pose": str(p), "text": "house"} for p in (*self.good, path)]
        manifest = self.folder / f"{path.stem}.jsonl"
        manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return sources.ManifestSource(manifest)


def _raised(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except Exception as e:  # what the reader raised is the outcome under test
        return {
            "raised": type(e).__name__,
            "message": getattr(e, "message", str(e)),
            "status": getattr(e, "status", None),
            "limit": isinstance(e, PoseLimitError),
            "data_error": isinstance(e, DataError),
        }
    return {"raised": None, "message": "(nothing raised)"}


def _embed_files(ctx: Context, path: Path, data: bytes) -> dict[str, Any]:
    from signclip_jax.serving import embed as embed_lib

    files_in = [str(path), str(ctx.good[0])]
    emb, good, failed = embed_lib.embed_files(ctx.embedder, files_in, read_threads=2)
    return {
        "skipped": len(failed),
        "done": len(good),
        "rows": len(emb),
        "message": failed[0][1] if failed else "",
    }


def _server_request(ctx: Context, path: Path, data: bytes) -> dict[str, Any]:
    """The app's request parsing (base64, then the pose checks) with the default settings."""
    host = app_lib.ModelHost(ServeSettings(checkpoint="unused"))
    host.status = "ready"
    host.models[host.names[0]] = app_lib.ServedModel(host.names[0], ctx.embedder, None, {})
    body = {"pose": [base64.b64encode(data).decode()]}
    return _raised(lambda: app_lib.request_poses(body, host, required=True))


def _source(ctx: Context, path: Path, train: bool) -> dict[str, Any]:
    source = ctx.manifest(path)
    tokenizer = ctx.embedder.run.tokenizer
    if train:
        it = pipeline.make_train_iterator(
            source, ctx.config, tokenizer=tokenizer, seed=0, batch_size_per_process=2, num_epochs=1
        )
    else:
        it = pipeline.make_eval_batches(
            source, ctx.config, tokenizer=tokenizer, batch_size_per_process=2
        )
    rows = sum(len(b["index"]) if train else int(b["valid"].sum()) for b in it)
    stats = it.stats()
    return {
        "skipped": stats.skipped,
        "done": rows,
        "examined": stats.examined,
        "message": " | ".join(stats.examples),
    }


# reader -> read(ctx, path, data) -> outcome: {"raised": class, "message", "status", ...} or
# {"skipped": n, "done": n, "message"} (a counted skip)
READERS: dict[str, Callable[[Context, Path, bytes], dict[str, Any]]] = {
    "read_pose(bytes)": lambda ctx, path, data: _raised(
        lambda: pose_lib.read_pose(data, name="upload")
    ),
    "read_pose(path)": lambda ctx, path, data: _raised(lambda: pose_lib.read_pose(path)),
    "Embedder.pose_features": lambda ctx, path, data: _raised(
        lambda: ctx.embedder.pose_features(path)
    ),
    "Embedder.embed_poses": lambda ctx, path, data: _raised(
        lambda: ctx.embedder.embed_poses([ctx.good[0], path])
    ),
    "embed CLI (embed_files)": _embed_files,
    "server request_poses": _server_request,
    "training record (pose_path)": lambda ctx, path, data: _raised(
        lambda: pipeline.record_pose_array({"pose_path": str(path)}, ctx.embedder.spec)
    ),
    "training record (pose_bytes)": lambda ctx, path, data: _raised(
        lambda: pipeline.record_pose_array({"pose_bytes": data, "id": "row7"}, ctx.embedder.spec)
    ),
    "training source (eval pass)": lambda ctx, path, data: _source(ctx, path, train=False),
    "training source (train epoch)": lambda ctx, path, data: _source(ctx, path, train=True),
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_amplification(workdir: str, folder: str) -> dict[str, dict[str, Any]]:
    """Runs in a subprocess: every AMPLIFYING file through every reader, each after a reset of
    the peak RSS (clear_refs 5: VmHWM := VmRSS) -> "file|reader" -> outcome and "growth"."""
    folder = Path(folder)
    ctx = Context.create(workdir, folder)
    for _ in range(2):  # first uses (imports, compiles, thread arenas) are not counted
        for read in READERS.values():
            read(ctx, ctx.good[1], ctx.good[1].read_bytes())
    out = {}
    for name, (data, _, _) in AMPLIFYING.items():
        path = folder / f"{name}.pose"
        path.write_bytes(data)
        for reader, read in READERS.items():
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status("VmRSS")
            outcome = read(ctx, path, data)
            outcome["growth"] = _status("VmHWM") - before
            out[f"{name}|{reader}"] = outcome
    return out


_MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from absl import flags
flags.FLAGS.mark_as_parsed()
from tests import test_hostile_corpus as corpus
print("@@result " + json.dumps(corpus.measure_amplification(sys.argv[2], sys.argv[3])))
"""


# ---------------------------------------------------------------------------------- HTTP
LIMITS = dict(max_body_bytes=MB, max_items=16, max_pose_frames=200)
# Connection: close, so that raw_exchange (which reads until the server closes) ends at once
_HEAD = b"Host: x\r\nConnection: close\r\nContent-Type: application/json\r\n"


def _post(route: str, body: bytes, head: bytes = _HEAD) -> bytes:
    start = f"POST /api/embed/{route} HTTP/1.1\r\n".encode()
    return start + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _chunked(route: str, chunks: bytes) -> bytes:
    start = f"POST /api/embed/{route} HTTP/1.1\r\n".encode()
    return start + _HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks


def _pose_body(data: bytes) -> bytes:
    return b'{"pose": "' + base64.b64encode(data) + b'"}'


def _bad_http() -> dict[str, tuple[bytes, int, list[str]]]:
    """name -> (raw request, expected status, words the JSON error must hold)."""
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"  # 18 of them: over the 1 MiB limit
    oversize = f"limit of {MB} bytes"
    form = _HEAD.replace(b"application/json", b"multipart/form-data")
    frames, points = (_pose_body(data) for data, _, _ in AMPLIFYING.values())
    memory = _pose_body(amplification(points_header(4_000), 199))
    return {
        "malformed JSON": (_post("text", b'{"text": "a", '), 400, ["not valid JSON"]),
        "JSON not an object": (_post("text", b"[1, 2]"), 400, ["must be a JSON object"]),
        "bad base64": (_post("pose", b'{"pose": "!!!!"}'), 400, ["'pose'[0]", "not valid base64"]),
        "not UTF-8": (_post("text", b'{"text": "\xff"}'), 400, ["not UTF-8"]),
        "wrong content type": (_post("text", b"text=a", form), 400, ["not valid JSON"]),
        "oversize body": (_post("text", b"x" * (MB + 10)), 413, [oversize]),
        "oversize chunked body": (_chunked("text", chunk * 18 + b"0\r\n\r\n"), 413, [oversize]),
        "amplifying .pose (frames)": (
            _post("pose", frames),
            413,
            ["'pose'[0]: 65535 frames; at most 200 per pose"],
        ),
        "amplifying .pose (memory)": (
            _post("pose", memory),
            413,
            ["'pose'[0]: decoding 199 frames (199 without a person)", "at most 8 MiB per pose"],
        ),
        "amplifying .pose (points)": (_post("pose", points), 413, ["'pose'[0]: ", "65535 points"]),
        "pose over max_pose_frames": (
            _post("pose", _pose_body(amplification(frames=250))),
            413,
            ["'pose'[0]: 250 frames; at most 200"],
        ),
        "corrupt .pose": (_post("pose", _pose_body(b"\x00" * 64)), 422, ["'pose'[0]: "]),
        "too many items": (
            _post("text", b'{"text": ["a"' + b', "a"' * 16 + b"]}"),
            413,
            ["at most 16"],
        ),
        "unknown route": (_post("video", b"{}"), 404, []),
        "wrong method": (b"DELETE /api/embed/text HTTP/1.1\r\n" + _HEAD + b"\r\n", 405, []),
        "bad chunked body": (
            _chunked("text", b"zz\r\n{}\r\n0\r\n\r\n"),
            400,
            ["Invalid chunk size"],
        ),
        "bad request line": (b"GARBAGE\r\n\r\n", 400, []),
        "invalid Content-Length": (
            b"POST /api/embed/text HTTP/1.1\r\n" + _HEAD + b"Content-Length: abc\r\n\r\n",
            400,
            [],
        ),
        "header too large": (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            [],
        ),
        "URI too long": (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, []),
        "headers too slow": (
            b"POST /api/embed/text HTTP/1.1\r\nHost: x\r\n",
            408,
            ["request headers not received within 1 s"],
        ),
        "body too slow": (
            _post("text", b'{"text": ').replace(b"Content-Length: 9", b"Content-Length: 100"),
            408,
            ["request body not received within 1 s"],
        ),
    }


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus_server(tiny_workdir, tmp_path_factory):
    """One worker, no warm-up (no request here reaches the model), 1 s read deadlines.
    Started here, waited for by the HTTP cases: it boots while the other cases run."""
    log = tmp_path_factory.mktemp("corpus_log") / "server.log"
    args = [f"--{k}={v}" for k, v in LIMITS.items()]
    args += ["--header_timeout_s=1", "--body_timeout_s=1", "--no_warm_up", "--threads=8"]
    proc, port = start_server([f"--workdir={tiny_workdir}", "--batch_size=2", *args], log)
    try:
        yield Server(proc, port, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def amplified(corpus_server, tiny_workdir, tmp_path_factory) -> dict[str, dict[str, Any]]:
    if sys.platform != "linux":
        pytest.skip("the peak RSS is read from /proc/self (Linux)")
    folder = tmp_path_factory.mktemp("amplified")
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ROOT), str(tiny_workdir), str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("@@result ")][-1]
    return json.loads(line.removeprefix("@@result "))


# ---------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("name", list(AMPLIFYING))
def test_amplifying_pose_through_every_reader(amplified, name, reader):
    outcome = amplified[f"{name}|{reader}"]
    growth = outcome.pop("growth")
    assert growth < RSS_BOUND, f"peak RSS grew by {growth / MB:.0f} MiB: {outcome}"
    message = outcome["message"]
    words = AMPLIFYING[name][2 if reader == "server request_poses" else 1]
    assert all(word in message for word in words), (words, outcome)
    # The message names what was read: the file, the request item, the record, the upload.
    named = {
        "read_pose(bytes)": "upload: ",
        "training record (pose_bytes)": "row7: ",
        "server request_poses": "'pose'[0]: ",
    }.get(reader, f"{name}.pose: ")
    assert named in message, outcome
    if "skipped" in outcome:  # a counted skip; the good files still go through
        assert outcome["skipped"] == 1 and outcome["done"] >= 1, outcome
    elif reader == "server request_poses":
        assert outcome["status"] == 413 and message.startswith(named), outcome
    else:  # a limit, raised before pose-format allocates
        assert outcome["raised"] == "PoseLimitError" and outcome["limit"], outcome


def _malformed_cases() -> list[tuple[str, str, list[str]]]:
    """(kind, file name, words): the malformed corpus, then the other hostile headers."""
    words = {
        "unreadable": ["not a readable .pose file", "unknown format version"],
        "truncated": ["truncated or corrupt", "needs 110592 bytes"],
        "empty": ["pose file is empty (0 bytes)"],
        "zero_frames": ["pose has no frames"],
        "all_missing": ["no landmark is observed"],
        "no_shoulders": ["shoulders", "never both observed"],
        "only_hands": ["POSE_LANDMARKS is absent", "LEFT_HAND_LANDMARKS (21 points)"],
        "non_holistic": ["pose_keypoints_2d (7 points)"],
        "nan": ["NaN or infinite"],
        "missing": ["pose file not found"],
    }
    cases = [(kind, f"{kind}.pose", w) for kind, w in words.items()]
    amplifying = ("v00_65535_empty_frames", "v00_65535_points")  # AMPLIFYING, measured above
    cases += [(k, f"{k}.pose", w) for k, (_, w) in HOSTILE_EXPECTED.items() if k not in amplifying]
    return cases


@pytest.fixture(scope="module")
def malformed_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("malformed")
    kinds = set(write_malformed_poses(folder).values())
    for kind, data in hostile_poses().items():
        (folder / f"{kind}.pose").write_bytes(data)
    assert kinds == {k for k, _, _ in _malformed_cases()} - set(hostile_poses())
    return folder


@pytest.mark.parametrize(("kind", "file", "words"), _malformed_cases())
def test_malformed_pose_file(malformed_dir, kind, file, words):
    """The readers' common entry names the file; the server's validation answers 413 for a
    limit, 422 for anything else, naming the request item."""
    path = malformed_dir / file
    with pytest.raises(DataError) as info:
        pose_lib.load_features(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and all(w in message for w in words), message
    limit = isinstance(info.value, PoseLimitError)
    if not path.exists():
        return  # "missing": there are no bytes to send
    # The readers' frame limit (the server's own, lower max_pose_frames: the cases above).
    with pytest.raises(validation.ApiError) as info:
        validation.pose_features(
            path.read_bytes(),
            pose_lib.PoseSpec(),
            name="'pose'[0]",
            max_frames=pose_lib.MAX_POSE_FRAMES,
        )
    assert info.value.status == (413 if limit else 422), (kind, info.value.message)
    assert info.value.message.startswith("'pose'[0]: ")
    assert all(w in info.value.message for w in words), info.value.message


@pytest.mark.parametrize("damage", ["truncated data file", "truncated manifest"])
def test_damaged_checkpoint(tiny_workdir, tmp_path, damage):
    """What every inference command (and serve, before its workers fork) hits: one line
    naming the step, the cause and the intact step (the commands' exit 2:
    tests/test_damaged_checkpoint.py)."""
    from signclip_jax import checkpoint as ckpt_lib
    from signclip_jax import run as run_lib

    copy = tmp_path / "run"
    shutil.copytree(tiny_workdir, copy)
    step = copy / "checkpoints" / "4"
    if damage == "truncated data file":
        _truncate(_biggest_data_file(step))
    else:
        _truncate(step / "params" / "manifest.ocdbt", 50)
    with pytest.raises(ckpt_lib.DamagedCheckpoint) as info:
        run_lib.load_run(copy)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{step}: damaged checkpoint, cannot be")
    # tensorstore's status: a byte range past the end; a manifest that does not decode
    cause = "OUT_OF_RANGE" if damage == "truncated data file" else "DATA_LOSS"
    assert cause in message, message
    assert message.endswith(f"pass --checkpoint={copy / 'checkpoints' / '2'}"), message


def _unwritable(tmp_path: Path) -> list[tuple[str, Path]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("a file", a_file), ("under a file", a_file / "sub")]
    if Path("/proc/self").exists():  # unwritable for root too
        cases.append(("/proc", Path("/proc/signclip-out")))
    return cases


@pytest.mark.parametrize("command", ["train --workdir", "embed --out"])
def test_unwritable_path(tmp_path, command):
    """Refused before any work (no model loaded: the workdir here is not even a run), naming
    the path and the reason; nothing is written."""
    from signclip_jax.serving import embed as embed_lib

    for where, path in _unwritable(tmp_path):
        if command == "train --workdir":  # what the train CLI checks first
            call = functools.partial(files.check_writable_dir, path, "--workdir")
            prefix = f"--workdir: cannot write in {path} ("
        else:
            out = path / "emb.npz"
            argv = [f"--workdir={tmp_path / 'no_run'}", "--texts", "a", f"--out={out}", "-q"]
            call = functools.partial(embed_lib.main, argv)
            prefix = f"--out {out}: cannot write in {path} ("
        with pytest.raises(UserError) as info:
            call()
        assert str(info.value).startswith(prefix), (where, str(info.value))
    assert (tmp_path / "a_file").read_text() == "x"


def test_bad_http(corpus_server):
    """Every bad request, concurrently: its status and a JSON error naming the problem; then
    the server still answers and logged no traceback."""
    cases = _bad_http()
    corpus_server.wait_ready(timeout=240)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {
            name: pool.submit(raw_exchange, corpus_server.port, data, 30.0)
            for name, (data, _, _) in cases.items()
        }
        answers = {name: f.result(timeout=120) for name, f in futures.items()}
    wrong = {}
    for name, (_, want, words) in cases.items():
        status, body, _ = answers[name]
        ok = status == want == body.get("status") and isinstance(body.get("error"), str)
        if not (ok and body["error"] and all(w in body["error"] for w in words)):
            wrong[name] = (status, want, body)
    assert wrong == {}, wrong
    status, _, data = corpus_server.request("POST", "/api/embed/text", {"text": "a"})
    assert status == 200 and len(data["embeddings"]) == 1
    log = corpus_server.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
