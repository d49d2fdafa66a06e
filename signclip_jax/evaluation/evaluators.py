"""Evaluators: small classes chosen by config, as big_vision chooses its evaluators
(big_vision/evaluators/common.py). Training runs those of `config.evals` every few steps
(train/loop.py); the evaluate command builds the same classes from its flags
(evaluation/cli.py). So the validation of a training run and `python -m signclip_jax.evaluate`
run one code path and give the same numbers.

An evaluator never holds a model. `run(embeddings)` asks an `Embeddings` for what it needs (a
split embedded, prompts embedded, the loss scalars), and each caller builds that object from
its own embedding functions:

  training      the sharded jitted forward over the mesh, on every process (train/loop.py);
  the command   serving's Embedder, each pose on its own mask (evaluation/cli.py).

config.evals maps a name to one evaluator:

  c.evals.val = dict(type="retrieval", split="val")        # the default: validation
  c.evals.zeroshot = dict(type="zeroshot", split="val", every_steps=0)

`type`: retrieval | zeroshot | fewshot | probe (default: the name); `every_steps`: 0 =
config.eval_every_steps, < 0 = off (every evaluator also runs at the last step); `group_by`:
prompt | decoded (class identity); the rest goes to the class (its keyword arguments below).
A training run logs an evaluator's numbers under its name: metrics.jsonl rows with
"split": NAME, checkpoint metrics "NAME/KEY" (e.g. "val/loss", the best-checkpoint metric).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from signclip_jax.data import pipeline
from signclip_jax.errors import UserError
from signclip_jax.evaluation import recognition, retrieval
from signclip_jax.evaluation.retrieval import SplitEmbeddings

KeyFn = Callable[[Sequence[str]], list[str]]


class Embeddings:
    """A model's embeddings at one set of weights, as evaluators ask for them; each split and
    each distinct prompt is embedded once.

    embed_split(name) -> SplitEmbeddings (retrieval.embed_split with the caller's embedding
    function); embed_texts(prompts) -> [T, H]; captions(name) -> the raw captions of a split
    without embedding it; loss_params: the loss's learnable scalars (the validation loss).
    """

    def __init__(
        self,
        embed_split: Callable[[str], SplitEmbeddings],
        embed_texts: Callable[[list[str]], np.ndarray],
        *,
        loss_params: Any = None,
        captions: Callable[[str], list[str]] | None = None,
    ):
        self._embed_split = embed_split
        self._embed_texts = embed_texts
        self._captions = captions
        self.loss_params = loss_params
        self._splits: dict[str, SplitEmbeddings] = {}
        self._text: dict[str, np.ndarray] = {}

    def split(self, name: str) -> SplitEmbeddings:
        if name not in self._splits:
            self._splits[name] = self._embed_split(name)
        return self._splits[name]

    def texts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{prompt: [H]}; identical prompts get identical embeddings."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if todo:
            for p, e in zip(todo, self._embed_texts(todo)):
                self._text[p] = e
        return {p: self._text[p] for p in prompts}

    def prompt_text(self, data: SplitEmbeddings) -> np.ndarray:
        """[N, H]: each row's prompt embedded, as the embedding function gave it with the pose,
        else from the text tower on each distinct prompt (then kept in `data.text`)."""
        if data.text is None:
            by_prompt = self.texts(data.prompts)
            data.text = np.stack([by_prompt[p] for p in data.prompts]).astype(np.float32)
        return data.text

    def captions(self, name: str) -> list[str]:
        """The raw captions of split `name`: of its usable examples when it is embedded
        already, else of all its records (read, not embedded)."""
        if name in self._splits:
            return self._splits[name].texts
        if self._captions is None:
            raise UserError(f"the captions of the {name} split are not available here")
        return self._captions(name)


# ---------------------------------------------------------------------------------------------
# The evaluators.


class Retrieval:
    """Text <-> pose retrieval on one split with the original definitions (metrics.py) and,
    with `loss_batch_size` > 0, the validation loss (retrieval.validation_loss).

    standard: also the per-example ("std/...") ranks; by_language: also per sign language
    (when the split has several). Returns {} for a split without usable examples.
    """

    def __init__(
        self,
        split: str = "val",
        *,
        key_fn: KeyFn = list,
        loss_name: str = "signclip",
        loss_batch_size: int = 0,
        standard: bool = False,
        by_language: bool = False,
        block_elems: int | None = None,
    ):
        self.split, self.key_fn = split, key_fn
        self.loss_name, self.loss_batch_size = loss_name, loss_batch_size
        self.standard, self.by_language, self.block_elems = standard, by_language, block_elems

    def run(self, emb: Embeddings) -> dict[str, float]:
        data = emb.split(self.split)
        if not len(data):
            return {}
        text = emb.prompt_text(data)
        out = {}
        if self.loss_batch_size:
            out["loss"] = retrieval.validation_loss(
                data.pose, text, self.loss_name, emb.loss_params, self.loss_batch_size
            )
        out.update(
            retrieval.evaluate_retrieval(
                data.pose,
                text,
                self.key_fn(data.prompts),
                languages=data.sign_languages if self.by_language else None,
                block_elems=self.block_elems,
                standard=self.standard,
            )
        )
        return out


class ZeroShot:
    """Zero-shot recognition on one split (recognition.zero_shot): every pose against every
    class name rendered into a prompt; vocab "split": the split's own captions, "all": the
    train split's too."""

    def __init__(
        self,
        split: str = "val",
        *,
        render: Callable[[str, str, str], str],
        key_fn: KeyFn = list,
        vocab: str = "split",
        block_elems: int | None = None,
    ):
        if vocab not in ("split", "all"):
            raise UserError(f"zero-shot vocab must be split or all, got {vocab!r}")
        self.split, self.render, self.key_fn = split, render, key_fn
        self.vocab, self.block_elems = vocab, block_elems

    def run(self, emb: Embeddings) -> dict[str, Any]:
        data = emb.split(self.split)
        if not len(data):
            return {}
        classes = list(dict.fromkeys(data.texts))
        if self.vocab == "all":
            classes = list(dict.fromkeys(classes + emb.captions("train")))
        out = recognition.zero_shot(
            data.pose,
            self.key_fn(data.prompts),
            list(zip(data.spoken_languages, data.sign_languages)),
            classes,
            self.render,
            emb.texts,
            self.key_fn,
            block_elems=self.block_elems,
        )
        out["vocabulary"] = self.vocab
        return out


