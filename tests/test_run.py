"""signclip_jax.run: the run directory and the one factory (config, run, step directory),
restoring a workdir or one checkpoint, and the errors for bad run folders."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from signclip_jax import run as run_lib
from signclip_jax.data.text import load_tokenizer
from signclip_jax.errors import UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.train import losses, sharding
from tests.helpers import tiny_config


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
    copy = tmp_path / "copy"
    shutil.copytree(tiny_workdir, copy)
    spec = json.loads((copy / "model_config.json").read_text())
    spec["video_layers"] = 1 if spec["video_layers"] == 2 else 2
    (copy / "model_config.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="does not match"):
        run_lib.load_run(copy)


# ---------------------------------------------------------------------------------- the factory
def test_source_from_config_builds_a_fresh_model(tmp_path):
    config = tiny_config(tmp_path)
    source = run_lib.source_from_config(config)
    assert (source.run_dir, source.step_dir, source.run_config) == (None, None, None)
    tokenizer = load_tokenizer("minilm")  # model.text_model's
    assert source.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert source.model_config == signclip_model.model_config(config, tokenizer=tokenizer)
    mcfg = source.model_config
    assert (mcfg.hidden_size, mcfg.video_layers, mcfg.max_frames) == (32, 1, 96)  # model.bert
    assert (mcfg.cls_token_id, mcfg.sep_token_id) == (
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    )


def test_source_from_a_run_or_one_of_its_steps(tiny_workdir):
    saved = run_lib.read_model_config(tiny_workdir)
    by_run = run_lib.source_from_run(tiny_workdir)
    by_step = run_lib.source_from_run(checkpoint=tiny_workdir / "checkpoints" / "2")
    assert by_run.model_config == by_step.model_config == saved
    assert (by_run.step_dir.name, by_step.step_dir.name) == ("4", "2")
    assert by_run.run_dir == by_step.run_dir == tiny_workdir
    assert by_run.run_config.to_dict() == run_lib.read_config(tiny_workdir).to_dict()
    saved_tokenizer = load_tokenizer(str(tiny_workdir / "tokenizer"))
    assert by_run.tokenizer.get_vocab() == saved_tokenizer.get_vocab()
    # Compute settings change; the architecture does not.
    fast = run_lib.source_from_run(
        tiny_workdir, dtype="bfloat16", remat=True, attention="auto", attention_dropout=0.0
    )
    c = fast.model_config
    assert (c.dtype, c.remat, c.attention) == ("bfloat16", True, "auto")
    assert c.bert.attention_probs_dropout_prob == 0.0
    back = c.with_compute(
        dtype=saved.dtype,
        remat=saved.remat,
        attention=saved.attention,
        attention_dropout=saved.bert.attention_probs_dropout_prob,
    )
    assert back == saved
    assert run_lib.resolve_run_dir(tiny_workdir)[1] == by_run.step_dir


def test_init_from_takes_the_runs_architecture_with_this_configs_compute(
    tiny_workdir, tmp_path, caplog
):
    config = tiny_config(tmp_path)
    config.init_from = str(tiny_workdir / "checkpoints" / "2")  # a step directory works too
    config.model.video_layers = 2  # not the source's 1: its architecture wins, with a warning
    config.model.text_model = "bert-base-cased"  # the tokenizer comes from the source run
    config.model.dtype = "bfloat16"
    config.model.hidden_dropout = 0.0
    with caplog.at_level(logging.WARNING, logger="signclip_jax.run"):
        source = run_lib.source_from_config(config)
    assert "using its architecture" in caplog.text
    saved = run_lib.read_model_config(tiny_workdir)
    assert source.model_config == saved.with_compute(dtype="bfloat16", hidden_dropout=0.0)
    assert source.run_dir == tiny_workdir and source.step_dir.name == "2"
    assert len(source.tokenizer) == len(load_tokenizer(str(tiny_workdir / "tokenizer")))
    config.data.max_frames = saved.max_frames + 1
    with pytest.raises(UserError, match=f"max_frames={saved.max_frames + 1} exceeds"):
        run_lib.source_from_config(config)


def test_init_params_from_restores_into_the_given_shardings(tiny_workdir, tmp_path, run):
    config = tiny_config(tmp_path)
    config.init_from = str(tiny_workdir)
    config.loss.name = "clip"  # the source trained with signclip: clip's scale starts fresh
    source = run_lib.source_from_config(config)
    mesh = sharding.make_mesh((-1, 1), ("data", "fsdp"))
    replicated = NamedSharding(mesh, P())
    fresh = signclip_model.SignCLIP(source.model_config, rngs=nnx.Rngs(7))
    params = jax.device_put(
        {
            "model": nnx.state(fresh, nnx.Param),
            "loss": losses.init_loss_params("clip", {"logit_scale_init": 1.5}),
        },
        replicated,
    )
    restored = run_lib.init_params_from(source, params, config, mesh)
    assert float(restored["loss"]["logit_scale"]) == 1.5  # kept: another loss than the source's
    nnx.update(fresh, restored["model"])
    want = signclip_model.to_state_dict(run.model)
    for key, value in signclip_model.to_state_dict(fresh).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    kernel = restored["model"]["video_encoder"]["videomlp"]["linear1"]["kernel"]
    assert kernel[...].sharding == replicated


def test_saved_model_files_rebuild_the_model_offline(tmp_path, run):
    run_lib.save_model_files(tmp_path, run.model_config, run.tokenizer)
    assert run_lib.read_model_config(tmp_path) == run.model_config
    bert = json.loads((tmp_path / run_lib.BERT_CONFIG_FILE).read_text())
    assert bert == run.model.bert_config_dict()
    config = run.config
    assert run_lib.read_tokenizer(tmp_path, config).get_vocab() == run.tokenizer.get_vocab()
    run_lib.save_config(tmp_path, config)
    assert run_lib.read_config(tmp_path).to_dict() == config.to_dict()
    spec = json.loads((tmp_path / run_lib.MODEL_CONFIG_FILE).read_text())
    (tmp_path / run_lib.MODEL_CONFIG_FILE).write_text(json.dumps({**spec, "layers": 3}))
    with pytest.raises(UserError, match=r"model_config\.json: .*unexpected keyword"):
        run_lib.read_model_config(tmp_path)
