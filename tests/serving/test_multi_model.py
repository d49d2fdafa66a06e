"""Several models per server (`serve --model=NAME=REF`, repeatable) and `--model=REF` alone.

Two tiny runs with different random weights (tests/interop/fast_run.py): one server answers
each `model_name` with that model's own embeddings, the first by default; an unknown name is
a 400 naming the served ones; /health lists both.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import signclip_jax
from signclip_jax.errors import UserError
from signclip_jax.serving import app as app_lib
from signclip_jax.serving.settings import ServeSettings, split_model_entry
from tests.helpers import write_pose
from tests.interop.fast_run import make_run
from tests.serving.test_server import ROOT, Server, b64, start_server, stop

TEXTS = ["<en> <ase> house", "hello"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multi_runs")
    return {name: str(make_run(root / name, seed=i)) for i, name in enumerate(("alpha", "beta"))}


@pytest.fixture(scope="module")
def pose(tmp_path_factory):
    return write_pose(tmp_path_factory.mktemp("multi_pose") / "p.pose", 30, seed=3)


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """alpha named, beta by its folder's name; started before `expected` computes."""
    log = tmp_path_factory.mktemp("multi_log") / "server.log"
    args = [f"--model=first={runs['alpha']}", f"--model={runs['beta']}", "--workers=1",
            "--threads=4", "--batch_size=4", "--no_warm_up"]  # fmt: skip
    proc, port = start_server(args, log)
    try:
        yield Server(proc, port, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def expected(runs, pose) -> dict[str, dict[str, np.ndarray]]:
    """Each model alone (signclip_jax.load): its text and pose embeddings."""
    out = {}
    for name, ref in runs.items():
        model = signclip_jax.load(ref, batch_size=4)
        out[name] = {"text": model.embed_texts(TEXTS), "pose": model.embed_poses([pose])}
    return out


@pytest.fixture(scope="module")
def api(server, expected) -> Server:
    server.wait_ready(timeout=240)
    return server


def test_each_model_name_answers_with_its_own_model(api, expected, pose):
    a, b = expected["alpha"], expected["beta"]
    assert np.abs(a["text"] - b["text"]).max() > 1e-3  # two different models
    for name, want in (("first", a), ("beta", b), (None, a)):  # None: the default, the first
        extra = {} if name is None else {"model_name": name}
        status, _, data = api.request("POST", "/api/embed/text", {"text": TEXTS, **extra})
        assert status == 200, data
        np.testing.assert_allclose(data["embeddings"], want["text"], atol=1e-5)
        status, _, data = api.request("POST", "/api/embed/pose", {"pose": b64(pose), **extra})
        assert status == 200, data
        np.testing.assert_allclose(data["embeddings"], want["pose"], atol=1e-5)
        status, _, data = api.request(
            "POST", "/api/score", {"pose": b64(pose), "text": TEXTS, **extra}
        )
        assert status == 200, data
        np.testing.assert_allclose(data["scores"], want["pose"] @ want["text"].T, atol=1e-4)


def test_unknown_model_name_is_a_400_listing_the_served_names(api):
    status, _, data = api.request("POST", "/api/embed/text", {"text": "a", "model_name": "x"})
    assert status == 400
    assert data["error"] == "unknown model_name 'x': this server serves 'first', 'beta'"


def test_health_and_ready_list_both_models(api, runs):
    status, _, data = api.request("GET", "/health")
    assert status == 200 and data["status"] == "ok"
    assert [m["name"] for m in data["models"]] == ["first", "beta"]
    for m, run in zip(data["models"], (runs["alpha"], runs["beta"])):
        assert m["checkpoint"] == f"{run}/checkpoints/0"
        assert (m["hidden_size"], m["max_frames"]) == (32, 96)
    status, _, data = api.request("GET", "/ready")
    assert status == 200 and data["model_name"] == "first"  # the default's fields on top
    assert [m["model_name"] for m in data["models"]] == ["first", "beta"]


def test_single_model_ref_is_served_as_default(runs, expected):
    """--model=RUN_DIR alone (settings.model, as serve passes it): named "default"; in
    process, through the Flask test client."""
    settings = ServeSettings(model=runs["beta"], warm_up=False, batch_size=4).validated()
    assert settings.served() == [("default", runs["beta"])]
    app = app_lib.create_app(settings)
    client = app.test_client()
    r = client.post("/api/embed/text", json={"text": TEXTS, "model_name": "default"})
    assert r.status_code == 200, r.json
    np.testing.assert_allclose(r.json["embeddings"], expected["beta"]["text"], atol=1e-5)
    assert [m["name"] for m in client.get("/health").json["models"]] == ["default"]
    r = client.post("/api/embed/text", json={"text": "a", "model_name": "beta"})
    assert r.status_code == 400 and "serves 'default'" in r.json["error"]


def test_a_model_that_cannot_be_served_is_named_before_gunicorn_starts(runs, tmp_path):
    """Every model is verified first: one line naming the model, exit 2, no gunicorn."""
    missing = tmp_path / "nothing"
    r = subprocess.run(
        [sys.executable, "-m", "signclip_jax.serve", f"--model=a={runs['alpha']}",
         f"--model=b={missing}", "--port=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: model 'b': --model {missing} does not exist"]


def test_model_entries_and_names():
    assert split_model_entry("asl=runs/a") == ("asl", "runs/a")
    assert split_model_entry("runs/x=y") == (None, "runs/x=y")  # "runs/x" is no name
    assert split_model_entry("hf-hub:org/m@v1") == (None, "hf-hub:org/m@v1")
    assert split_model_entry("big=hf-hub:org/m") == ("big", "hf-hub:org/m")
    s = ServeSettings(model=("runs/a", "x=runs/checkpoints/b"), model_name="ignored")
    assert s.validated().served() == [("a", "runs/a"), ("x", "runs/checkpoints/b")]
    s = ServeSettings.from_env({"SIGNCLIP_MODEL": "one=/r/1; /r/2/checkpoints/7"})
    assert s.served() == [("one", "/r/1"), ("2", "/r/2/checkpoints/7")]
    assert ServeSettings(model=("/r/a",), model_name="sl").validated().served() == [("sl", "/r/a")]
    with pytest.raises(UserError, match=r"two models are named 'a'.*NAME=REF"):
        ServeSettings(model=("/x/a", "/y/a")).validated()
    with pytest.raises(UserError, match="no model reference"):
        ServeSettings(model=("name=",)).validated()
    with pytest.raises(UserError, match="either --model"):
        ServeSettings(model="/r", workdir="/w").validated()
    with pytest.raises(UserError, match="--model=REF"):
        ServeSettings().validated()
