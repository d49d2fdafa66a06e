r"""Search poses by text or by pose: `python -m signclip_jax.search index|query|evaluate`.

  python -m signclip_jax.search index --workdir=runs/demo --poses poses/ 'more/**/*.pose' \
      --out=poses.index.npz                  # + --manifest=FILE for labels (evaluate)
  python -m signclip_jax.search query --index=poses.index.npz --text "<en> <ase> house" --k=5
  python -m signclip_jax.search query --index=poses.index.npz --pose=query.pose --json
  python -m signclip_jax.search evaluate --index=poses.index.npz --k 1 5 10

index embeds the poses (as `embed` does: --long_poses, --batch_size, --dtype) into one .npz
that records the model. --manifest (CSV with header or JSONL: `pose` (or path/file, relative
to the manifest) and `text` (or gloss/caption), optional sign_language / spoken_language)
adds its poses with labels: each label is the text rendered with --prompt_template (default:
the template the model was trained with, e.g. "<{spoken}> <{signed}> {text}"; `plain` keeps the
text as written). Files that cannot be read are reported and left out (exit code 1).

query and evaluate use the model the index names (--workdir / --checkpoint point at another
copy of it: a different model is refused). query prints the k best rows: rank, score, file,
label (--json: one JSON object). Scores are cosine similarities (index --metric=cosine, the
default) or raw dot products (--metric=dot). The search is exact: numpy, or FAISS when the
optional faiss package is installed (--backend).

evaluate needs labels: pose->pose and text->pose mAP and precision@k (definitions in
signclip_jax/serving/search.py); --json prints them as JSON, --out writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from signclip_jax import cli, files
from signclip_jax.errors import UserError

EXIT_SOME_FAILED = 1


# ---------------------------------------------------------------------------------- parser
def _model_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The checkpoint flags every command takes (cli.add_checkpoint_args). For query and
    evaluate the index names its model, so the flags are optional there."""
    cli.add_checkpoint_args(parser, required=required)
    parser.add_argument(
        "--dtype",
        default=None,
        help="compute dtype, e.g. bfloat16 (default: as trained; query: as the index)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="rows per model call")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    i = sub.add_parser("index", help="embed poses into an index file")
    _model_args(i, required=True)
    i.add_argument(
        "--poses",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE|DIR|GLOB",
        help=".pose files, folders of them, glob patterns (quote them)",
    )
    i.add_argument("--manifest", help="CSV/JSONL of pose files and their texts (labels)")
    i.add_argument(
        "--prompt_template",
        default=None,
        help="label = this template of the manifest's text (default: the model's)",
    )
    i.add_argument(
        "--metric",
        default="cosine",
        choices=("cosine", "dot"),
        help="scores: cosine similarity (default) or raw dot product",
    )
    i.add_argument(
        "--long_poses",
        default="truncate",
        choices=("truncate", "window"),
        help="poses longer than max_frames: first max_frames frames or mean of windows",
    )
    i.add_argument("--read_threads", type=int, default=4, help="threads reading .pose files")
    i.add_argument("--out", required=True, help="index file to write (.npz)")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress")

    q = sub.add_parser("query", help="the best rows of an index for a text or a pose")
    q.add_argument("--index", required=True, help="index file (search index --out)")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a prompt, as the model was trained ('<en> <ase> house')")
    what.add_argument("--pose", help="a .pose file (or video)")
    q.add_argument("--k", type=int, default=10, help="rows to return (default 10)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "numpy", "faiss"),
        help="auto: FAISS when installed, else numpy (both exact)",
    )
    _model_args(q, required=False)

    e = sub.add_parser("evaluate", help="pose->pose and text->pose mAP and precision@k")
    e.add_argument("--index", required=True, help="index file built with --manifest")
    e.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="k of P@k (1 5 10)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--out", help="also write the metrics to this JSON file")
    _model_args(e, required=False)
    return p


# ---------------------------------------------------------------------------------- helpers
def _manifest_items(path: str, template: str) -> list[tuple[str, str]]:
    """(pose path, label) of every manifest row; label = the rendered prompt."""
    from signclip_jax.data import text as text_lib
    from signclip_jax.data.sources.manifest import ManifestSource

    source = ManifestSource(path)
    for where, why in source.skipped[:5]:
        print(f"skipped {where}: {why}", file=sys.stderr)
    items = []
    for k in range(len(source)):
        row = source[k]
        label = text_lib.render_prompt(template, text=row["text"],
                                       spoken=row["spoken_language"],
                                       signed=row["sign_language"])  # fmt: skip
        items.append((row["pose_path"], label))
    if not items:
        raise UserError(f"--manifest {path}: no usable rows")
    return items


