r"""Evaluates a trained model: `python -m signclip_jax.evaluate --workdir=DIR [--split=test]`.

The model: --workdir (latest or --which=best checkpoint), --checkpoint (one step directory) or
--model=REF (a run directory, a release folder or hf-hub:ORG/NAME[@REVISION]:
signclip_jax/models.py).

Tasks (`--tasks`, all by default), each an evaluator of evaluation/evaluators.py, the same
classes training's periodic evaluation runs:
  retrieval  text <-> pose retrieval on the split with the original metric definitions
             (metrics.py: T2V P@k/R@k over unique texts, V2T R@k over unique texts, median and
             mean rank), the per-example ("standard") metrics, a breakdown per sign language
             when the split has several, and training's validation loss;
  zeroshot   isolated-sign recognition: each pose against every class name of the split
             rendered with the data's prompt template (in the pose's own languages): top-k
             accuracy and ranks;
  fewshot    k-NN on pose embeddings, the original protocol (reference 7.4): support = the
             train split, seed 42, several draws (mean, std, and draw 0 = the original's run);
  probe      logistic-regression probe (reference 7.5): train split -> eval split.

Read top to bottom: options -> load the run (config.json + overrides) -> embed the split (the
training input pipeline, so prompts, features and bad-example handling equal training's
validation; serving's Embedder, each pose on its own mask) -> evaluators -> files.

Outputs in OUT (default DIR/eval): NAME.json (everything), NAME.csv (task, group, metric,
value), NAME.png (2-D PCA map of pose and text embeddings), NAME/ (pose_embeddings.npy,
text_embeddings.npy, ids.txt, texts.txt, examples.jsonl, and train/ with the train split's).
Every file is written to a temporary name and renamed.

Test-time flip (`--flip`, reference 7.6, evaluation/retrieval.py): `right` mirrors a pose
whose right hand is never seen (the signer is taken to be left-handed), `always` every pose.
The same mode applies to the train split used by fewshot/probe, as the original's
`eval_flip_full` embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from signclip_jax import cli, extras, files, models
from signclip_jax import config as config_lib
from signclip_jax import run as run_lib
from signclip_jax.data import sources
from signclip_jax.errors import UserError
from signclip_jax.evaluation import evaluators, metrics, recognition, report, retrieval
from signclip_jax.evaluation.evaluators import TASKS
from signclip_jax.evaluation.retrieval import FLIP_MODES, GROUP_BY, SplitEmbeddings
from signclip_jax.serving import embedder as embedder_lib

log = logging.getLogger("signclip_jax.evaluate")

MAX_DEFAULT_TRAIN = 50_000  # fewshot / probe by default only below this many train examples


# ---------------------------------------------------------------------------------------------
# Options.


@dataclasses.dataclass
class Options:
    """What `run_evaluation` does; the CLI flags of the same names."""

    workdir: str | None = None
    checkpoint: str | None = None
    model: str | None = None  # models.resolve reference; then workdir / checkpoint are unset
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


def load(opts: Options) -> run_lib.Run:
    """The run of `opts` with the config overrides applied (run_lib.Run)."""
    workdir, checkpoint = (
        models.resolve(opts.model) if opts.model else (opts.workdir, opts.checkpoint)
    )
    run = run_lib.load_run(workdir, checkpoint, which=opts.which, dtype=opts.dtype)
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


# ---------------------------------------------------------------------------------------------
# Embedding functions of the command: serving's Embedder.


def _source(run: run_lib.Run, split: str, limit: int | None):
    source = sources.make_source(run.config.data, split=split, workdir=str(run.workdir))
    return files.FirstN(source, limit) if limit else source


def embed_run_split(
    run: run_lib.Run,
    embedder: embedder_lib.Embedder,
    split: str,
    *,
    flip: str = "none",
    batch_size: int = 64,
    limit: int | None = None,
) -> SplitEmbeddings:
    """Embeds the poses of `split` of `run.config.data` (retrieval.embed_split), each pose on
    its own mask (embedder.embed_features), so the result does not depend on the batch."""
    return retrieval.embed_split(
        _source(run, split, limit),
        run.config.data,
        tokenizer=run.tokenizer,
        embed_batch=retrieval.pose_by_pose(embedder.embed_features),
        batch_size=batch_size,
        split=split,
        flip=flip,
    )


def embeddings_for(
    run: run_lib.Run, embedder: embedder_lib.Embedder, opts: Options
) -> evaluators.Embeddings:
    """What the evaluators ask for, from `embedder`: splits (flip and limit of `opts`),
    prompts, the run's loss scalars."""
    return evaluators.Embeddings(
        lambda split: embed_run_split(
            run, embedder, split, flip=opts.flip, batch_size=opts.batch_size, limit=opts.limit
        ),
        embedder.embed_texts,
        loss_params=run.loss_params,
        captions=lambda split: retrieval.split_captions(
            _source(run, split, opts.limit), run.settings
        ),
    )


