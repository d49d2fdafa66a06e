"""What the evaluate command writes and prints: the results table, NAME.json and NAME.csv,
the embeddings folder and the 2-D PCA map of pose and text embeddings.

Every file is written to a temporary name and renamed (files.write_bytes_atomic). The map needs
the `eval` extra (matplotlib, scikit-learn).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from signclip_jax import extras, files
from signclip_jax.evaluation.evaluators import TASKS
from signclip_jax.evaluation.retrieval import SplitEmbeddings


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
    matplotlib = extras.require("matplotlib", "eval", "the embedding map")
    matplotlib.use("Agg")
    plt = extras.require("matplotlib.pyplot", "eval", "the embedding map")
    decomposition = extras.require("sklearn.decomposition", "eval", "the embedding map")

    pose_emb, class_emb = np.asarray(pose_emb, np.float64), np.asarray(class_emb, np.float64)
    rows = np.arange(len(pose_emb))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    both = np.concatenate([pose_emb[rows], class_emb])
    if len(both) >= 2 and both.shape[1] >= 2:
        xy = decomposition.PCA(n_components=2, random_state=seed).fit_transform(both)
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


def plot_split(
    path: str | os.PathLike,
    data: SplitEmbeddings,
    keys: Sequence[str],
    text_of: Mapping[str, np.ndarray],
    *,
    title: str,
) -> None:
    """plot_map of one split: its poses and one text embedding per class (the prompt of the
    class's first example; `text_of` prompt -> [H]), coloured by class, or by sign language
    when there are more than 20 classes and several languages."""
    classes = list(dict.fromkeys(keys))
    first_prompt = {}
    for k, p in zip(keys, data.prompts):
        first_prompt.setdefault(k, p)
    class_emb = np.stack([text_of[first_prompt[k]] for k in classes])
    langs = sorted(set(data.sign_languages))
    if len(classes) > 20 and len(langs) > 1:  # too many classes to tell apart: colour language
        lang_of = dict(zip(keys, data.sign_languages))
        pose_groups, class_groups = data.sign_languages, [lang_of[k] for k in classes]
    else:
        pose_groups, class_groups = keys, classes
    plot_map(path, data.pose, pose_groups, class_emb, class_groups, title=title)


def _flatten(results: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(task, group, metric, value) rows for the CSV; each note of a task is a row with
    metric "note" and the text as value."""
    rows: list[tuple[str, str, str, Any]] = []
    for task in TASKS:
        res = results.get(task)
        if not isinstance(res, dict):
            continue
        values = {k: v for k, v in res.items() if k != "notes"}
        if task == "retrieval":
            for k, v in values.items():
                group, _, metric = k.rpartition("/") if k.startswith("lang/") else ("", "", k)
                rows.append((task, group, metric, v))
        elif task == "zeroshot":
            for k, v in values.items():
                if k == "by_language":
                    for g, sub in v.items():
                        rows += [(task, g, m, x) for m, x in sub.items()]
                else:
                    rows.append((task, "", k, v))
        elif task == "fewshot":
            for shots, sub in values.get("shots", {}).items():
                for m, x in sub.items():
                    if isinstance(x, (int, float, str)):
                        rows.append((task, f"{shots}-shot", m, x))
                rows += [(task, f"{shots}-shot", "note", n) for n in sub.get("notes", [])]
        else:
            rows += [(task, "", m, x) for m, x in values.items() if not isinstance(x, (dict, list))]
        rows += [(task, "", "note", n) for n in res.get("notes", [])]
    return rows


def write_results(out_dir: str | os.PathLike, name: str, results: dict[str, Any]) -> dict:
    """NAME.json and NAME.csv in `out_dir`; returns their paths."""
    paths = {
        "json": os.path.join(str(out_dir), f"{name}.json"),
        "csv": os.path.join(str(out_dir), f"{name}.csv"),
    }
    files.write_bytes_atomic(paths["json"], (json.dumps(_plain(results), indent=2) + "\n").encode())
    buf = io.StringIO()
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
        lines += _notes(r)
    z = results.get("zeroshot")
    if z:
        lines.append(f"zero-shot recognition ({z['classes']} classes, {z['examples']} poses)")
        lines.append(row("all", z, ("top1", "top5", "top10", "MedianR", "MeanR")))
        for g, sub in z.get("by_language", {}).items():
            lines.append(row(g, sub, ("top1", "top5", "top10", "MedianR", "classes")))
        lines += _notes(z)
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
            lines += _notes(sub, f"{shots}-shot: ")
        lines += _notes(f)
    p = results.get("probe")
    if p:
        lines.append("linear probe (logistic regression, train -> eval split)")
        if "skipped" in p:
            lines.append(f"  skipped: {p['skipped']}")
        else:
            lines.append(row("all", p, ("top1", "top5", "top10", "MedianR", "classes")))
        lines += _notes(p)
    written = results.get("files", {})
    if written:
        lines.append("files: " + ", ".join(str(v) for v in written.values()))
    return "\n".join(lines)


def _notes(d: dict[str, Any], prefix: str = "") -> list[str]:
    """A task's notes (trivial numbers: metrics.retrieval_notes / recognition_notes) as lines."""
    return [f"  note: {prefix}{n}" for n in d.get("notes", [])]


def _sub(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}


__all__ = ["format_table", "plot_map", "plot_split", "save_embeddings", "write_results"]
