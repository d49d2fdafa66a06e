"""signclip_jax.run: restoring a workdir or one checkpoint, and the errors for bad run folders."""

import json

import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.errors import UserError


@pytest.fixture(scope="module")
def run(tiny_workdir):
    return run_lib.load_run(tiny_workdir)


def test_load_run_restores_latest_and_named_checkpoint(tiny_workdir, run):
    assert run.step == 4 and run.step_dir.name == "4"
    assert run.model_config.hidden_size == 32
    other = run_lib.load_run(checkpoint=tiny_workdir / "checkpoints" / "2")
    assert other.step == 2 and other.workdir == run.workdir
    a = run.model.video_encoder.videomlp.linear1.kernel[...]
    b = other.model.video_encoder.videomlp.linear1.kernel[...]
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # two steps of training apart


def test_load_run_errors(tmp_path, tiny_workdir):
    with pytest.raises(UserError, match="no checkpoints"):
        run_lib.load_run(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint step directory"):
        run_lib.load_run(checkpoint=tmp_path)
    # A model_config.json that disagrees with the checkpoint is a clear error.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_workdir, copy)
    spec = json.loads((copy / "model_config.json").read_text())
    spec["video_layers"] = 1 if spec["video_layers"] == 2 else 2
    (copy / "model_config.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="does not match"):
        run_lib.load_run(copy)