class FewShot:
    """Few-shot k-NN (reference 7.4): support drawn from the `support` split's poses."""

    def __init__(
        self,
        split: str = "val",
        *,
        key_fn: KeyFn = list,
        support: str = "train",
        shots: Sequence[int] | None = None,
        draws: int = 5,
        neighbors: str | int = "sqrt",
        seed: int = 42,
    ):
        self.split, self.key_fn, self.support = split, key_fn, support
        self.shots = tuple(shots) if shots else None
        self.draws, self.neighbors, self.seed = draws, neighbors, seed

    def run(self, emb: Embeddings) -> dict[str, Any]:
        data, train = emb.split(self.split), emb.split(self.support)
        return recognition.few_shot(
            train.pose,
            self.key_fn(train.prompts),
            data.pose,
            self.key_fn(data.prompts),
            shots=self.shots,
            draws=self.draws,
            neighbors=self.neighbors,
            seed=self.seed,
        )


class Probe:
    """Logistic-regression probe (reference 7.5): fit on the `support` split, score `split`."""

    def __init__(
        self,
        split: str = "val",
        *,
        key_fn: KeyFn = list,
        support: str = "train",
        max_iter: int = 100,
        filter_train: bool = False,
        seed: int = 42,
    ):
        self.split, self.key_fn, self.support = split, key_fn, support
        self.max_iter, self.filter_train, self.seed = max_iter, filter_train, seed

    def run(self, emb: Embeddings) -> dict[str, Any]:
        data, train = emb.split(self.split), emb.split(self.support)
        return recognition.probe(
            train.pose,
            self.key_fn(train.prompts),
            data.pose,
            self.key_fn(data.prompts),
            max_iter=self.max_iter,
            filter_train=self.filter_train,
            seed=self.seed,
        )


EVALUATORS = {"retrieval": Retrieval, "zeroshot": ZeroShot, "fewshot": FewShot, "probe": Probe}
TASKS = tuple(EVALUATORS)


# ---------------------------------------------------------------------------------------------
# From a training config.


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """One evaluator of config.evals: its name (the metrics prefix) and cadence."""

    name: str
    evaluator: Any
    every_steps: int

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps


def from_config(config, *, tokenizer) -> list[Scheduled]:
    """The evaluators of `config.evals` (see the module docstring), in config order.

    config: the whole training config (loss.name and batch_size give the validation loss,
    data.* the prompts); tokenizer: the run's (for group_by "decoded").
    """
    settings = pipeline.settings_from_config(config)
    out = []
    for name, entry in (config.get("evals") or {}).items():
        kw = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        kind = kw.pop("type", name)
        every = int(kw.pop("every_steps", 0))
        if every < 0:
            continue
        if kind not in EVALUATORS:
            raise UserError(f"config.evals.{name}.type={kind!r}: one of {', '.join(TASKS)}")
        key_fn = retrieval.class_key_fn(tokenizer, settings, kw.pop("group_by", "prompt"))
        context = {
            "retrieval": {"loss_name": config.loss.name, "loss_batch_size": config.batch_size},
            "zeroshot": {"render": recognition.prompt_renderer(settings)},
        }.get(kind, {})
        try:
            evaluator = EVALUATORS[kind](key_fn=key_fn, **context, **kw)
        except TypeError as e:
            raise UserError(f"config.evals.{name}: {e}") from None
        out.append(Scheduled(name, evaluator, every or int(config.eval_every_steps)))
    return out


__all__ = [
    "EVALUATORS",
    "TASKS",
    "Embeddings",
    "FewShot",
    "Probe",
    "Retrieval",
    "Scheduled",
    "ZeroShot",
    "from_config",
]
