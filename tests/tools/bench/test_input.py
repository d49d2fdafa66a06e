"""tools/bench/input.py: `bench input` in a tiny form, table and JSON."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest

from signclip_jax.tools.bench import input as input_bench
from tests.tools.bench import run_bench as _run


def test_input_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(
        "input", "--signs=2", "--signers=3", "--n=8", "--workers=0", "--batch_size=2",
        "--batches=2", "--step_rate=1000", "--pose_dtype=bfloat16", f"--out={out}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "samples/s" in r.stdout and ".pose files" in r.stdout and "packed shards" in r.stdout
    result = json.loads(out.read_text())
    # 8 examples from 6 generated clips (a dataset of a realistic size from a few clips).
    assert result["mode"] == "input" and result["examples"] == 8
    assert result["distinct_examples"] == 6 and "8 examples cycling 6 clips" in r.stdout
    assert result["pose_dtype"] == "bfloat16" and "bfloat16 poses" in r.stdout
    assert result["augment_settings"] == {"temporal": True}  # the original recipe
    rows = result["results"]
    readers = (".pose files", "packed shards", "packed shards (uncompressed)")
    assert {(x["what"], x["augment"], x["reader"]) for x in rows} == {
        ("per-example work", "host", s) for s in readers[:2]
    } | {("pipeline", "device", s) for s in readers}  # fmt: skip
    for x in rows:
        assert x["per_worker"] > 0 and x["seconds"] > 0 and x["cpu_seconds"] > 0
        assert x["per_core"] == x["samples"] / x["cpu_seconds"]
        # The table shows the same numbers as the JSON.
        assert re.search(rf"{x['per_core']:.1f}\b", r.stdout)
    # Per reader: samples per CPU second with the augmentation on the device, in process,
    # and the cores that feed 1000 samples/s.
    device = {x["reader"]: x["per_core"] for x in rows if x["augment"] == "device"}
    assert result["per_core_samples_per_s"] == device
    assert result["cores_per_accelerator"] == {k: math.ceil(1000 / v) for k, v in device.items()}
    for reader, cores in result["cores_per_accelerator"].items():
        assert f"{reader}: {cores} CPU core(s) per accelerator to feed 1000 samples/s" in r.stdout
    # Workers (cores) per accelerator at 1000 samples/s with the augmentation on the host.
    per_example = {x["reader"]: x["per_worker"] for x in rows if x["what"] == "per-example work"}
    assert result["workers_per_accelerator"] == {
        k: math.ceil(1000 / v) for k, v in per_example.items()
    }
    for reader, workers in result["workers_per_accelerator"].items():
        assert f"{reader}: {workers} worker processes" in r.stdout
    assert len(result["machine"]["load_average"]) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_seconds_counts_child_processes():
    # grain's workers are child processes: their CPU time counts towards the cores used.
    before, counted = input_bench.cpu_seconds()
    assert counted
    spin = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ninput()"
    )
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE)
    try:
        for _ in range(300):  # the child spins 0.5 s of CPU, then waits for a line
            if input_bench.cpu_seconds()[0] - before >= 0.45:
                break
            time.sleep(0.1)
        assert input_bench.cpu_seconds()[0] - before >= 0.45
    finally:
        child.communicate(b"\n", timeout=30)


def test_drawn_lengths_resample_clips_to_spreadthesign_lengths():
    import numpy as np

    from signclip_jax.data.pose import PoseSpec
    from signclip_jax.tools.bench.plan import spreadthesign_lengths

    spec = PoseSpec(max_frames=0)
    p = spec.num_points
    clips = [
        {"id": f"c{i}", "text": "hello", "fps": 25.0,
         "points": np.arange(t, dtype=np.float32)[:, None, None] * np.ones((1, p, 3), np.float32),
         "observed": np.ones((t, p), bool)}
        for i, t in enumerate((40, 90))
    ]  # fmt: skip
    src = input_bench.DrawnLengths(input_bench.Cycled(clips, 400), spec, seed=3)
    lengths = [len(src[i]["points"]) for i in range(400)]
    assert (
        lengths
        == [src.length(i) for i in range(400)]
        == [len(src[i]["points"]) for i in range(400)]
    )  # deterministic per (seed, index)
    expected = [
        int(spreadthesign_lengths(np.random.default_rng([3, i]), 1, 256)[0]) for i in range(400)
    ]
    assert lengths == expected and 85 < np.mean(lengths) < 110 and max(lengths) <= 256
    r = src[1]  # 90 source frames -> its drawn length, each frame the nearest source frame
    n = len(r["points"])
    assert np.array_equal(r["points"][:, 0, 0], (np.arange(n) * 90) // n)
    assert r["observed"].shape == (n, p) and r["text"] == "hello" and r["id"] == "c1"


def test_input_lengths_refuses_packed_shards(tmp_path):
    r = _run("input", "--lengths=spreadthesign", f"--shards={tmp_path}")
    assert r.returncode == 2 and "--lengths" in r.stderr and "Traceback" not in r.stderr


def test_input_packed_only_measures_the_packed_pipelines(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(
        "input", "--signs=2", "--signers=3", "--n=8", "--workers=0", "--batch_size=2",
        "--batches=2", "--packed_only", f"--out={out}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(x["what"], x["augment"], x["reader"]) for x in rows} == {
        ("pipeline", "device", "packed shards"),
        ("pipeline", "device", "packed shards (uncompressed)"),
    }
    assert ".pose files" not in r.stdout
