"""What every benchmark mode shares: the printed table, comma lists, step timing, memory.

Standard library only: the PyTorch twin's child process imports this without JAX.
"""

from __future__ import annotations

import resource
import statistics
import sys
from typing import Any

from signclip_jax.errors import UserError


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format). A missing value prints as "-"."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ints(raw: str, error: str) -> list[int]:
    """Comma-separated integers ("1,2,3") -> [1, 2, 3]; UserError(error) on anything else."""
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise UserError(error) from None


def max_rss_bytes() -> int:
    """This process's peak resident memory in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def timing(repeat_s: list[float], steps: int, batch_size: int, step_flops: float,
           peak: float | None) -> dict[str, Any]:  # fmt: skip
    """samples/s, step ms, TFLOP/s and MFU from the per-repeat wall times (their median).

    repeat_s: seconds of each timed repeat of `steps` steps. step_flops: model FLOPs of one
    step. peak: dense peak TFLOP/s of the devices used (None: MFU unknown).
    """
    median = statistics.median(repeat_s)
    tflops = step_flops * steps / median / 1e12
    return {
        "repeat_s": repeat_s,
        "step_ms": 1000 * median / steps,
        "samples_per_s": batch_size * steps / median,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
    }
