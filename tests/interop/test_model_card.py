"""interop/model_card.py: the README.md of a release folder, generated from its run (front
matter Hugging Face parses, prompt format, pose features, training, the run's own numbers)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
from huggingface_hub.repocard import metadata_load

from signclip_jax import config as config_lib
from signclip_jax import run as run_lib
from signclip_jax.errors import UserError
from signclip_jax.interop import convert, model_card
from tests.interop.fast_run import log_validation, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_lib.load_run(make_run(tmp_path_factory.mktemp("card") / "run"))


def _front(card: str, tmp_path) -> dict:
    path = tmp_path / "README.md"
    path.write_text(card)
    return metadata_load(path)


def test_card_of_an_unevaluated_run(run, tmp_path):
    card = model_card.render(run)
    meta = _front(card, tmp_path)
    assert meta["library_name"] == "signclip-jax" and meta["license"] == "other"
    assert {"sign-language", "pose", "contrastive", "clip"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "feature-extraction"
    assert "base_model" not in meta  # the bundled MiniLM alias is no Hub id
    assert "Not evaluated: the run directory holds no validation or `evaluate` results for " \
           "step 0" in card  # fmt: skip
    assert "`<{spoken}> <{signed}> {text}` (template `spreadthesign`), e.g. `<en> <ase> house`" \
           in card  # fmt: skip
    assert "609 features: the `reduced_face` points (203 points x 3 coordinates" in card
    assert "At most 96 frames are read" in card
    assert 'signclip_jax.load("hf-hub:ORG/NAME")' in card
    assert "| loss | `signclip` |" in card and "| batch size (global) | 8 |" in card


def test_card_reads_the_numbers_of_the_exported_step(run, tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    run = dataclasses.replace(run, workdir=workdir)
    with open(workdir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "split": "train", "loss": 9.0}) + "\n")
        f.write("{not json\n")
    log_validation(workdir, 0, **{"t2v/R@1": 0.123456, "examples": 34.0})
    log_validation(workdir, 5, **{"t2v/R@1": 0.987654})  # another checkpoint's
    (workdir / "eval").mkdir()
    result = {
        "header": {"step": 0, "split": "test", "notes": ["a header note"]},
        "retrieval": {"v2t/R@1": 0.5, "by_language": {"ase": {"v2t/R@1": 0.5}}, "notes": ["n1"]},
        "zeroshot": {"top1": 0.25, "classes": 12},
        "files": {"json": "x"},
    }
    (workdir / "eval" / "test_step0.json").write_text(json.dumps(result))
    other = {**result, "header": {"step": 5, "split": "test"}, "zeroshot": {"top1": 0.75}}
    (workdir / "eval" / "test_step5.json").write_text(json.dumps(other))
    (workdir / "eval" / "broken.json").write_text("[]")
    with caplog.at_level(logging.WARNING):
        card = model_card.render(run)
    assert "Not evaluated" not in card
    assert "training's validation (metrics.jsonl), split `val`, step 0:" in card
    assert "| `t2v/R@1` | 0.1235 |" in card and "| `examples` | 34 |" in card
    assert "0.9877" not in card and "0.7500" not in card and "9.0000" not in card
    assert "`evaluate` (eval/test_step0.json), split `test`, step 0:" in card
    assert "| `retrieval/v2t/R@1` | 0.5000 |" in card and "| `zeroshot/top1` | 0.2500 |" in card
    assert "| `zeroshot/classes` | 12 |" in card and "by_language" not in card
    assert "- a header note" in card and "- retrieval: n1" in card
    assert "metrics.jsonl line 2: not JSON" in caplog.text
    assert "broken.json: not an evaluate result" in caplog.text


def test_card_follows_the_config(run, tmp_path):
    config = config_lib.apply_overrides(run.config, [
        "data.prompt_template=isolated", "data.pose_components=hands", "data.include_z=False",
        "data.max_frames=64", "data.sign_language=gsg", "model.text_model=bert-base-cased",
        "license=cc-by-nc-4.0",
    ])  # fmt: skip
    card = model_card.render(dataclasses.replace(run, config=config), repo_id="org/my-model")
    meta = _front(card, tmp_path)
    assert meta["license"] == "cc-by-nc-4.0" and meta["base_model"] == "bert-base-cased"
    assert "# my-model" in card and 'signclip_jax.load("hf-hub:org/my-model")' in card
    assert "`<en> <{signed}> {text}` (template `isolated`), e.g. `<en> <gsg> house`" in card
    assert "84 features: the `hands` points (42 points x 2 coordinates, x, y)" in card
    assert "At most 64 frames are read" in card
    explicit = model_card.render(run, license="mit")
    assert _front(explicit, tmp_path)["license"] == "mit"


def test_export_writes_the_card(run, tmp_path):
    out = convert.export_hf(run, tmp_path / "release", repo_id="org/name", license="mit")
    card = (out / "README.md").read_text()
    assert card == model_card.render(run, repo_id="org/name", license="mit")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # an ordinary file, not safetensors' private 0600
    with pytest.raises(UserError, match="--repo_id and --license go into the model card"):
        convert.to_pytorch(workdir=str(run.workdir), format="mmpt", out=tmp_path / "x.pt",
                           license="mit")  # fmt: skip
