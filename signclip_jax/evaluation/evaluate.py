r"""Evaluates a trained model: `python -m signclip_jax.evaluate --workdir=DIR [--split=test]`.

Tasks (`--tasks`, all by default):
  retrieval  text <-> pose retrieval on the split with the original metric definitions
             (metrics.py: T2V P@k/R@k over unique texts, V2T R@k over unique texts, median and
             mean rank), the per-example ("standard") metrics, and a breakdown per sign language
             when the split has several;
  zeroshot   isolated-sign recognition: each pose against every class name of the split
             rendered with the data's prompt template (in the pose's own languages): top-k
             accuracy and ranks;
  fewshot    k-NN on pose embeddings, the original protocol (reference 7.4): support = the
             train split, seed 42, several draws (mean, std, and draw 0 = the original's run);
  probe      logistic-regression probe (reference 7.5): train split -> eval split.

Read top to bottom: options -> load the run (config.json + overrides) -> embed the split (the
training input pipeline, so prompts, features and bad-example handling equal training's
validation) -> metrics -> files. Scores are never held as an [N, N] matrix: ranks come from
blocks of rows (metrics.scan_pairs), so 100k x 100k evaluations fit in memory.

Outputs in OUT (default DIR/eval): NAME.json (everything), NAME.csv (task, group, metric,
value), NAME.png (2-D PCA map of pose and text embeddings), NAME/ (pose_embeddings.npy,
text_embeddings.npy, ids.txt, texts.txt, examples.jsonl, and train/ with the train split's).
Every file is written to a temporary name and renamed.

Test-time flip (`--flip`, reference 7.6): `right` mirrors a pose when its right hand is never
seen (zero variance of the right-hand coordinates over the whole clip, missing points counted
as 0), i.e. the signer is taken to be left-handed: the original's `flip_pose: 'right'`, whose
own mirror function does not exist as shipped; ours is data/augment.py's flip_horizontal.
`always` mirrors every pose. The same mode applies to the train split used by fewshot/probe,
as the original's `eval_flip_full` embeddings.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from signclip_jax import cli, files
from signclip_jax import config as config_lib
from signclip_jax.errors import UserError

log = logging.getLogger("signclip_jax.evaluate")

TASKS = ("retrieval", "zeroshot", "fewshot", "probe")
FLIP_MODES = ("none", "right", "always")
GROUP_BY = ("prompt", "decoded")
KS = (1, 5, 10)
DEFAULT_SHOTS = (1, 5, 10, 100)
MAX_DEFAULT_TRAIN = 50_000  # fewshot / probe by default only below this many train examples


# ---------------------------------------------------------------------------------------------
# Test-time flip.


def right_hand_missing(arr, spec) -> bool:
    """True when the right-hand coordinates never vary over the clip (never detected).

    `arr` a pose.PoseArray (missing points are 0). False for sets without a right hand.
    """
    from signclip_jax.data.pose import RIGHT_HAND, layout

    slots = [i for i, (c, _) in enumerate(layout(spec.components).points) if c == RIGHT_HAND]
    if not slots:
        return False
    hand = np.nan_to_num(arr.points[:, slots].astype(np.float64))
    return float(hand.var(axis=0).sum()) == 0.0


_POSE_KEYS = ("pose_path", "pose_bytes", "pose", "points", "observed", "fps", "features")


class MirroredSource:
    """A data source whose records carry the (possibly mirrored) normalised pose as "points".

    mode "right": mirror when `right_hand_missing`; "always": mirror every pose. Indices of
    mirrored records are collected in `self.flipped` (in this process: the evaluation reads
    with threads only). Unreadable records become {"error": ...} records, which the input
    pipeline counts as skipped, as it does for the plain source.
    """

    def __init__(self, source, spec, mode: str):
        if mode not in ("right", "always"):
            raise UserError(f"flip mode must be one of {FLIP_MODES[1:]}, got {mode!r}")
        self.source, self.spec, self.mode = source, spec, mode
        self.flipped: set[int] = set()
        self.skipped = getattr(source, "skipped", [])

    @property
    def components(self):
        return getattr(self.source, "components", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from signclip_jax.data import augment, pipeline
        from signclip_jax.errors import DataError

        record = self.source[index]
        meta = {k: v for k, v in record.items() if k not in _POSE_KEYS}
        if "error" in record:
            return meta
        if "features" in record and not any(k in record for k in _POSE_KEYS[:4]):
            name = pipeline.record_name(record)
            return {**meta, "error": f"{name}: stored features cannot be mirrored (--flip)"}
        try:
            arr = pipeline.record_pose_array(record, self.spec)
        except DataError as e:
            return {**meta, "error": str(e)}
        if self.mode == "always" or right_hand_missing(arr, self.spec):
            arr = augment.flip_horizontal(arr, self.spec)
            self.flipped.add(int(index))
        return {**meta, "points": arr.points, "observed": arr.observed, "fps": arr.fps}


# ---------------------------------------------------------------------------------------------
# Embedding one split.


@dataclasses.dataclass
class SplitEmbeddings:
    """One split, embedded. Rows are the usable examples in source order.

    pose: [N, H] float32; prompts, ids, texts (raw captions), sign_languages,
    spoken_languages: [N] str; labels [N] int (record label, -1 if none); source_index [N];
    flipped [N] bool; examined / skipped: examples read / unusable (skipped_examples: a few
    "name: reason" lines).
    """

    split: str
    pose: np.ndarray
    prompts: list[str]
    ids: list[str]
    texts: list[str]
    sign_languages: list[str]
    spoken_languages: list[str]
    labels: np.ndarray
    source_index: np.ndarray
    flipped: np.ndarray
    examined: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def embed_split(
    run,
    embedder,
    split: str,
    *,
    flip: str = "none",
    batch_size: int = 64,
    limit: int | None = None,
) -> SplitEmbeddings:
    """Embeds the poses of `split` of `run.config.data` with the evaluation input pipeline.

    Features, prompts and the handling of unusable examples are those of training's
    validation (pipeline.make_eval_batches); each pose is then embedded on its own mask
    (embedder_lib.Embedder), so the result does not depend on the batch.
    """
    from signclip_jax.data import pipeline, sources

    config = run.config
    settings = run.settings
    source = sources.make_source(config.data, split=split, workdir=str(run.workdir))
    if limit:
        source = files.FirstN(source, limit)
    mirrored = None
    data_cfg = config.data
    if flip != "none":
        source = mirrored = MirroredSource(source, settings.spec, flip)
        # Worker processes would hide which poses were mirrored; threads still read in parallel.
        data_cfg = _with(config.data, workers=0)
    parts, indices, prompts = [], [], []
    iterator = pipeline.make_eval_batches(
        source, data_cfg, tokenizer=run.tokenizer, batch_size=batch_size
    )
    for batch in iterator:
        rows = np.nonzero(np.asarray(batch["valid"]))[0]
        if not len(rows):
            continue
        lengths = np.asarray(batch["pose_mask"])[rows].sum(axis=1)
        feats = [np.asarray(batch["pose"][r, :t]) for r, t in zip(rows, lengths)]
        parts.append(embedder.embed_features(feats))
        indices.extend(int(i) for i in np.asarray(batch["index"])[rows])
        prompts.extend(str(p) for p in np.asarray(batch["prompt"])[rows])
    stats = iterator.stats()
    hidden = embedder.hidden_size
    pose = np.concatenate(parts) if parts else np.zeros((0, hidden), np.float32)
    inner = source.source if mirrored is not None else source
    meta = [_record_meta(inner[i], settings) for i in indices]
    flipped = np.array([mirrored is not None and i in mirrored.flipped for i in indices], bool)
    return SplitEmbeddings(
        split=split,
        pose=pose,
        prompts=prompts,
        ids=[m["id"] for m in meta],
        texts=[m["text"] for m in meta],
        sign_languages=[m["sign_language"] for m in meta],
        spoken_languages=[m["spoken_language"] for m in meta],
        labels=np.array([m["label"] for m in meta], np.int64),
        source_index=np.array(indices, np.int64),
        flipped=flipped,
        examined=stats.examined,
        skipped=stats.skipped,
        skipped_examples=list(stats.examples),
    )


def _with(data_cfg, **changes):
    import ml_collections

    out = ml_collections.ConfigDict(
        data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg
    )
    for k, v in changes.items():
        out[k] = v
    return out


def _record_meta(record: dict[str, Any], settings) -> dict[str, Any]:
    text = record.get("text", "")
    return {
        "id": str(record.get("id", "")),
        "text": "nan" if text is None else str(text),
        "sign_language": str(record.get("sign_language") or settings.sign_language),
        "spoken_language": str(record.get("spoken_language") or settings.spoken_language),
        "label": int(record.get("label", -1) if record.get("label") is not None else -1),
    }


def prompt_renderer(run) -> Callable[[str, str, str], str]:
    """f(text, spoken, signed) -> the prompt the input pipeline builds for such a record."""
    from signclip_jax.data import pipeline

    # The pipeline's own per-record prompt (template, gloss clean-up, language names), so a
    # class prompt equals the prompt of a training/validation example with that caption.
    prepare = pipeline._Prepare([], run.settings, None, seed=0, train=False)

    def render(text: str, spoken: str, signed: str) -> str:
        return prepare.prompt({"text": text, "spoken_language": spoken, "sign_language": signed})

    return render


def class_key_fn(run, group_by: str) -> Callable[[Sequence[str]], list[str]]:
    """Prompt strings -> class keys: the prompts themselves (as training's validation), or
    the decoded token ids (the original's class identity, reference 2.1 and 11.3 item 13)."""
    if group_by == "prompt":
        return list
    if group_by != "decoded":
        raise UserError(f"--group_by must be one of {GROUP_BY}, got {group_by!r}")
    from signclip_jax.data import text as text_lib

    max_len = run.settings.text_max_len

    def keys(prompts: Sequence[str]) -> list[str]:
        cache: dict[str, str] = {}
        out = []
        for p in prompts:
            if p not in cache:
                ids, mask = text_lib.encode_text(run.tokenizer, p, max_len=max_len)
                cache[p] = run.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            out.append(cache[p])
        return out

    return keys


# ---------------------------------------------------------------------------------------------
# Metrics on embeddings (usable from training: numpy in, dict of floats out).


def evaluate_retrieval(
    pose_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: Sequence[str],
    *,
    languages: Sequence[str] | None = None,
    ks: Sequence[int] = KS,
    block_elems: int | None = None,
    standard: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of one split, block-wise (no [N, N] matrix).

    pose_emb, text_emb [N, H] (row i = example i), texts [N] class strings (prompts; equal
    strings are one class). Keys: t2v/* and v2t/* (the original definitions, identical to
    metrics.retrieval_metrics), std/t2v/* and std/v2t/* (per-example ranks) with `standard`,
    "examples"; with `languages` [N] naming more than one language, lang/<code>/<key> for
    retrieval restricted to that language's examples.
    """
    from signclip_jax.evaluation import metrics

    block = block_elems or metrics.DEFAULT_BLOCK_ELEMS
    texts = [str(t) for t in texts]
    out = metrics.retrieval_metrics_blocked(
        pose_emb, text_emb, texts, ks, block_elems=block, standard=standard
    )
    out["examples"] = float(len(texts))
    if languages is not None and len(set(languages)) > 1:
        languages = list(languages)
        for lang in sorted(set(languages)):
            rows = np.array([i for i, x in enumerate(languages) if x == lang])
            sub = metrics.retrieval_metrics_blocked(
                np.asarray(pose_emb)[rows],
                np.asarray(text_emb)[rows],
                [texts[i] for i in rows],
                ks,
                block_elems=block,
                standard=standard,
            )
            out.update({f"lang/{lang}/{k}": v for k, v in sub.items()})
            out[f"lang/{lang}/examples"] = float(len(rows))
    return out


def validation_loss(pose_emb, text_emb, loss_name: str, loss_params, batch_size: int) -> float:
    """Training's validation loss: the mean over consecutive chunks of `batch_size` rows."""
    from signclip_jax.train import losses

    values = []
    for start in range(0, len(pose_emb), batch_size):
        pe, te = pose_emb[start : start + batch_size], text_emb[start : start + batch_size]
        if len(pe) > 1:
            values.append(float(losses.reference_loss(loss_name, pe, te, loss_params)))
    return float(np.mean(values)) if values else float("nan")


def zero_shot(
    pose_emb: np.ndarray,
    gold_keys: Sequence[str],
    groups: Sequence[tuple[str, str]],
    vocab: Sequence[str],
    render: Callable[[str, str, str], str],
    embed_prompts: Callable[[list[str]], dict[str, np.ndarray]],
    key_fn: Callable[[Sequence[str]], list[str]] = list,
    *,
    ks: Sequence[int] = KS,
    block_elems: int | None = None,
) -> dict[str, Any]:
    """Zero-shot recognition: each pose against every class in `vocab` (raw class names).

    For the poses of one (spoken, signed) language pair, the candidates are the class names
    rendered into prompts for that pair, merged by class key (first occurrence kept); a pose's
    gold is its own class key. Ties rank the earlier class first (as V2T). Returns top-k
    accuracy, median/mean rank (1-based), classes, examples; per language pair too when there
    are several. `embed_prompts(list of prompts) -> {prompt: [H] embedding}`.
    """
    from signclip_jax.evaluation import metrics

    block = block_elems or metrics.DEFAULT_BLOCK_ELEMS
    pose = np.asarray(pose_emb, np.float64)
    ranks = np.zeros(len(gold_keys), np.int64)
    per_group: dict[str, dict] = {}
    n_classes = 0
    for group in sorted(set(groups)):
        rows = np.array([i for i, g in enumerate(groups) if g == group], np.int64)
        prompts = [render(t, *group) for t in vocab]
        keys = key_fn(prompts)
        first: dict[str, str] = {}
        for k, p in zip(keys, prompts):
            first.setdefault(k, p)
        cand_keys = list(first)
        emb = embed_prompts(list(first.values()))
        cand = np.stack([emb[p] for p in first.values()]).astype(np.float64)
        index = {k: i for i, k in enumerate(cand_keys)}
        missing = [gold_keys[i] for i in rows if gold_keys[i] not in index]
        if missing:
            raise UserError(f"zero-shot: class {missing[0]!r} is not in the class list")
        gold = np.array([index[gold_keys[i]] for i in rows], np.int64)
        sub = pose[rows]
        r = metrics.video_to_text_ranks(
            lambda v, sub=sub, cand=cand: sub[v] @ cand.T, gold, len(cand_keys), block_elems=block
        )
        ranks[rows] = r
        n_classes = max(n_classes, len(cand_keys))
        per_group["/".join(group)] = _accuracy(r, ks) | {
            "classes": len(cand_keys),
            "examples": len(rows),
        }
    out: dict[str, Any] = _accuracy(ranks, ks) | {"classes": n_classes, "examples": len(ranks)}
    if len(per_group) > 1:
        out["by_language"] = per_group
    return out


def _accuracy(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    from signclip_jax.evaluation import metrics

    rec = metrics.recall_from_ranks(ranks, ks)
    out = {f"top{k}": rec[f"R@{k}"] for k in ks}
    out["MedianR"], out["MeanR"] = rec["MedianR"], rec["MeanR"]
    return out


def default_shots(train_keys: Sequence[str], test_keys: Sequence[str]) -> tuple[int, ...]:
    """1, 5, 10, and 100 when some test class has more than 10 training examples."""
    from collections import Counter

    wanted = set(test_keys)
    counts = Counter(k for k in train_keys if k in wanted)
    most = max(counts.values(), default=0)
    return tuple(s for s in DEFAULT_SHOTS if s <= 10 or most > 10)


# ---------------------------------------------------------------------------------------------
# Files.


def _one_line(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ")


def save_embeddings(folder: str | os.PathLike, data: SplitEmbeddings, text_emb: np.ndarray):
    """pose_embeddings.npy [N, H], text_embeddings.npy [N, H] (each example's prompt),
    ids.txt, texts.txt (prompts, one a line), examples.jsonl (all metadata)."""
    folder = str(folder)
    for name, array in (("pose_embeddings.npy", data.pose), ("text_embeddings.npy", text_emb)):
        files.write_bytes_atomic(os.path.join(folder, name), files.npy_bytes(array))
    files.write_bytes_atomic(
        os.path.join(folder, "ids.txt"), "".join(_one_line(i) + "\n" for i in data.ids).encode()
    )
    files.write_bytes_atomic(
        os.path.join(folder, "texts.txt"),
        "".join(_one_line(p) + "\n" for p in data.prompts).encode(),
    )
    lines = []
    for i in range(len(data)):
        row = {
            "id": data.ids[i],
            "text": data.texts[i],
            "prompt": data.prompts[i],
            "sign_language": data.sign_languages[i],
            "spoken_language": data.spoken_languages[i],
            "label": int(data.labels[i]),
            "source_index": int(data.source_index[i]),
            "flipped": bool(data.flipped[i]),
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    files.write_bytes_atomic(os.path.join(folder, "examples.jsonl"), "".join(lines).encode())


def plot_map(
    path: str | os.PathLike,
    pose_emb: np.ndarray,
    pose_groups: Sequence[str],
    class_emb: np.ndarray,
    class_groups: Sequence[str],
    *,
    title: str = "",
    max_points: int = 5000,
    seed: int = 0,
) -> None:
    """PNG: PCA of pose (dots) and text (crosses) embeddings in one 2-D map, coloured by
    group (class, or language when there are many classes). At most `max_points` poses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    pose_emb, class_emb = np.asarray(pose_emb, np.float64), np.asarray(class_emb, np.float64)
    rows = np.arange(len(pose_emb))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    both = np.concatenate([pose_emb[rows], class_emb])
    if len(both) >= 2 and both.shape[1] >= 2:
        xy = PCA(n_components=2, random_state=seed).fit_transform(both)
    else:
        xy = np.zeros((len(both), 2))
    names = sorted(set(pose_groups) | set(class_groups))
    colour = {g: i for i, g in enumerate(names)}
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "hsv")
    norm = max(len(names) - 1, 1)

    def colours(groups):
        return [cmap(colour[g] / norm if len(names) > 20 else colour[g] % 20) for g in groups]

    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    p_xy, c_xy = xy[: len(rows)], xy[len(rows) :]
    ax.scatter(p_xy[:, 0], p_xy[:, 1], s=12, alpha=0.6, c=colours([pose_groups[i] for i in rows]))
    ax.scatter(
        c_xy[:, 0],
        c_xy[:, 1],
        s=80,
        marker="X",
        edgecolors="black",
        linewidths=0.8,
        c=colours(class_groups),
    )
    if len(class_groups) <= 30:
        for (x, y), g in zip(c_xy, class_groups):
            ax.annotate(g, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title or "PCA of pose (dots) and text (crosses) embeddings", fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    files.write_bytes_atomic(path, buf.getvalue())


def _flatten(results: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(task, group, metric, value) rows for the CSV."""
    rows: list[tuple[str, str, str, Any]] = []
    for task in TASKS:
        res = results.get(task)
        if not isinstance(res, dict):
            continue
        if task == "retrieval":
            for k, v in res.items():
                group, _, metric = k.rpartition("/") if k.startswith("lang/") else ("", "", k)
                rows.append((task, group, metric, v))
        elif task == "zeroshot":
            for k, v in res.items():
                if k == "by_language":
                    for g, sub in v.items():
                        rows += [(task, g, m, x) for m, x in sub.items()]
                else:
                    rows.append((task, "", k, v))
        elif task == "fewshot":
            for shots, sub in res.get("shots", {}).items():
                for m, x in sub.items():
                    if isinstance(x, (int, float, str)):
                        rows.append((task, f"{shots}-shot", m, x))
        else:
            rows += [(task, "", m, x) for m, x in res.items() if not isinstance(x, dict)]
    return rows


def write_results(out_dir: str | os.PathLike, name: str, results: dict[str, Any]) -> dict:
    """NAME.json and NAME.csv in `out_dir`; returns their paths."""
    paths = {
        "json": os.path.join(str(out_dir), f"{name}.json"),
        "csv": os.path.join(str(out_dir), f"{name}.csv"),
    }
    files.write_bytes_atomic(paths["json"], (json.dumps(_plain(results), indent=2) + "\n").encode())
    buf = io.StringIO()
    import csv

    writer = csv.writer(buf)
    writer.writerow(["task", "group", "metric", "value"])
    for row in _flatten(results):
        writer.writerow(row)
    files.write_bytes_atomic(paths["csv"], buf.getvalue().encode())
    return paths


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN / Infinity
    return obj


def format_table(results: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout."""
    lines = []
    h = results["header"]
    lines.append(
        f"{h['step_dir']} (step {h['step']}), split {h['split']}: {h['examples']} examples "
        f"({h['skipped']} skipped), flip {h['flip']}"
        + (f" ({h['flipped']} mirrored)" if h["flip"] != "none" else "")
        + f", classes by {h['group_by']}"
    )
    lines += [f"note: {n}" for n in h.get("notes", [])]

    def row(label: str, values: dict[str, Any], keys: Sequence[str]) -> str:
        cells = []
        for k in keys:
            v = values.get(k)
            if v is None:
                continue
            cells.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
        return f"  {label:<12}" + "  ".join(cells)

    r = results.get("retrieval")
    if r:
        lines.append("retrieval (original definitions, reference 7.2)")
        lines.append(
            row(
                "T2V",
                _sub(r, "t2v/"),
                ("P@1", "P@5", "P@10", "R@1", "R@5", "R@10", "MedianR", "MeanR"),
            )
        )
        lines.append(row("V2T", _sub(r, "v2t/"), ("R@1", "R@5", "R@10", "MedianR", "MeanR")))
        if "std/t2v/R@1" in r:
            lines.append("retrieval (standard, per example)")
            for d in ("t2v", "v2t"):
                lines.append(
                    row(d.upper(), _sub(r, f"std/{d}/"), ("R@1", "R@5", "R@10", "MedianR", "MeanR"))
                )
        if "loss" in r:
            lines.append(f"  {'loss':<12}{r['loss']:.4f} (as training's validation loss)")
        langs = sorted({k.split("/")[1] for k in r if k.startswith("lang/")})
        if langs:
            lines.append("retrieval by sign language (within the language's examples)")
            for lang in langs:
                sub = _sub(r, f"lang/{lang}/")
                values = {
                    "T2V P@1": sub.get("t2v/P@1"),
                    "V2T R@1": sub.get("v2t/R@1"),
                    "V2T R@10": sub.get("v2t/R@10"),
                    "n": int(sub["examples"]),
                }
                lines.append(row(lang, values, tuple(values)))
    z = results.get("zeroshot")
    if z:
        lines.append(f"zero-shot recognition ({z['classes']} classes, {z['examples']} poses)")
        lines.append(row("all", z, ("top1", "top5", "top10", "MedianR", "MeanR")))
        for g, sub in z.get("by_language", {}).items():
            lines.append(row(g, sub, ("top1", "top5", "top10", "MedianR", "classes")))
    f = results.get("fewshot")
    if f:
        lines.append(
            f"few-shot k-NN (seed {f['seed']}, {f['draws']} draws: mean ± std; "
            f"k = {f['neighbors']})"
        )
        for shots, sub in f["shots"].items():
            if "skipped" in sub:
                lines.append(f"  {shots + '-shot':<12}skipped: {sub['skipped']}")
                continue
            cells = "  ".join(
                f"{k} {sub[k]:.4f}±{sub[k + '_std']:.4f}" for k in ("top1", "top5", "top10")
            )
            lines.append(
                f"  {shots + '-shot':<12}{cells}  MedianR {sub['MedianR']:.1f}  "
                f"(k={sub['n_neighbors']}, {sub['train_examples']} support, "
                f"{sub['test_examples']} test, {sub['classes']} classes)"
            )
    p = results.get("probe")
    if p:
        lines.append("linear probe (logistic regression, train -> eval split)")
        if "skipped" in p:
            lines.append(f"  skipped: {p['skipped']}")
        else:
            lines.append(row("all", p, ("top1", "top5", "top10", "MedianR", "classes")))
    files = results.get("files", {})
    if files:
        lines.append("files: " + ", ".join(str(v) for v in files.values()))
    return "\n".join(lines)


def _sub(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# The whole evaluation.


@dataclasses.dataclass
class Options:
    """What `run_evaluation` does; the CLI flags of the same names."""

    workdir: str | None = None
    checkpoint: str | None = None
    which: str = "latest"
    split: str = "test"
    tasks: tuple[str, ...] | None = None  # None: all (fewshot/probe if the train split is small)
    flip: str = "none"
    batch_size: int = 64
    out: str | None = None
    name: str | None = None
    overrides: tuple[str, ...] = ()
    group_by: str = "prompt"
    fewshot_draws: int = 5
    fewshot_shots: tuple[int, ...] | None = None  # None: 1, 5, 10 (, 100 if enough)
    knn_neighbors: str = "sqrt"
    probe_max_iter: int = 100
    probe_filter_train: bool = False
    zeroshot_vocab: str = "split"  # split | all (train + eval split class names)
    block_elems: int | None = None
    plot: bool = True
    save_embeddings: bool = True
    limit: int | None = None
    dtype: str | None = None


def _check_options(opts: Options) -> None:
    unknown = [t for t in opts.tasks or TASKS if t not in TASKS]
    if unknown or opts.tasks == ():
        raise UserError(f"--tasks: unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    if opts.flip not in FLIP_MODES:
        raise UserError(f"--flip must be one of {FLIP_MODES}, got {opts.flip!r}")
    if opts.group_by not in GROUP_BY:
        raise UserError(f"--group_by must be one of {GROUP_BY}, got {opts.group_by!r}")
    if opts.which not in ("latest", "best"):
        raise UserError(f"--which must be latest or best, got {opts.which!r}")
    if opts.batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {opts.batch_size}")
    if opts.zeroshot_vocab not in ("split", "all"):
        raise UserError(f"--zeroshot_vocab must be split or all, got {opts.zeroshot_vocab!r}")
    if opts.knn_neighbors not in ("sqrt", "classes") and not str(opts.knn_neighbors).isdigit():
        raise UserError(
            f"--knn_neighbors must be sqrt, classes or an integer, got {opts.knn_neighbors!r}"
        )
    if opts.fewshot_shots is not None and any(s <= 0 for s in opts.fewshot_shots):
        raise UserError(f"--fewshot_shots must be positive, got {opts.fewshot_shots}")
    if opts.limit is not None and opts.limit <= 0:
        raise UserError(f"--limit must be > 0, got {opts.limit}")


def load(opts: Options):
    """The run of `opts` with the config overrides applied (run_lib.Run)."""
    from signclip_jax import run as run_lib
    from signclip_jax.data import sources

    run = run_lib.load_run(opts.workdir, opts.checkpoint, which=opts.which, dtype=opts.dtype)
    if opts.overrides:
        run = dataclasses.replace(
            run, config=config_lib.apply_overrides(run.config, opts.overrides)
        )
    settings = run.settings  # validates data.* (UserError on a bad value)
    sources.normalize_split(opts.split)
    mc = run.model_config
    if settings.spec.feature_dim != mc.pose_dim:
        raise UserError(
            f"data.pose_components={settings.spec.components!r} (include_z="
            f"{settings.spec.include_z}) gives {settings.spec.feature_dim} features per frame, "
            f"but the model takes {mc.pose_dim}"
        )
    if settings.spec.max_frames > mc.max_frames:
        raise UserError(
            f"data.max_frames={settings.spec.max_frames} exceeds the model's {mc.max_frames}"
        )
    return run


def run_evaluation(
    opts: Options, *, embedder=None, echo: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Runs the requested tasks; writes the files; returns the results dict (as the JSON).

    `embedder`: an embedder_lib.Embedder to reuse (its compiled towers and its run); then
    opts.workdir / checkpoint / which / dtype are not read, and opts.overrides may change the
    data but not the model inputs (pose spec, length buckets, text length).
    """
    from signclip_jax.data import sources
    from signclip_jax.evaluation import metrics
    from signclip_jax.serving import embedder as embedder_lib

    _check_options(opts)
    t0 = time.perf_counter()
    say = echo or (lambda s: log.info("%s", s))
    run = embedder.run if embedder is not None else load(opts)  # load applies the overrides
    if embedder is None:
        embedder = embedder_lib.Embedder(run, batch_size=opts.batch_size)
    elif opts.overrides:
        run = dataclasses.replace(
            run, config=config_lib.apply_overrides(run.config, opts.overrides)
        )
        before, after = embedder.settings, run.settings
        if (before.spec, before.lengths, before.text_max_len) != (
            after.spec,
            after.lengths,
            after.text_max_len,
        ):
            raise UserError("these overrides change the model inputs: load the run again")
    split = sources.normalize_split(opts.split)
    key_fn = class_key_fn(run, opts.group_by)
    block = opts.block_elems or metrics.DEFAULT_BLOCK_ELEMS

    say(f"embedding the {split} split ...")
    data = embed_split(
        run, embedder, split, flip=opts.flip, batch_size=opts.batch_size, limit=opts.limit
    )
    if not len(data):
        raise UserError(f"the {split} split has no usable examples")
    tasks = tuple(opts.tasks or TASKS)
    notes = []
    if opts.tasks is None and split != "train":
        tasks, note = _default_tasks(run, opts)
        notes += [note] if note else []
    need_train = any(t in tasks for t in ("fewshot", "probe"))
    train = None
    if need_train:
        if split == "train":
            train = data
        else:
            say("embedding the train split (support set for fewshot / probe) ...")
            train = embed_split(
                run,
                embedder,
                "train",
                flip=opts.flip,
                batch_size=opts.batch_size,
                limit=opts.limit,
            )

    # Text embeddings, one per distinct prompt: identical prompts get identical embeddings.
    text_cache: dict[str, np.ndarray] = {}

    def embed_prompts(prompts: list[str]) -> dict[str, np.ndarray]:
        todo = [p for p in dict.fromkeys(prompts) if p not in text_cache]
        if todo:
            for p, e in zip(todo, embedder.embed_texts(todo)):
                text_cache[p] = e
        return {p: text_cache[p] for p in prompts}

    embed_prompts(data.prompts)
    text_emb = np.stack([text_cache[p] for p in data.prompts]).astype(np.float32)
    keys = key_fn(data.prompts)

    header = {
        "workdir": str(run.workdir),
        "step_dir": str(run.step_dir),
        "step": run.step,
        "split": split,
        "flip": opts.flip,
        "flipped": int(data.flipped.sum()),
        "group_by": opts.group_by,
        "examples": len(data),
        "examined": data.examined,
        "skipped": data.skipped,
        "skipped_examples": data.skipped_examples,
        "overrides": list(opts.overrides),
        "prompt_template": run.settings.prompt_template,
        "sign_languages": sorted(set(data.sign_languages)),
        "tasks": list(tasks),
        "notes": notes,
    }
    results: dict[str, Any] = {"header": header}

    if "retrieval" in tasks:
        say("retrieval ...")
        r = evaluate_retrieval(
            data.pose, text_emb, keys, languages=data.sign_languages, block_elems=block
        )
        bs = int(run.config.get("batch_size", 0) or 0)
        if bs > 1:
            r["loss"] = validation_loss(
                data.pose, text_emb, run.config.loss.name, run.loss_params, bs
            )
        results["retrieval"] = r

    if "zeroshot" in tasks:
        say("zero-shot ...")
        vocab = list(dict.fromkeys(data.texts))
        if opts.zeroshot_vocab == "all":
            extra = train.texts if train is not None else _split_texts(run, "train", opts.limit)
            vocab = list(dict.fromkeys(vocab + extra))
        groups = list(zip(data.spoken_languages, data.sign_languages))
        z = zero_shot(
            data.pose,
            keys,
            groups,
            vocab,
            prompt_renderer(run),
            embed_prompts,
            key_fn,
            block_elems=block,
        )
        z["vocabulary"] = opts.zeroshot_vocab
        results["zeroshot"] = z

    if train is not None:
        train_keys = key_fn(train.prompts)
        if "fewshot" in tasks:
            say("few-shot k-NN ...")
            shots = opts.fewshot_shots or default_shots(train_keys, keys)
            neighbours = opts.knn_neighbors
            rule = int(neighbours) if str(neighbours).isdigit() else neighbours
            results["fewshot"] = {
                "seed": 42,
                "draws": opts.fewshot_draws,
                "neighbors": neighbours,
                "shots": metrics.few_shot_knn(
                    train.pose,
                    train_keys,
                    data.pose,
                    keys,
                    shots=shots,
                    seed=42,
                    draws=opts.fewshot_draws,
                    n_neighbors=rule,
                ),
            }
        if "probe" in tasks:
            say("linear probe ...")
            results["probe"] = metrics.linear_probe(
                train.pose,
                train_keys,
                data.pose,
                keys,
                seed=42,
                max_iter=opts.probe_max_iter,
                filter_train=opts.probe_filter_train,
            )

    out_dir = opts.out or os.path.join(str(run.workdir), "eval")
    name = opts.name or default_name(split, run.step, opts)
    files: dict[str, str] = {}
    if opts.save_embeddings:
        folder = os.path.join(out_dir, name)
        save_embeddings(folder, data, text_emb)
        if train is not None and train is not data:
            by_prompt = embed_prompts(train.prompts)
            train_text = np.zeros((len(train), embedder.hidden_size), np.float32)
            for i, p in enumerate(train.prompts):
                train_text[i] = by_prompt[p]
            save_embeddings(os.path.join(folder, "train"), train, train_text)
        files["embeddings"] = folder
    if opts.plot:
        png = os.path.join(out_dir, f"{name}.png")
        try:
            _plot_split(png, data, keys, text_cache, run, name)
            files["png"] = png
        except ImportError as e:
            log.warning("no embedding map: %s", e)
    files["json"] = os.path.join(out_dir, f"{name}.json")
    files["csv"] = os.path.join(out_dir, f"{name}.csv")
    header["time_s"] = round(time.perf_counter() - t0, 3)
    results["files"] = files
    write_results(out_dir, name, results)
    return results


def _split_texts(run, split: str, limit: int | None) -> list[str]:
    """The captions of a split's records (metadata only, no pose is decoded or embedded)."""
    from signclip_jax.data import sources

    source = sources.make_source(run.config.data, split=split, workdir=str(run.workdir))
    n = min(len(source), limit or len(source))
    return [_record_meta(source[i], run.settings)["text"] for i in range(n)]


def _default_tasks(run, opts: Options) -> tuple[tuple[str, ...], str]:
    """All tasks, but fewshot / probe only when the train split is small enough to embed in
    passing (they embed the whole train split: hours for Spreadthesign's 450k clips)."""
    from signclip_jax.data import sources

    n = len(sources.make_source(run.config.data, split="train", workdir=str(run.workdir)))
    if opts.limit or n <= MAX_DEFAULT_TRAIN:
        return TASKS, ""
    note = (
        f"fewshot and probe skipped: the train split has {n} examples (> {MAX_DEFAULT_TRAIN}); "
        "ask for them with --tasks=retrieval,zeroshot,fewshot,probe"
    )
    log.warning("%s", note)
    return ("retrieval", "zeroshot"), note


def _plot_split(path, data: SplitEmbeddings, keys, text_cache, run, name) -> None:
    classes = list(dict.fromkeys(keys))
    first_prompt = {}
    for k, p in zip(keys, data.prompts):
        first_prompt.setdefault(k, p)
    class_emb = np.stack([text_cache[first_prompt[k]] for k in classes])
    langs = sorted(set(data.sign_languages))
    if len(classes) > 20 and len(langs) > 1:  # too many classes to tell apart: colour language
        lang_of = dict(zip(keys, data.sign_languages))
        pose_groups, class_groups = data.sign_languages, [lang_of[k] for k in classes]
    else:
        pose_groups, class_groups = keys, classes
    plot_map(
        path,
        data.pose,
        pose_groups,
        class_emb,
        class_groups,
        title=f"{name}: PCA of pose (dots) and text (crosses) embeddings, step {run.step}",
    )


def default_name(split: str, step: int, opts: Options) -> str:
    parts = [split, f"step{step}"]
    if opts.flip != "none":
        parts.append(f"flip-{opts.flip}")
    if opts.group_by != "prompt":
        parts.append(opts.group_by)
    if opts.limit:
        parts.append(f"first{opts.limit}")
    return "_".join(parts)


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.evaluate",
        description="Evaluates a signclip-jax checkpoint: retrieval (original metric "
        "definitions), zero-shot and few-shot recognition, linear probe. Prints a table and "
        "writes OUT/NAME.json, .csv, .png and embeddings.",
        epilog="Config overrides: --config.KEY=VALUE changes the workdir's config.json for "
        "this run, e.g. --config.data.source=manifest --config.data.manifest=m.csv to evaluate "
        "on other data.",
    )
    p.add_argument("--workdir", help="training workdir (config.json, checkpoints/)")
    p.add_argument("--checkpoint", help="one checkpoint step directory (WORKDIR/checkpoints/STEP)")
    p.add_argument(
        "--which",
        default="latest",
        choices=("latest", "best"),
        help="checkpoint of --workdir to use (default latest)",
    )
    p.add_argument("--split", default="test", help="split to evaluate: test (default), val, train")
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated subset of {','.join(TASKS)} (default all; fewshot and probe "
        f"only when the train split has <= {MAX_DEFAULT_TRAIN} examples)",
    )
    p.add_argument(
        "--flip",
        nargs="?",
        const="right",
        default="none",
        choices=FLIP_MODES,
        help="test-time mirror: right (bare --flip; mirror poses with no right hand "
        "in any frame, as the original) or always",
    )
    p.add_argument("--batch_size", type=int, default=64, help="poses per embedding batch")
    p.add_argument("--out", help="output folder (default WORKDIR/eval)")
    p.add_argument("--name", help="base name of the output files (default SPLIT_stepSTEP...)")
    p.add_argument(
        "--group_by",
        default="prompt",
        choices=GROUP_BY,
        help="class identity: prompt string (as training's validation, default) or "
        "decoded token ids (as the original's evaluation)",
    )
    p.add_argument("--fewshot_draws", type=int, default=5, help="few-shot draws (seeds 42, 43, ..)")
    p.add_argument("--fewshot_shots", help="comma-separated shot counts (default 1,5,10[,100])")
    p.add_argument(
        "--knn_neighbors",
        default="sqrt",
        help="k of the k-NN: sqrt (round(sqrt(N_support)), default), classes, or N",
    )
    p.add_argument("--probe_max_iter", type=int, default=100)
    p.add_argument(
        "--probe_filter_train",
        action="store_true",
        help="drop training classes absent from the eval split (the original's sem_lex setting)",
    )
    p.add_argument(
        "--zeroshot_vocab",
        default="split",
        choices=("split", "all"),
        help="zero-shot classes: the eval split's (default) or train + eval",
    )
    p.add_argument("--block_elems", type=int, help="scores held at once (default 4M)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of each split")
    p.add_argument("--dtype", help="compute dtype override (e.g. bfloat16)")
    p.add_argument("--no_plot", action="store_true", help="skip the PNG map")
    p.add_argument("--no_embeddings", action="store_true", help="do not save embeddings")
    return p


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    overrides, bad = [], []
    it = iter(rest)
    for a in it:
        if a.startswith("--config."):
            item = a[len("--config.") :]
            if "=" not in item:  # --config.key value
                value = next(it, None)
                if value is None:
                    parser.error(f"{a} needs a value")
                item = f"{item}={value}"
            overrides.append(item)
        else:
            bad.append(a)
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    if not args.workdir and not args.checkpoint:
        parser.error("give --workdir=DIR or --checkpoint=STEP_DIR")
    shots = None
    if args.fewshot_shots:
        try:
            shots = tuple(int(s) for s in args.fewshot_shots.split(",") if s.strip())
        except ValueError:
            parser.error(f"--fewshot_shots={args.fewshot_shots!r}: integers separated by commas")
    return Options(
        workdir=args.workdir,
        checkpoint=args.checkpoint,
        which=args.which,
        split=args.split,
        tasks=None
        if args.tasks is None
        else tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        flip=args.flip,
        batch_size=args.batch_size,
        out=args.out,
        name=args.name,
        overrides=tuple(overrides),
        group_by=args.group_by,
        fewshot_draws=args.fewshot_draws,
        fewshot_shots=shots,
        knn_neighbors=args.knn_neighbors,
        probe_max_iter=args.probe_max_iter,
        probe_filter_train=args.probe_filter_train,
        zeroshot_vocab=args.zeroshot_vocab,
        block_elems=args.block_elems,
        plot=not args.no_plot,
        save_embeddings=not args.no_embeddings,
        limit=args.limit,
        dtype=args.dtype,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    _check_options(opts)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    results = run_evaluation(opts, echo=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(results))
    return 0

