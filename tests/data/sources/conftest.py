"""Fixtures of the data-source tests: one small synthetic Spreadthesign-style dataset."""

from __future__ import annotations

import csv

import pytest

from signclip_jax.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="package")
def synth(tmp_path_factory):
    """Synthetic Spreadthesign-style dataset: (csv path, pose dir, rows without header)."""
    out = tmp_path_factory.mktemp("synth")
    csv_path = write_synthetic_dataset(out, num_signs=4, signers=5, seed=1)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return csv_path, out / "poses", rows[1:]