def _checkpoint_flags(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(workdir, checkpoint) named by the flags of cli.add_checkpoint_args; a --model REF
    (where cli has it) through signclip_jax.models."""
    if getattr(args, "model", None):
        from signclip_jax import models

        return models.checkpoint_args(args)
    return args.workdir, args.checkpoint


def _load_model(args: argparse.Namespace, index: Any) -> tuple[Any, str]:
    """(embedder, the checkpoint it loaded) of the checkpoint flags, or of the index's model."""
    from signclip_jax import run as run_lib
    from signclip_jax.serving import embedder as embedder_lib

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    workdir, checkpoint = _checkpoint_flags(args)
    if workdir or checkpoint:
        dtype = args.dtype or index.model.get("dtype")
        run = run_lib.load_run(workdir, checkpoint, which=args.which, dtype=dtype)
        name = str(run.step_dir)
    else:
        recorded = index.model["checkpoint"]
        if not os.path.isdir(recorded) and not files.is_remote(recorded):
            raise UserError(
                f"the index's model {recorded} is not there any more; give --workdir or"
                " --checkpoint of the same model"
            )
        run = run_lib.load_run(checkpoint=recorded, dtype=args.dtype or index.model.get("dtype"))
        name = recorded
    return embedder_lib.Embedder(run, batch_size=args.batch_size), name


# ---------------------------------------------------------------------------------- commands
def cmd_index(args: argparse.Namespace) -> int:
    from signclip_jax.serving import clips
    from signclip_jax.serving import search as search_lib

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name (e.g. {out}/poses.npz)")
    files.check_writable_dir(os.path.dirname(args.out) or ".", f"--out {args.out}")
    if not args.poses and not args.manifest:
        raise UserError("nothing to index: give --poses and/or --manifest")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    paths = clips.expand_poses(args.poses)
    from signclip_jax import run as run_lib

    workdir, checkpoint = _checkpoint_flags(args)
    run = run_lib.load_run(workdir, checkpoint, which=args.which, dtype=args.dtype)
    labels = [""] * len(paths)
    if args.manifest:
        template = args.prompt_template or run.settings.prompt_template
        items = _manifest_items(args.manifest, template)
        known = set(paths)
        labelled = dict(items)
        # A file given by --poses and listed in the manifest is indexed once, with its label.
        labels = [labelled.get(p, "") for p in paths]
        for path, label in items:
            if path not in known:
                known.add(path)
                paths.append(path)
                labels.append(label)
    from signclip_jax.serving import embedder as embedder_lib

    embedder = embedder_lib.Embedder(run, batch_size=args.batch_size)
    print(f"indexing {len(paths)} pose file(s) with {run.step_dir}", file=sys.stderr)
    progress = clips.Progress(len(paths), desc="index", unit="pose",
                              quiet=args.quiet or len(paths) < 64)  # fmt: skip

    try:
        index, failed = search_lib.build_index(
            embedder,
            paths,
            model=search_lib.model_record(run, args.dtype),
            labels=labels,
            metric=args.metric,
            long_poses=args.long_poses,
            read_threads=args.read_threads,
            on_error=progress.failed,
            progress=lambda n: progress.update(n, rows=n),
        )
    finally:
        progress.close()
    search_lib.save_index(args.out, index)
    n_labels = len(search_lib.label_texts(index))
    print(
        f"wrote {args.out}: {len(index)} poses"
        + (f", {n_labels} labels" if n_labels else "")
        + (f"; {len(failed)} of {len(paths)} failed" if failed else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else 0


def cmd_query(args: argparse.Namespace) -> int:
    from signclip_jax.serving import clips
    from signclip_jax.serving import search as search_lib

    index = search_lib.load_index(args.index)
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.pose and not os.path.isfile(args.pose):
        raise UserError(f"--pose {args.pose}: file not found")
    embedder, given = _load_model(args, index)
    search_lib.check_model(index, embedder, given)
    if args.text is not None:
        query = embedder.embed_texts([args.text])
        what = {"text": args.text}
    else:
        query = clips.embed_poses(embedder, [args.pose], long_poses=index.meta["long_poses"])
        what = {"pose": args.pose}
    scores, ids = search_lib.search(index, query, args.k, backend=args.backend)
    results = [
        {"rank": r + 1, "score": float(s), "file": str(index.files[i]),
         "label": str(index.labels[i])}
        for r, (s, i) in enumerate(zip(scores[0], ids[0]))
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"query": what, "index": args.index, "metric": index.metric,
                          "model": index.model, "results": results}))  # fmt: skip
        return 0
    shown = args.text if args.text is not None else args.pose
    print(f"query {shown!r}: {len(results)} of {len(index)} poses ({index.metric} scores,"
          f" model {index.describe_model()})")  # fmt: skip
    width = max([len(r["file"]) for r in results] + [4])
    print(f"{'rank':>4}  {'score':>8}  {'file':<{width}}  label")
    for r in results:
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['file']:<{width}}  {r['label']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from signclip_jax.serving import search as search_lib

    index = search_lib.load_index(args.index)
    if any(k < 1 for k in args.k):
        raise UserError(f"--k must be >= 1, got {args.k}")
    if not search_lib.label_texts(index):
        raise UserError(f"--index {args.index}: no labels; build the index with --manifest")
    if args.out:
        files.check_writable_dir(os.path.dirname(args.out) or ".", f"--out {args.out}")
    embedder, given = _load_model(args, index)
    search_lib.check_model(index, embedder, given)
    text_emb = embedder.embed_texts(search_lib.label_texts(index))
    metrics = search_lib.evaluate(index, text_emb, ks=args.k)
    metrics = json.loads(json.dumps(metrics), parse_constant=lambda c: None)  # NaN -> null
    if args.out:
        files.write_json_atomic(args.out, metrics)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{args.index}: {metrics['items']} poses, {metrics['labelled']} labelled,"
          f" {metrics['labels']} labels ({metrics['metric']} scores)")  # fmt: skip
    for name in ("pose_to_pose", "text_to_pose"):
        m = metrics[name]
        cells = "  ".join(f"{key} {_fmt(value)}" for key, value in m.items() if key != "queries")
        print(f"{name.replace('_', ' '):>14}: {cells}  ({m['queries']} queries)")
    return 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


COMMANDS = {"index": cmd_index, "query": cmd_query, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


__all__ = ["build_parser", "main"]
