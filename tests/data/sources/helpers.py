"""Helpers of the data-source tests."""

from __future__ import annotations

import csv

import ml_collections


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def data_config(**kw) -> ml_collections.ConfigDict:
    """A config whose `data` section holds `kw` (what make_source reads)."""
    return ml_collections.ConfigDict({"data": kw})
