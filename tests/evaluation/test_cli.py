"""The evaluate command (evaluation/cli.py): options, config overrides, flip, files, and end
to end on the tiny trained workdir, whose numbers equal training's own validation (one
evaluation path: the same evaluators)."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signclip_jax import run as run_lib
from signclip_jax.data import augment, pipeline, pose, sources
from signclip_jax.errors import UserError
from signclip_jax.evaluation import cli as ev
from signclip_jax.evaluation import metrics, report, retrieval
from signclip_jax.serving import embedder as embedder_lib

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Options.


def test_parse_args_collects_config_overrides_and_rejects_unknown_flags(capsys):
    opts = ev.parse_args(
        ["--workdir=w", "--config.data.source=manifest", "--config.data.manifest", "m.csv",
         "--flip", "--tasks=retrieval,probe", "--fewshot_shots=1,3"]
    )  # fmt: skip
    assert opts.overrides == ("data.source=manifest", "data.manifest=m.csv")
    assert opts.flip == "right"  # bare --flip: the original's flip_pose: 'right'
    assert opts.tasks == ("retrieval", "probe") and opts.fewshot_shots == (1, 3)
    assert ev.parse_args(["--workdir=w", "--flip=always"]).flip == "always"
    for argv in (["--workdir=w", "--bogus=1"], ["--split=val"]):
        with pytest.raises(SystemExit) as e:
            ev.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1
    with pytest.raises(UserError, match="unknown task"):
        ev._check_options(ev.Options(workdir="w", tasks=("retrieval", "nope")))
    both = ev.parse_args(["--workdir=w", "--checkpoint=w/checkpoints/2"])  # the contract
    assert (both.workdir, both.checkpoint) == ("w", "w/checkpoints/2")


# ---------------------------------------------------------------------------------------------
# End to end on the tiny trained workdir.


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return embedder_lib.Embedder(run_lib.load_run(tiny_workdir), batch_size=8)


@pytest.fixture(scope="module")
def evaluated(embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    opts = ev.Options(split="val", out=str(out), batch_size=8, fewshot_draws=2)
    return ev.run_evaluation(opts, embedder=embedder), out


def _last_val(workdir):
    lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("split") == "val"][-1]


def test_retrieval_equals_training_validation(evaluated, tiny_workdir):
    results, _ = evaluated
    val = _last_val(tiny_workdir)
    assert results["header"]["step"] == val["step"]
    r = results["retrieval"]
    keys = [k for k in val if k.startswith(("t2v/", "v2t/"))]
    assert len(keys) == 13
    for k in keys:
        assert r[k] == pytest.approx(val[k], abs=1e-6), k
    assert r["examples"] == val["examples"]
    assert r["loss"] == pytest.approx(val["loss"], rel=1e-5, abs=1e-5)


def test_outputs(evaluated, embedder):
    from PIL import Image

    results, out = evaluated
    name = "val_step4"
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["retrieval"].pop("notes", None) == results["retrieval"].get("notes")
    assert saved["retrieval"] == pytest.approx(
        {k: v for k, v in results["retrieval"].items() if k != "notes"}
    )
    assert set(saved) >= {"header", "retrieval", "zeroshot", "fewshot", "probe", "files"}
    csv_rows = (out / f"{name}.csv").read_text().splitlines()
    assert csv_rows[0] == "task,group,metric,value"
    assert any(r.startswith("retrieval,,v2t/R@1,") for r in csv_rows)
    assert any(r.startswith("fewshot,1-shot,top1,") for r in csv_rows)
    with Image.open(out / f"{name}.png") as im:
        im.verify()
    folder = out / name
    pose = np.load(folder / "pose_embeddings.npy")
    text = np.load(folder / "text_embeddings.npy")
    texts = (folder / "texts.txt").read_text().splitlines()
    ids = (folder / "ids.txt").read_text().splitlines()
    n = results["header"]["examples"]
    assert pose.shape == text.shape == (n, embedder.hidden_size) and len(texts) == len(ids) == n
    assert texts[0].startswith("<en> <ase> ")  # the training prompt
    # The saved embeddings reproduce the numbers with the dense reference metrics.
    dense = metrics.retrieval_metrics(pose, text, texts)
    assert {k: results["retrieval"][k] for k in dense} == pytest.approx(dense)
    rows = [json.loads(x) for x in (folder / "examples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == texts and not any(r["flipped"] for r in rows)
    assert np.load(folder / "train" / "pose_embeddings.npy").shape[0] > 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_recognition_tasks(evaluated):
    results, out = evaluated
    r, z = results["retrieval"], results["zeroshot"]
    for k in (1, 5, 10):  # one language, split vocabulary: zero-shot top-k is V2T R@k
        assert z[f"top{k}"] == pytest.approx(r[f"v2t/R@{k}"])
    fewshot = results["fewshot"]["shots"]
    assert set(fewshot) == {"1", "5", "10"}  # no class has > 10 training examples
    folder = out / "val_step4"
    train_texts = (folder / "train" / "texts.txt").read_text().splitlines()
    train_pose = np.load(folder / "train" / "pose_embeddings.npy")
    texts = (folder / "texts.txt").read_text().splitlines()
    pose = np.load(folder / "pose_embeddings.npy")
    again = metrics.few_shot_knn(train_pose, train_texts, pose, texts, shots=(1, 5, 10), draws=2)
    assert again == fewshot
    probe = metrics.linear_probe(train_pose, train_texts, pose, texts)
    assert probe == results["probe"]


def test_flip_always_mirrors_every_pose(embedder, tiny_workdir):
    run = embedder.run
    plain = ev.embed_run_split(run, embedder, "val", batch_size=8)
    flipped = ev.embed_run_split(run, embedder, "val", flip="always", batch_size=8)
    assert flipped.flipped.all() and flipped.prompts == plain.prompts
    source = sources.make_source(run.config.data, split="val", workdir=str(tiny_workdir))
    spec = run.settings.spec
    feats = [
        pose.to_features(augment.flip_horizontal(pipeline.record_pose_array(source[i], spec), spec),
                         spec)
        for i in flipped.source_index
    ]  # fmt: skip
    np.testing.assert_allclose(flipped.pose, embedder.embed_features(feats), atol=1e-5)
    assert np.abs(flipped.pose - plain.pose).max() > 1e-3
    right = ev.embed_run_split(run, embedder, "val", flip="right", batch_size=8)
    arrays = [pipeline.record_pose_array(source[i], spec) for i in right.source_index]
    assert list(right.flipped) == [retrieval.right_hand_missing(a, spec) for a in arrays]
    same = ~right.flipped
    np.testing.assert_allclose(right.pose[same], plain.pose[same], atol=1e-6)
    np.testing.assert_allclose(right.pose[~same], flipped.pose[~same], atol=1e-6)


def test_default_tasks_skip_fewshot_on_a_big_train_split(embedder, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "MAX_DEFAULT_TRAIN", 2)
    opts = ev.Options(split="val", out=str(tmp_path), plot=False, save_embeddings=False)
    results = ev.run_evaluation(opts, embedder=embedder)
    assert results["header"]["tasks"] == ["retrieval", "zeroshot"]
    assert "fewshot" not in results and "fewshot and probe skipped" in report.format_table(results)
    asked = ev.run_evaluation(
        dataclasses.replace(opts, tasks=("probe",), name="p"), embedder=embedder
    )
    assert "probe" in asked and "retrieval" not in asked


def test_a_missing_plot_extra_is_a_warning(embedder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    opts = ev.Options(
        split="val", tasks=("retrieval",), out=str(tmp_path), batch_size=8, save_embeddings=False
    )
    results = ev.run_evaluation(opts, embedder=embedder)
    assert "png" not in results["files"] and not list(tmp_path.glob("*.png"))
    assert (tmp_path / "val_step4.json").exists()


def test_config_override_points_at_a_manifest_with_two_sign_languages(
    embedder, tiny_workdir, tmp_path
):
    run = embedder.run
    train = sources.make_source(run.config.data, split="train", workdir=str(tiny_workdir))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pose", "text", "sign_language", "split"])
        for i in range(len(train)):
            rec = train[i]
            w.writerow([rec["pose_path"], rec["text"], "ase" if i % 2 else "bfi", "test"])
    overrides = ("data.source=manifest", f"data.manifest={tmp_path / 'm.csv'}")
    run_m = ev.load(ev.Options(workdir=str(tiny_workdir), overrides=overrides))
    assert run_m.config.data.source == "manifest" and run.config.data.source == "synthetic"
    opts = ev.Options(
        split="test", tasks=("retrieval", "zeroshot"), overrides=overrides, out=str(tmp_path),
        batch_size=8, plot=False, save_embeddings=False, name="m",
    )  # fmt: skip
    results = ev.run_evaluation(opts, embedder=embedder)
    assert results["header"]["examples"] == len(train)
    assert results["header"]["sign_languages"] == ["ase", "bfi"]
    r = results["retrieval"]
    assert r["lang/ase/examples"] + r["lang/bfi/examples"] == len(train)
    assert set(results["zeroshot"]["by_language"]) == {"en/ase", "en/bfi"}
    table = report.format_table(results)
    assert "retrieval by sign language" in table and "en/bfi" in table
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["retrieval"]["lang/bfi/examples"] == r["lang/bfi/examples"]
    with pytest.raises(UserError, match="change the model inputs"):
        ev.run_evaluation(
            ev.Options(split="val", overrides=("data.max_frames=48",), out=str(tmp_path)),
            embedder=embedder,
        )


def test_decoded_grouping_limit_and_wider_zero_shot_vocabulary(embedder, tmp_path):
    run = embedder.run
    key_fn = retrieval.class_key_fn(run.tokenizer, run.settings, "decoded")
    keys = key_fn(["<en> <ase> House", "<en> <ase> house"])
    assert keys[0] == keys[1] == "< en > < ase > house"  # the uncased tokenizer merges them
    assert retrieval.class_key_fn(run.tokenizer, run.settings)(["a", "A"]) == ["a", "A"]
    with pytest.raises(UserError, match="group_by must be one of"):
        retrieval.class_key_fn(run.tokenizer, run.settings, "nope")
    assert len(ev.embed_run_split(run, embedder, "train", batch_size=8, limit=3)) == 3
    opts = ev.Options(
        split="val", tasks=("zeroshot",), zeroshot_vocab="all", out=str(tmp_path), batch_size=8,
        plot=False, save_embeddings=False, group_by="decoded",
    )  # fmt: skip
    results = ev.run_evaluation(opts, embedder=embedder)
    assert results["zeroshot"]["classes"] == 4  # every sign of train + val
    assert results["header"]["group_by"] == "decoded"
    assert (tmp_path / "val_step4_decoded.json").exists()


# ---------------------------------------------------------------------------------------------
# Command line.


def _cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.evaluate", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def test_cli_help_and_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # in process: the parser's own help
        ev.main(["--help"])
    assert e.value.code == 0 and "--config.KEY=VALUE" in capsys.readouterr().out
    # The entry module as a user runs it: exit 2, one line, no traceback.
    res = _cli(f"--workdir={tmp_path}")
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1, res.stderr
    assert "no checkpoints" in res.stderr and "Traceback" not in res.stderr


def test_cli_runs_end_to_end(tiny_workdir, tmp_path, evaluated, capsys):
    """The command's main(argv) in process (no second JAX start-up); the entry module's
    exit codes are test_cli_help_and_user_errors'."""
    code = ev.main(
        [f"--workdir={tiny_workdir}", "--split=val", "--tasks=retrieval,zeroshot",
         f"--out={tmp_path}", "--batch_size=8", "--no_plot", "--name=cli"]
    )  # fmt: skip
    assert code == 0
    assert "retrieval (original definitions" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cli.json").read_text())
    want = evaluated[0]["retrieval"]
    for k in ("t2v/R@1", "t2v/P@1", "v2t/R@1", "v2t/MedianR", "std/v2t/R@1"):
        assert saved["retrieval"][k] == pytest.approx(want[k], abs=1e-6)
    assert "fewshot" not in saved and (tmp_path / "cli" / "pose_embeddings.npy").exists()