def make_evaluators(run: run_lib.Run, opts: Options, split: str) -> dict[str, Any]:
    """The evaluator of each task, set up from the options."""
    key_fn = retrieval.class_key_fn(run.tokenizer, run.settings, opts.group_by)
    block = opts.block_elems or metrics.DEFAULT_BLOCK_ELEMS
    bs = int(run.config.get("batch_size", 0) or 0)
    return {
        "retrieval": evaluators.Retrieval(
            split,
            key_fn=key_fn,
            loss_name=run.config.loss.name,
            loss_batch_size=bs if bs > 1 else 0,  # the batch training's validation loss used
            standard=True,
            by_language=True,
            block_elems=block,
        ),
        "zeroshot": evaluators.ZeroShot(
            split,
            render=recognition.prompt_renderer(run.settings),
            key_fn=key_fn,
            vocab=opts.zeroshot_vocab,
            block_elems=block,
        ),
        "fewshot": evaluators.FewShot(
            split,
            key_fn=key_fn,
            shots=opts.fewshot_shots,
            draws=opts.fewshot_draws,
            neighbors=opts.knn_neighbors,
        ),
        "probe": evaluators.Probe(
            split,
            key_fn=key_fn,
            max_iter=opts.probe_max_iter,
            filter_train=opts.probe_filter_train,
        ),
    }


# ---------------------------------------------------------------------------------------------
# The whole evaluation.

_SAY = {
    "retrieval": "retrieval ...",
    "zeroshot": "zero-shot ...",
    "fewshot": "few-shot k-NN ...",
    "probe": "linear probe ...",
}


