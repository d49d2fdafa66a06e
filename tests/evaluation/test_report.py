"""evaluation/report.py: the PCA map and its atomic write."""

import csv
import json
import sys
from pathlib import Path

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


def _results():
    header = {
        "step_dir": "w/checkpoints/4", "step": 4, "split": "val", "examples": 1, "skipped": 0,
        "flip": "none", "flipped": 0, "group_by": "prompt", "notes": ["header note"],
    }  # fmt: skip
    return {
        "header": header,
        "retrieval": {"t2v/R@1": 1.0, "v2t/R@1": 1.0, "examples": 1.0,
                      "notes": ["only 1 example: retrieval scores are trivially perfect"]},
        "zeroshot": {"top1": 1.0, "classes": 1, "examples": 1, "vocabulary": "split",
                     "notes": ["only 1 class: every example is classified correctly, trivially"]},
        "fewshot": {"seed": 42, "draws": 1, "neighbors": "sqrt", "shots": {"1": {
            "top1": 1.0, "top1_std": 0.0, "top5": 1.0, "top5_std": 0.0, "top10": 1.0,
            "top10_std": 0.0, "MedianR": 1.0, "n_neighbors": 1, "train_examples": 2,
            "test_examples": 1, "classes": 2, "protocol": {}, "draws": 1,
            "notes": ["top5, top10 over 2 candidate classes: k exceeds"]}}},
        "probe": {"top1": 0.0, "classes": 2, "notes": ["only 1 test example: each score is 0"]},
    }  # fmt: skip


def test_task_notes_are_in_the_table_the_json_and_the_csv(tmp_path):
    results = _results()
    table = ev.format_table(results).splitlines()
    assert "note: header note" in table
    for line in (
        "  note: only 1 example: retrieval scores are trivially perfect",
        "  note: only 1 class: every example is classified correctly, trivially",
        "  note: 1-shot: top5, top10 over 2 candidate classes: k exceeds",
        "  note: only 1 test example: each score is 0",
    ):
        assert line in table, line
    # Each note follows its own task's numbers.
    assert table.index("  note: only 1 test example: each score is 0") > next(
        i for i, x in enumerate(table) if x.startswith("linear probe")
    )
    paths = ev.write_results(tmp_path, "r", results)
    assert (
        json.loads(Path(paths["json"]).read_text())["retrieval"]["notes"]
        == (results["retrieval"]["notes"])
    )
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    notes = [r for r in rows if r[2] == "note"]
    assert notes == [
        ["retrieval", "", "note", "only 1 example: retrieval scores are trivially perfect"],
        ["zeroshot", "", "note", "only 1 class: every example is classified correctly, trivially"],
        ["fewshot", "1-shot", "note", "top5, top10 over 2 candidate classes: k exceeds"],
        ["probe", "", "note", "only 1 test example: each score is 0"],
    ]
    assert not any(r[2] == "notes" or r[3].startswith("[") for r in rows)  # no list reprs
