"""tools/bench/common.py: the printed table, comma lists, timing arithmetic."""

from __future__ import annotations

import pytest

from signclip_jax.errors import UserError
from signclip_jax.tools.bench import common


def test_table_right_aligns_and_shows_missing_values_as_dashes():
    rows = [{"impl": "jax", "rate": 12.345, "mfu": None}, {"impl": "torch twin", "rate": 3.0}]
    text = common.table(rows, [("impl", "impl", "s"), ("rate", "samples/s", ".1f"),
                               ("mfu", "MFU", ".1f")])  # fmt: skip
    assert text.splitlines() == [
        "      impl  samples/s  MFU",
        "----------  ---------  ---",
        "       jax       12.3    -",
        "torch twin        3.0    -",
    ]


def test_ints():
    assert common.ints("0, 2,8,", "bad") == [0, 2, 8]
    assert common.ints("", "bad") == []
    with pytest.raises(UserError, match=r"^--workers wants numbers$"):
        common.ints("1,two", "--workers wants numbers")


def test_timing_uses_the_median_repeat():
    t = common.timing([2.0, 1.0, 4.0], steps=10, batch_size=8, step_flops=1e12, peak=20.0)
    assert t["step_ms"] == pytest.approx(200.0) and t["samples_per_s"] == pytest.approx(40.0)
    assert t["tflops"] == pytest.approx(5.0) and t["mfu"] == pytest.approx(0.25)
    assert common.timing([1.0], 1, 1, 1e12, None)["mfu"] is None
    assert common.max_rss_bytes() > 2**20