def run_evaluation(
    opts: Options,
    *,
    embedder: embedder_lib.Embedder | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs the requested tasks; writes the files; returns the results dict (as the JSON).

    `embedder`: an embedder_lib.Embedder to reuse (its compiled towers and its run); then
    opts.workdir / checkpoint / which / dtype are not read, and opts.overrides may change the
    data but not the model inputs (pose spec, length buckets, text length).
    """
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
    key_fn = retrieval.class_key_fn(run.tokenizer, run.settings, opts.group_by)
    embeddings = embeddings_for(run, embedder, opts)

    say(f"embedding the {split} split ...")
    data = embeddings.split(split)
    if not len(data):
        raise UserError(f"the {split} split has no usable examples")
    tasks = tuple(opts.tasks or TASKS)
    notes = []
    if opts.tasks is None and split != "train":
        tasks, note = _default_tasks(run, opts)
        notes += [note] if note else []
    train = None
    if any(t in tasks for t in ("fewshot", "probe")):
        if split != "train":
            say("embedding the train split (support set for fewshot / probe) ...")
        train = embeddings.split("train")
    text_emb = embeddings.prompt_text(data)  # one text embedding per distinct prompt

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
    for task, evaluator in make_evaluators(run, opts, split).items():
        if task in tasks:
            say(_SAY[task])
            results[task] = evaluator.run(embeddings)
    if "loss" in results.get("retrieval", {}):  # the files have always listed it last
        results["retrieval"]["loss"] = results["retrieval"].pop("loss")

    out_dir = opts.out or default_out(run, opts)
    name = opts.name or default_name(split, run.step, opts)
    written: dict[str, str] = {}
    if opts.save_embeddings:
        folder = os.path.join(out_dir, name)
        report.save_embeddings(folder, data, text_emb)
        if train is not None and train is not data:
            train_text = embeddings.prompt_text(train)
            report.save_embeddings(os.path.join(folder, "train"), train, train_text)
        written["embeddings"] = folder
    if opts.plot:
        png = os.path.join(out_dir, f"{name}.png")
        try:
            report.plot_split(
                png,
                data,
                key_fn(data.prompts),
                embeddings.texts(data.prompts),
                title=f"{name}: PCA of pose (dots) and text (crosses) embeddings, step {run.step}",
            )
            written["png"] = png
        except (ImportError, extras.MissingExtra) as e:
            log.warning("no embedding map: %s", e)
    written["json"] = os.path.join(out_dir, f"{name}.json")
    written["csv"] = os.path.join(out_dir, f"{name}.csv")
    header["time_s"] = round(time.perf_counter() - t0, 3)
    results["files"] = written
    report.write_results(out_dir, name, results)
    return results


def _default_tasks(run: run_lib.Run, opts: Options) -> tuple[tuple[str, ...], str]:
    """All tasks, but fewshot / probe only when the train split is small enough to embed in
    passing (they embed the whole train split: hours for Spreadthesign's 450k clips)."""
    n = len(sources.make_source(run.config.data, split="train", workdir=str(run.workdir)))
    if opts.limit or n <= MAX_DEFAULT_TRAIN:
        return TASKS, ""
    note = (
        f"fewshot and probe skipped: the train split has {n} examples (> {MAX_DEFAULT_TRAIN}); "
        "ask for them with --tasks=retrieval,zeroshot,fewshot,probe"
    )
    log.warning("%s", note)
    return ("retrieval", "zeroshot"), note


def default_out(run: run_lib.Run, opts: Options) -> str:
    """WORKDIR/eval, but ./eval/NAME for a release or Hub model (--model), whose run lives in
    the model cache."""
    if opts.model and models.is_cached_run(run.workdir):
        return os.path.join("eval", models.name_of(opts.model))
    return os.path.join(str(run.workdir), "eval")


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


def build_parser() -> cli.Parser:
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
        "--model",
        metavar="REF",
        help="instead of --workdir / --checkpoint: a run directory, a release folder or "
        "hf-hub:ORG/NAME[@REVISION] (HF_HUB_OFFLINE=1 reads only the Hugging Face cache)",
    )
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
    p.add_argument(
        "--out",
        help="output folder (default WORKDIR/eval; ./eval/NAME for a release or Hub --model)",
    )
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
    if args.model and (args.workdir or args.checkpoint):
        parser.error("--model names the model on its own: leave out --workdir / --checkpoint")
    if not args.workdir and not args.checkpoint and not args.model:
        parser.error("give --workdir=DIR, --checkpoint=STEP_DIR or --model=REF")
    shots = None
    if args.fewshot_shots:
        try:
            shots = tuple(int(s) for s in args.fewshot_shots.split(",") if s.strip())
        except ValueError:
            parser.error(f"--fewshot_shots={args.fewshot_shots!r}: integers separated by commas")
    return Options(
        workdir=args.workdir,
        checkpoint=args.checkpoint,
        model=args.model,
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
    if not flags.FLAGS.is_parsed():  # grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    results = run_evaluation(opts, echo=lambda s: print(s, file=sys.stderr, flush=True))
    print(report.format_table(results))
    return 0


__all__ = [
    "Options",
    "build_parser",
    "embed_run_split",
    "load",
    "main",
    "parse_args",
    "run_evaluation",
]
