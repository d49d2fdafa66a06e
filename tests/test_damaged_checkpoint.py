"""Damaged checkpoints (issue 17, item 2): a truncated data file or manifest in the latest step
is one error line (exit 2) for the inference commands, naming the step and the intact step to
pass with --checkpoint, with no traceback or asyncio noise; `train` resumes from the newest
step that restores and says so; a real architecture mismatch keeps its own error."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax import run as run_lib
from signclip_jax.train import loop as train_lib
from tests.helpers import tiny_config, write_pose

ROOT = Path(__file__).resolve().parents[1]


def _biggest_data_file(step_dir: Path) -> Path:
    data = sorted((step_dir / "params" / "ocdbt.process_0" / "d").iterdir(),
                  key=lambda p: p.stat().st_size)  # fmt: skip
    return data[-1]


def _truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def damaged(tiny_workdir, tmp_path_factory) -> Path:
    """A copy of tiny_workdir whose latest step (4) has a truncated parameter data file."""
    copy = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_workdir, copy)
    _truncate(_biggest_data_file(copy / "checkpoints" / "4"))
    return copy


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


def _assert_one_line(res: subprocess.CompletedProcess, workdir: Path) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "Event loop" not in res.stderr, res.stderr
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1, res.stderr
    assert f"{workdir / 'checkpoints' / '4'}: damaged checkpoint" in res.stderr
    assert f"--checkpoint={workdir / 'checkpoints' / '2'}" in res.stderr


@pytest.mark.parametrize("command", ["embed", "evaluate", "convert"])
def test_inference_commands_name_the_damaged_and_the_intact_step(damaged, tmp_path, command):
    if command == "embed":
        pose = write_pose(tmp_path / "a.pose", 30, seed=1)
        args = ["signclip_jax.embed", f"--workdir={damaged}", f"--poses={pose}",
                f"--out={tmp_path / 'e.npz'}"]  # fmt: skip
    elif command == "evaluate":
        args = ["signclip_jax.evaluate", f"--workdir={damaged}"]
    else:
        args = ["signclip_jax.convert", "to-pytorch", f"--workdir={damaged}", "--format=hf",
                f"--out={tmp_path / 'hf'}"]  # fmt: skip
    _assert_one_line(_cli(*args), damaged)


def test_the_named_intact_step_loads(damaged):
    run = run_lib.load_run(checkpoint=damaged / "checkpoints" / "2")
    assert run.step == 2


def test_truncated_manifest_is_damage_not_a_mismatch(tiny_workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_workdir, copy)
    _truncate(copy / "checkpoints" / "4" / "params" / "manifest.ocdbt", 50)
    with pytest.raises(ckpt_lib.DamagedCheckpoint) as info:
        run_lib.load_run(copy)
    message = str(info.value)
    assert "\n" not in message and "does not match" not in message
    assert message.startswith(f"{copy / 'checkpoints' / '4'}: damaged checkpoint")
    assert f"--checkpoint={copy / 'checkpoints' / '2'}" in message


def test_no_intact_step_says_so(tiny_workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_workdir, copy)
    for step in ("2", "4"):
        _truncate(_biggest_data_file(copy / "checkpoints" / step))
    with pytest.raises(ckpt_lib.DamagedCheckpoint, match=r"no other step in .* restores"):
        run_lib.load_run(copy)


def test_a_real_mismatch_keeps_its_error(tiny_workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_workdir, copy)
    spec = json.loads((copy / "model_config.json").read_text())
    spec["video_layers"] = 1 if spec["video_layers"] == 2 else 2
    (copy / "model_config.json").write_text(json.dumps(spec))
    with pytest.raises(run_lib.UserError, match="does not match") as info:
        run_lib.load_run(copy)
    assert not isinstance(info.value, ckpt_lib.DamagedCheckpoint)


def _train_losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}  # last one wins


def test_train_resumes_from_the_newest_intact_step(tiny_workdir, tmp_path, caplog):
    """tiny_workdir: 4 steps, checkpoints at 2 and 4. Step 4 damaged: the run resumes from 2
    and ends where the undamaged run ended, bit for bit."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_workdir, copy)
    _truncate(_biggest_data_file(copy / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING, logger="signclip_jax.checkpoint"):
        train_lib.train(tiny_config(tmp_path / "synthetic"), str(copy))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 4 is damaged: resuming from step 2" in w for w in warnings), warnings
    assert (copy / ckpt_lib.DAMAGED_DIR / "4" / "params").exists()  # kept aside, not deleted
    assert ckpt_lib.Checkpointer(copy).all_steps() == [2, 4]
    assert _train_losses(copy)[4] == _train_losses(tiny_workdir)[4]
    want = run_lib.load_run(tiny_workdir).params()
    got = run_lib.load_run(copy).params()
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("damage", ["data file", "manifest"])
def test_serve_refuses_a_damaged_step_before_starting_workers(damaged, tiny_workdir, tmp_path,
                                                              damage):  # fmt: skip
    """`serve` reads the checkpoint in full before gunicorn forks its workers: one line, exit 2,
    naming the step and the intact one (it used to exit 4 after a worker failed to boot)."""
    workdir = damaged
    if damage == "manifest":
        workdir = tmp_path / "run"
        shutil.copytree(tiny_workdir, workdir)
        _truncate(workdir / "checkpoints" / "4" / "params" / "manifest.ocdbt", 50)
    res = _cli("signclip_jax.serve", f"--workdir={workdir}", "--port=1", "--batch_size=8")
    _assert_one_line(res, workdir)
    assert "gunicorn" not in res.stderr and "Booting worker" not in res.stderr
