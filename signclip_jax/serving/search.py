"""Search a collection of poses by text or by pose: an embedding index, its queries, its mAP.

  build_index(embedder, files, labels=...)  -> SearchIndex: one row per pose that could be
                                               read, the model it was built with
  save_index(path, index) / load_index(path)   one .npz (no pickles), written atomically
  check_model(index, embedder)                 refuses a model other than the index's
  search(index, queries, k)                    top-k rows per query: exact, in numpy, or with
                                               FAISS (IndexFlatIP, also exact) when installed
  evaluate(index, text_embeddings)             pose->pose and text->pose mAP and precision@k

Scores: `cosine` (default; rows and queries scaled to unit length) or `dot` (raw dot products,
the original's scores). Rankings sort by score, ties by row order.

The model. An index records the checkpoint it was built with and the embeddings that model
gives a few fixed probe texts. A query embeds its text or pose with a model and first embeds
the probes again: if they differ from the recorded ones, the model is another one (other
weights, architecture or compute dtype) and the query is refused, because its embeddings would
not be comparable with the index's.

Evaluation (labels from a manifest at build time; a label is the prompt of the pose's text):
  pose -> pose  every labelled row queries all other rows (itself left out); relevant: the
                rows with its label. Rows whose label no other row has are not queries.
  text -> pose  every distinct label's prompt queries all rows; relevant: the rows with it.
  AP of one query = mean over its relevant rows of the precision at that row's rank; mAP =
  mean AP over queries; P@k = relevant rows among the first k / k, averaged over queries.
  Unlabelled rows are candidates, never relevant. Computed in blocks of queries: memory
  [block, N], never [N, N].
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from signclip_jax import extras, files
from signclip_jax.errors import UserError
from signclip_jax.serving import clips

INDEX_FORMAT = 1
METRICS = ("cosine", "dot")
BACKENDS = ("auto", "numpy", "faiss")
# Fixed texts whose embeddings identify a model (tokenised like any prompt).
PROBE_TEXTS = ("<en> <ase> house", "<de> <gsg> Haus", "signclip-jax search index probe")
PROBE_RTOL = 1e-3  # different models differ by O(1); bf16 vs fp32 of one model by ~1e-2
DEFAULT_KS = (1, 5, 10)


@dataclasses.dataclass
class SearchIndex:
    """embeddings [N, H] float32 (as the towers give them); files, labels [N] str ("" =
    unlabelled); probe [len(PROBE_TEXTS), H]; meta: format, model (checkpoint, workdir, step,
    dtype), metric, long_poses, hidden, count."""

    embeddings: np.ndarray
    files: np.ndarray
    labels: np.ndarray
    probe: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def metric(self) -> str:
        return str(self.meta["metric"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta["model"])

    def describe_model(self) -> str:
        m = self.model
        dtype = f" in {m['dtype']}" if m.get("dtype") else ""
        return f"{m.get('checkpoint')} at step {m.get('step')}{dtype}"


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros((0,), dtype="<U1")


# ---------------------------------------------------------------------------------- building
def model_record(run: Any, dtype: str | None = None) -> dict[str, Any]:
    """What names the model of a loaded run (signclip_jax.run.Run) in an index."""
    return {
        "checkpoint": str(run.step_dir),
        "workdir": str(run.workdir),
        "step": int(run.step),
        "dtype": dtype,
    }


def probe(embedder: Any) -> np.ndarray:
    """The model's embeddings of PROBE_TEXTS: [len(PROBE_TEXTS), H] float32."""
    return np.asarray(embedder.embed_texts(list(PROBE_TEXTS)), np.float32)


