"""evaluation/report.py: the PCA map and its atomic write."""

import sys

import numpy as np
import pytest

from signclip_jax import extras
from signclip_jax.evaluation import report as ev


def test_plot_and_atomic_writes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    ev.plot_map(tmp_path / "m.png", rng.normal(size=(40, 8)), [f"c{i % 25}" for i in range(40)],
                rng.normal(size=(25, 8)), [f"c{i}" for i in range(25)], max_points=30)  # fmt: skip
    with Image.open(tmp_path / "m.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.png"]


def test_plot_without_matplotlib_names_the_eval_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(extras.MissingExtra, match=r"signclip-jax\[eval\]"):
        ev.plot_map(tmp_path / "m.png", np.zeros((2, 3)), ["a", "b"], np.zeros((2, 3)), ["a", "b"])
    assert not list(tmp_path.iterdir())
