"""evaluation/evaluators.py: evaluators chosen by config (as big_vision's), and `Embeddings`,
which embeds each split and each prompt once whichever evaluators ask."""

import ml_collections
import numpy as np
import pytest

from signclip_jax.config import base_config
from signclip_jax.data import text as text_lib
from signclip_jax.errors import UserError
from signclip_jax.evaluation import evaluators, metrics
from signclip_jax.evaluation.retrieval import SplitEmbeddings


@pytest.fixture(scope="module")
def tokenizer():
    return text_lib.load_tokenizer(text_lib.resolve_text_model("minilm"))


def test_default_config_is_the_validation_of_old(tokenizer):
    config = base_config()
    config.batch_size = 16
    config.loss.name = "clip"
    evals = evaluators.from_config(config, tokenizer=tokenizer)
    assert [(e.name, e.every_steps) for e in evals] == [("val", config.eval_every_steps)]
    val = evals[0].evaluator
    assert isinstance(val, evaluators.Retrieval)
    assert (val.split, val.loss_name, val.loss_batch_size) == ("val", "clip", 16)
    assert not val.standard and not val.by_language and val.key_fn is list
    assert evals[0].due(config.eval_every_steps, 10**9) and evals[0].due(7, 7)
    assert not evals[0].due(7, 8)


def test_opt_in_zero_shot_and_bad_entries(tokenizer):
    config = base_config()
    config.evals.zeroshot.every_steps = 0
    config.evals.probe = ml_collections.ConfigDict({"type": "probe", "every_steps": 7})
    config.evals.fs = ml_collections.ConfigDict({"type": "fewshot", "shots": (1, 2)})
    evals = {e.name: e for e in evaluators.from_config(config, tokenizer=tokenizer)}
    assert set(evals) == {"val", "zeroshot", "probe", "fs"}
    assert isinstance(evals["zeroshot"].evaluator, evaluators.ZeroShot)
    assert evals["zeroshot"].every_steps == config.eval_every_steps
    assert evals["probe"].every_steps == 7 and evals["fs"].evaluator.shots == (1, 2)
    render = evals["zeroshot"].evaluator.render
    assert render("house", "en", "ase") == "<en> <ase> house"

    config.evals.bad = ml_collections.ConfigDict({"type": "nope"})
    with pytest.raises(UserError, match=r"config.evals.bad.type='nope': one of retrieval"):
        evaluators.from_config(config, tokenizer=tokenizer)
    config.evals.bad = ml_collections.ConfigDict({"type": "retrieval", "colour": "red"})
    with pytest.raises(UserError, match=r"config.evals.bad: .*colour"):
        evaluators.from_config(config, tokenizer=tokenizer)


def _split(name, pose, prompts, text=None):
    n = len(prompts)
    records = [{"id": str(i), "text": p.split()[-1]} for i, p in enumerate(prompts)]
    settings = type("S", (), {"sign_language": "ase", "spoken_language": "en"})()
    return SplitEmbeddings(
        split=name, pose=pose, prompts=list(prompts), source_index=np.arange(n),
        flipped=np.zeros(n, bool), records=records, settings=settings, text=text,
    )  # fmt: skip


def test_embeddings_embed_each_split_and_prompt_once_and_evaluators_agree():
    rng = np.random.default_rng(0)
    prompts = [f"<en> <ase> w{i % 4}" for i in range(10)]
    table = {p: rng.normal(size=6).astype(np.float32) for p in set(prompts)}
    pose = rng.normal(size=(10, 6)).astype(np.float32)
    split_calls, text_calls = [], []

    def embed_split(name):
        split_calls.append(name)
        return _split(name, pose, prompts)

    def embed_texts(ps):
        text_calls.append(list(ps))
        return np.stack([table[p] for p in ps])

    emb = evaluators.Embeddings(embed_split, embed_texts, loss_params={})
    r = evaluators.Retrieval("val", loss_name="signclip", loss_batch_size=4).run(emb)

    def render(t, spoken, signed):
        return f"<{spoken}> <{signed}> {t}"

    z = evaluators.ZeroShot("val", render=render).run(emb)
    assert split_calls == ["val"]
    assert text_calls == [list(dict.fromkeys(prompts))]  # zero-shot found every class cached
    text = np.stack([table[p] for p in prompts])
    dense = metrics.retrieval_metrics(pose, text, prompts)
    assert {k: r[k] for k in dense} == pytest.approx(dense)
    assert next(iter(r)) == "loss" and "std/v2t/R@1" not in r
    for k in (1, 5, 10):  # one language, the split's own classes: zero-shot top-k is V2T R@k
        assert z[f"top{k}"] == pytest.approx(r[f"v2t/R@{k}"])
    assert z["vocabulary"] == "split" and z["classes"] == 4

    # A split embedded with its text (training's forward) keeps that text.
    given = rng.normal(size=(10, 6)).astype(np.float32)
    emb2 = evaluators.Embeddings(lambda n: _split(n, pose, prompts, given), embed_texts)
    assert emb2.prompt_text(emb2.split("val")) is given
    assert evaluators.Retrieval("val").run(evaluators.Embeddings(
        lambda n: _split(n, pose[:0], []), embed_texts)) == {}  # fmt: skip
    with pytest.raises(UserError, match="captions of the train split"):
        emb2.captions("train")
