"""`bench lengths`: what length buckets and length grouping can save, before any timing.

Mean padded frames, useful-frame fraction and analytic training FLOPs per clip (model/flops.py)
for each data.length_buckets set and length-grouping window (data.length_group_batches), on
batches drawn from the Spreadthesign length model (plan.py, as `train --lengths=spreadthesign`).
No model runs: the speed-up bound assumes the step time follows the FLOPs. The `packed` row
is the packed layout (data/clip_packing.py: several clips per row of --pack_row_len tokens,
captions cut to each batch's longest rounded up to --text_multiple) on random batches.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from signclip_jax.data import clip_packing
from signclip_jax.errors import UserError
from signclip_jax.model import signclip as signclip_model
from signclip_jax.model.flops import packed_train_flops, train_flops_per_sample
from signclip_jax.tools.bench.common import ints, table
from signclip_jax.tools.bench.overrides import train_config
from signclip_jax.tools.bench.plan import plan_batches


def _bucket_set(raw: str) -> tuple[int, ...]:
    if raw.strip().lower() in ("", "none", "()"):
        return ()
    values = tuple(
        ints(
            raw.replace("(", "").replace(")", ""),
            f"--buckets wants comma-separated frame counts or none, got {raw!r}",
        )
    )
    if any(v <= 0 for v in values):
        raise UserError(f"--buckets values must be > 0, got {raw!r}")
    return values


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Padding and training FLOPs per clip of length buckets, with and without length grouping,
    on the Spreadthesign length model: how much bucketing can save, before any timing."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    windows = ints(
        args.windows, f"--windows must be comma-separated integers, got {args.windows!r}"
    )
    if not windows or min(windows) < 1:
        raise UserError(f"--windows must be integers >= 1, got {args.windows!r}")
    config = train_config(args)  # the train-only flags are unset defaults (cli.py)
    mcfg = signclip_model.model_config(config)
    text_len = int(config.data.text_max_len) - 1
    batch, top = int(config.batch_size), int(mcfg.max_frames)
    bucket_sets = [_bucket_set(b) for b in args.buckets] if args.buckets else [()]
    if not args.buckets and tuple(config.data.get("length_buckets", ()) or ()):
        bucket_sets.append(tuple(config.data.length_buckets))
    full = train_flops_per_sample(mcfg, top, text_len)
    rows = []
    for buckets in bucket_sets:
        for window in windows:
            padded, real = [], []
            for seed in range(max(1, args.batches // window)):
                plan = plan_batches(
                    steps=window, batch_size=batch, max_frames=top, text_len=text_len,
                    buckets=buckets, sort_by_length=window > 1, seed=seed,
                )  # fmt: skip
                padded += [int(x) for x in plan.padded]
                real.append(plan.lengths)
            flops = float(np.mean([train_flops_per_sample(mcfg, x, text_len) for x in padded]))
            useful = float(np.concatenate(real).sum()) / (sum(padded) * batch)
            rows.append({
                "buckets": "none" if not buckets else ",".join(map(str, buckets)),
                "window": window, "batches": len(padded),
                "mean_padded_frames": float(np.mean(padded)), "useful_frame_fraction": useful,
                "train_gflop_per_sample": flops / 1e9, "speedup_bound": full / flops,
                "padded_lengths": sorted(set(padded)),
            })  # fmt: skip
    rows.append(_packed_row(mcfg, args, batch, text_len, full))
    return {
        "mode": "lengths", "batch_size": batch, "max_frames": top, "text_len": text_len,
        "model": {"hidden_size": mcfg.hidden_size, "video_layers": mcfg.video_layers},
        "full_length_gflop_per_sample": full / 1e9, "results": rows,
    }  # fmt: skip


def _packed_row(mcfg, args, batch: int, text_len: int, full: float) -> dict[str, Any]:
    """The packed layout on random batches: slots per clip (as padded frames), useful
    fraction, training FLOPs per clip of the rows and cut captions actually run."""
    top = int(mcfg.max_frames)
    row_len = args.pack_row_len or top + 2
    if row_len < top + 2 or args.text_multiple < 1 or args.pack_row_multiple < 1:
        raise UserError(f"--pack_row_len must be >= max_frames + 2 = {top + 2}, "
                        "--text_multiple and --pack_row_multiple >= 1")  # fmt: skip
    slots, frames, tokens, flops, shapes = [], [], [], [], set()
    for seed in range(args.batches):
        plan = plan_batches(steps=1, batch_size=batch, max_frames=top, text_len=text_len,
                            seed=seed)  # fmt: skip
        lengths = plan.lengths[0]
        rows = clip_packing.rows_needed(
            lengths, row_len=row_len, max_frames=top, row_multiple=args.pack_row_multiple
        )
        _, text_mask = plan.masks(0)
        cut = clip_packing.text_length(text_mask, args.text_multiple)
        slots.append(rows * row_len)
        frames.append(int(lengths.sum()))
        tokens.append(int(lengths.sum()) + 2 * batch)
        flops.append(packed_train_flops(mcfg, rows, row_len, batch, cut) / batch)
        shapes.add((rows, cut))
    mean_flops = float(np.mean(flops))
    return {
        "buckets": f"packed {row_len}" + (f" x{args.pack_row_multiple}"
                                          if args.pack_row_multiple > 1 else ""),
        "window": 1, "batches": args.batches,
        "mean_padded_frames": float(np.mean(slots)) / batch - 2,
        "useful_frame_fraction": sum(frames) / sum(slots),
        "useful_token_fraction": sum(tokens) / sum(slots),
        "train_gflop_per_sample": mean_flops / 1e9, "speedup_bound": full / mean_flops,
        "padded_lengths": sorted(f"{r} rows, text {t}" for r, t in shapes),
    }  # fmt: skip


def show(result: dict[str, Any]) -> None:
    """Prints one row per (bucket set, window)."""
    print(
        f"length buckets on the Spreadthesign length model (batch {result['batch_size']}, "
        f"max {result['max_frames']} frames: {result['full_length_gflop_per_sample']:.1f} "
        "GFLOP per clip; window = data.length_group_batches, 1 = random batches)"
    )
    for row in result["results"]:
        row["lengths_used"] = len(row["padded_lengths"])
        row["useful_pct"] = 100 * row["useful_frame_fraction"]
        if "useful_token_fraction" in row:  # packed: [CLS] and [SEP] are real tokens too
            row["useful_token_pct"] = 100 * row["useful_token_fraction"]
    print(
        table(
            result["results"],
            [
                ("buckets", "buckets", "s"),
                ("window", "window", "d"),
                ("mean_padded_frames", "mean padded frames", ".1f"),
                ("useful_pct", "useful %", ".1f"),
                ("useful_token_pct", "tokens %", ".1f"),
                ("train_gflop_per_sample", "GFLOP/clip", ".1f"),
                ("speedup_bound", "x vs max_frames", ".2f"),
                ("lengths_used", "compiles", "d"),
            ],
        )
    )