def build_index(
    embedder: Any,
    paths: Sequence[str],
    *,
    model: dict[str, Any],
    labels: Sequence[str] | None = None,
    metric: str = "cosine",
    long_poses: str = "truncate",
    read_threads: int = 4,
    on_error: Any = None,
    progress: Any = None,
) -> tuple[SearchIndex, list[tuple[str, str]]]:
    """Embeds `paths` (labels[i] the label of paths[i], "" for none) -> (index of the files
    that could be read, [(file, error)] of the others)."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} files")
    emb, good, failed = clips.embed_files(
        embedder,
        paths,
        chunk=max(8 * embedder.row_sizes[-1], 256),
        read_threads=read_threads,
        long_poses=long_poses,
        on_error=on_error,
        progress=progress,
    )
    label_of = dict(zip(paths, labels)) if labels is not None else {}
    meta = {
        "format": INDEX_FORMAT,
        "model": model,
        "metric": metric,
        "long_poses": long_poses,
        "hidden": int(emb.shape[1]),
        "count": len(good),
    }
    index = SearchIndex(
        embeddings=emb,
        files=_str_array(good),
        labels=_str_array([label_of.get(f, "") for f in good]),
        probe=probe(embedder),
        meta=meta,
    )
    return index, failed


def save_index(path: str | os.PathLike, index: SearchIndex) -> None:
    """One .npz, atomically (see files.write_npz_atomic)."""
    files.write_npz_atomic(
        path,
        {
            "embeddings": index.embeddings.astype(np.float32, copy=False),
            "files": index.files,
            "labels": index.labels,
            "probe": index.probe.astype(np.float32, copy=False),
            "meta": np.array(json.dumps(index.meta, sort_keys=True)),
        },
    )


def load_index(path: str | os.PathLike) -> SearchIndex:
    """Reads an index written by save_index; UserError naming the file otherwise."""
    name = f"--index {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("embeddings", "files", "labels", "probe", "meta")}
        meta = json.loads(str(arrays["meta"]))
    except Exception as e:  # zip, npy or JSON errors, missing keys: not an index
        raise UserError(
            f"{name}: not a search index ({type(e).__name__}: {e}); build one with"
            " `python -m signclip_jax.search index`"
        ) from None
    if meta.get("format") != INDEX_FORMAT:
        raise UserError(f"{name}: index format {meta.get('format')!r}; this version reads"
                        f" {INDEX_FORMAT}")  # fmt: skip
    emb = arrays["embeddings"]
    n = len(arrays["files"])
    if emb.ndim != 2 or emb.shape[0] != n or len(arrays["labels"]) != n:
        raise UserError(f"{name}: embeddings {emb.shape} do not match {n} files")
    return SearchIndex(emb.astype(np.float32), arrays["files"], arrays["labels"],
                       arrays["probe"], meta)  # fmt: skip


# ---------------------------------------------------------------------------------- the model
def check_model(index: SearchIndex, embedder: Any, given: str) -> None:
    """UserError unless `embedder` (the model `given` names) is the index's model: same
    width and the same probe embeddings (to PROBE_RTOL)."""
    if embedder.hidden_size != index.meta["hidden"]:
        raise UserError(
            f"the model {given} gives {embedder.hidden_size}-d embeddings; the index was built"
            f" with {index.describe_model()}, {index.meta['hidden']}-d. Use that model or"
            " rebuild the index"
        )
    got = probe(embedder)
    want = index.probe
    diff = float(np.abs(got - want).max())
    if diff > PROBE_RTOL * (1.0 + float(np.abs(want).max())):
        raise UserError(
            f"the model {given} is not the one the index was built with,"
            f" {index.describe_model()}: its embeddings of the probe texts differ by"
            f" {diff:.3g}. Query with that model, or rebuild the index with this one"
        )


# ---------------------------------------------------------------------------------- queries
def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return clips.normalize_rows(x) if metric == "cosine" else x


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def search(
    index: SearchIndex, queries: np.ndarray, k: int = 10, *, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, H] -> (scores [Q, k'], rows [Q, k']) best first, k' = min(k, N).

    backend: "numpy" (exact; ties by row order), "faiss" (IndexFlatIP: exact inner products;
    needs the optional faiss package) or "auto" (faiss when installed, else numpy)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != index.embeddings.shape[1]:
        raise ValueError(f"queries of width {queries.shape[1]}, index {index.embeddings.shape}")
    k = min(k, len(index))
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    q = _prepared(queries, index.metric)
    rows = _prepared(index.embeddings, index.metric)
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        faiss = extras.require("faiss", "search", "search --backend=faiss")
        flat = faiss.IndexFlatIP(rows.shape[1])
        flat.add(np.ascontiguousarray(rows))
        scores, ids = flat.search(np.ascontiguousarray(q), k)
        return scores.astype(np.float32), ids.astype(np.int64)
    scores = q @ rows.T
    order = _rank(scores)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def _rank(scores: np.ndarray) -> np.ndarray:
    """Rows of each query, best first; equal scores keep row order (a stable sort)."""
    return np.argsort(-scores, axis=1, kind="stable")


# ---------------------------------------------------------------------------------- evaluation
def _retrieval(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """scores, relevant [B, N] -> (AP [B], {k: P@k [B]}). Queries need >= 1 relevant row."""
    order = _rank(scores)
    hits = np.take_along_axis(relevant, order, axis=1)
    found = np.cumsum(hits, axis=1)
    ranks = np.arange(1, hits.shape[1] + 1)
    ap = (hits * (found / ranks)).sum(axis=1) / hits.sum(axis=1)
    return ap, {k: found[:, min(k, hits.shape[1]) - 1] / k for k in ks}


def _summary(ap: list[np.ndarray], pk: dict[int, list[np.ndarray]]) -> dict[str, Any]:
    all_ap = np.concatenate(ap) if ap else np.zeros(0)
    out: dict[str, Any] = {"queries": len(all_ap)}
    out["mAP"] = float(all_ap.mean()) if len(all_ap) else float("nan")
    for k, parts in pk.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        out[f"P@{k}"] = float(values.mean()) if len(values) else float("nan")
    return out


def evaluate(
    index: SearchIndex,
    text_embeddings: np.ndarray | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    block: int = 256,
) -> dict[str, Any]:
    """pose->pose (and, given text_embeddings [L, H] of `label_texts(index)`, text->pose)
    mAP and P@k as defined in the module docstring."""
    labels = np.asarray(index.labels)
    labelled = labels != ""
    if not labelled.any():
        raise UserError("the index has no labels: build it with --manifest")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise UserError(f"--k must be >= 1, got {ks}")
    rows = _prepared(index.embeddings, index.metric)
    names, codes = np.unique(labels, return_inverse=True)
    codes = np.where(labelled, codes, -1)
    counts = np.bincount(codes[labelled], minlength=len(names))
    out: dict[str, Any] = {"items": len(labels), "labelled": int(labelled.sum()),
                           "labels": int((names != "").sum()), "metric": index.metric}  # fmt: skip

    queries = np.flatnonzero(labelled & (counts[np.maximum(codes, 0)] > 1))
    ap: list[np.ndarray] = []
    pk: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        scores = rows[q] @ rows.T
        scores[np.arange(len(q)), q] = -np.inf  # itself: last, and never relevant
        relevant = codes[None, :] == codes[q][:, None]
        relevant[np.arange(len(q)), q] = False
        # The query itself ranks last and is never relevant: AP and P@k as over the N - 1 others.
        a, p = _retrieval(scores, relevant, ks)
        ap.append(a)
        for k in ks:
            pk[k].append(p[k])
    out["pose_to_pose"] = _summary(ap, pk)

    if text_embeddings is not None:
        texts = label_texts(index)
        t = _prepared(np.asarray(text_embeddings), index.metric)
        if len(t) != len(texts):
            raise ValueError(f"{len(t)} text embeddings for {len(texts)} labels")
        ap, pk = [], {k: [] for k in ks}
        for start in range(0, len(texts), block):
            chunk = texts[start : start + block]
            scores = t[start : start + block] @ rows.T
            relevant = labels[None, :] == np.asarray(chunk)[:, None]
            a, p = _retrieval(scores, relevant, ks)
            ap.append(a)
            for k in ks:
                pk[k].append(p[k])
        out["text_to_pose"] = _summary(ap, pk)
    return out


def label_texts(index: SearchIndex) -> list[str]:
    """The distinct labels of an index, sorted: the text->pose queries."""
    return sorted({str(label) for label in index.labels if label != ""})


__all__ = [
    "BACKENDS",
    "METRICS",
    "PROBE_TEXTS",
    "SearchIndex",
    "build_index",
    "check_model",
    "evaluate",
    "faiss_available",
    "label_texts",
    "load_index",
    "model_record",
    "probe",
    "save_index",
    "search",
]
