"""tools/bench/suite.py: `bench suite --smoke` end to end on CPU, the wall-clock guard, a
failing part, and the targets' verdicts."""

from __future__ import annotations

import json
import math

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from signclip_jax.errors import UserError
from signclip_jax.tools.bench import cli, suite
from signclip_jax.tools.bench import input as input_bench
from tests.tools.bench import bench_in_process
from tests.tools.bench import run_bench as _run

PART_KEYS = {"part", "letter", "status", "budget_s", "seconds", "started"}
STATUSES = {"met", "not met", "unmeasured"}


@pytest.mark.slow  # 4 tiny XLA compiles and the twin's child process (~50-100 s on 2 cores)
def test_suite_smoke_runs_every_part(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "suite"
    try:
        stdout = bench_in_process(capsys, "suite", "--smoke", f"--out={out}")
    finally:  # the rest of the session: no cache, and JAX's cache object forgets this one
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    summary = json.loads((out / "suite.json").read_text())
    assert summary["command"] == f"python -m signclip_jax.bench suite --smoke --out={out}"
    assert summary["smoke"] and not summary["judged"] and summary["note"]
    m = summary["machine"]
    assert m["device_kind"] and m["jax_version"] == jax.__version__ and m["torch_version"]
    assert summary["date"] and summary["compilation_cache"] == str(out / "jax_cache")
    assert any((out / "jax_cache").iterdir())
    records = {}
    for name in suite.PART_NAMES:
        records[name] = json.loads((out / f"{name}.json").read_text())
        assert PART_KEYS <= set(records[name]), name
    assert [p["part"] for p in summary["parts"]] == list(suite.PART_NAMES)
    # b: the config either takes model.attention=pallas (then it ran or failed with its
    # error) or not yet (then it is skipped with the config's error line).
    pallas = records.pop("pallas")
    if pallas["status"] == "skipped":
        assert "model.attention" in pallas["reason"] and "pallas" in pallas["reason"]
    else:  # Pallas' interpret mode on CPU
        assert pallas["status"] == "ok", (pallas.get("error"), pallas.get("traceback"))
        assert pallas["summary"]["attention"].startswith("pallas flash kernel")
        assert "--config.model.attention=pallas" in pallas["command"]
    for name, r in records.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        assert r["command"].startswith("python -m signclip_jax.bench ")
        assert r["summary"] and r["result"]
    # a: the JAX step and the twin (compiled with aot_eager, then eager) in one call.
    a = records["recipe"]["summary"]
    assert a["samples_per_s"] > 0 and a["batch_size"] == 8 and a["frames"] == 32
    assert a["twin_variants"][0]["variant"] == "torch.compile (aot_eager)"
    assert a["twin_variants"][0]["compile_s"] > 0
    assert a["twin_samples_per_s"] == max(
        v["samples_per_s"] for v in a["twin_variants"] if v["samples_per_s"]
    )
    assert a["jax_over_twin"] == pytest.approx(a["samples_per_s"] / a["twin_samples_per_s"])
    assert "--twin_compile" in records["recipe"]["command"]
    # c: both layouts on the same clips.
    c = records["packing"]["summary"]
    assert c["packed_over_padded"] == pytest.approx(
        c["packed_clips_per_s"] / c["padded_clips_per_s"]
    )
    # d: one GradCache step of 32 clips in 4 microbatches.
    d = records["gradcache"]["summary"]
    assert (d["batch_size"], d["microbatches"]) == (32, 4) and d["step_s"] > 0
    assert d["samples_per_s"] == pytest.approx(32 / d["step_s"])
    # e: packed shards, augmentation on the device, cores at the measured step rates.
    e = records["host"]["summary"]
    assert e["per_core_samples_per_s"] == e["per_core_by_reader"][input_bench.PACKED] > 0
    assert set(e["step_rates"]) >= {"recipe", "packing"}
    assert e["step_rates"]["packing"] == c["packed_clips_per_s"]
    assert sorted(e["cores_per_accelerator"].values()) == sorted(
        math.ceil(rate / e["per_core_samples_per_s"]) for rate in e["step_rates"].values()
    )
    # The summary marks every target next to its number.
    targets = {t["name"]: t for t in summary["targets"]}
    assert set(targets) == {t[0] for t in suite.TARGETS}
    assert all(t["status"] in STATUSES for t in targets.values())
    assert targets["recipe_mfu"]["status"] == "unmeasured"  # no peak FLOP/s for a CPU
    assert targets["packed_clips_per_s"]["value"] == c["packed_clips_per_s"]
    assert targets["packed_clips_per_s"]["status"] == (
        "met" if c["packed_clips_per_s"] >= 5000 else "not met"
    )
    assert targets["gradcache_step_s"]["status"] == "met"
    assert targets["host_clips_per_s_per_core"]["value"] == e["per_core_samples_per_s"]
    assert "target recipe_samples_per_s" in stdout and "recipe" in stdout


def test_suite_guard_skips_parts_past_the_budget(tmp_path, capsys):
    out = tmp_path / "suite"
    bench_in_process(capsys, "suite", "--smoke", "--budget_s=1", f"--out={out}",
                     "--parts=recipe,host")  # fmt: skip
    summary = json.loads((out / "suite.json").read_text())
    assert [p["part"] for p in summary["parts"]] == ["recipe", "host"]
    for name in ("recipe", "host"):
        r = json.loads((out / f"{name}.json").read_text())
        assert r["status"] == "skipped" and r["reason"].startswith("wall-clock guard:")
    assert not (out / "packing.json").exists()
    assert {t["status"] for t in summary["targets"]} == {"unmeasured"}


def test_run_parts_records_a_failure_and_runs_the_rest(tmp_path):
    now = [0.0]

    def clock():
        return now[0]

    def ok(seconds, summary):
        def fn(done):
            now[0] += seconds
            return {"summary": summary, "seen": sorted(done)}

        return fn

    def boom(done):
        now[0] += 1
        raise RuntimeError("kernel exploded\nmore detail")

    def not_here(done):
        raise suite.PartSkipped("model.attention must be one of ...")

    seen = []
    parts = [
        suite.Part("recipe", 10, ok(12, {"samples_per_s": 3000.0})),
        suite.Part("pallas", 5, not_here),
        suite.Part("packing", 10, boom),
        suite.Part("gradcache", 10, ok(3, {"step_s": 3.0})),
        suite.Part("host", 90, ok(1, {})),  # 85 s left of 100: the guard skips it
    ]
    records = suite.run_parts(parts, tmp_path, 100.0, clock=clock,
                              after_each=lambda rs: seen.append(len(rs)))  # fmt: skip
    assert seen == [1, 2, 3, 4, 5]
    status = {r["part"]: r["status"] for r in records}
    assert status == {"recipe": "ok", "pallas": "skipped", "packing": "failed",
                      "gradcache": "ok", "host": "skipped"}  # fmt: skip
    by = {r["part"]: r for r in records}
    assert by["recipe"]["seconds"] == 12 and by["recipe"]["over_budget"]
    assert by["packing"]["error"] == "RuntimeError: kernel exploded"
    assert "Traceback" in by["packing"]["traceback"]
    assert (
        by["gradcache"]["seen"] == ["packing", "pallas", "recipe"]
        and not by["gradcache"]["over_budget"]
    )
    assert by["host"]["reason"] == (
        "wall-clock guard: 84.0 s left of the suite's 100 s, the part's budget is 90 s"
    )
    assert by["pallas"]["reason"].startswith("model.attention")
    for r in records:  # every part's JSON, as it ended
        assert json.loads((tmp_path / f"{r['part']}.json").read_text())["status"] == r["status"]


def test_judge_marks_targets():
    def rec(part, status="ok", **summary):
        return {"part": part, "status": status, "summary": summary}

    records = [
        rec("recipe", samples_per_s=2000.0, mfu=0.35, jax_over_twin=1.6),
        rec("pallas", samples_per_s=2500.0, mfu=0.44, jax_over_twin=1.9),
        rec("packing", "failed", packed_clips_per_s=9000.0),  # a failed part measures nothing
        rec("host", per_core_samples_per_s=4999.0),
    ]
    t = {x["name"]: x for x in suite.judge(records)}
    # The recipe's numbers: the faster of the recipe and its Pallas variant.
    assert (t["recipe_samples_per_s"]["value"], t["recipe_samples_per_s"]["status"]) == (
        2500.0, "met",
    )  # fmt: skip
    assert t["recipe_samples_per_s"]["from_part"] == "pallas"
    assert (t["recipe_mfu"]["status"], t["recipe_over_twin"]["status"]) == ("met", "met")
    assert t["packed_clips_per_s"]["status"] == "unmeasured"
    assert t["gradcache_step_s"]["status"] == "unmeasured"
    assert t["host_clips_per_s_per_core"]["status"] == "not met"
    assert t["host_clips_per_s_per_core"]["target"] == ">= 5000"


def test_suite_usage_errors(tmp_path):
    r = _run("suite", f"--out={tmp_path}", "--parts=recipe,bogus")  # one line, exit 2
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parts" in lines[0]
    with pytest.raises(SystemExit):
        cli.main(["suite"])  # --out is required
    for args, needle in (
        (["--part_budget=recipe"], "--part_budget"),
        (["--budget_s=0"], "--budget_s"),
        ([f"--out={tmp_path / 'x.json'}"], "not a folder"),
    ):
        (tmp_path / "x.json").write_text("{}")
        with pytest.raises(UserError, match=needle):
            cli.main(["suite", f"--out={tmp_path / 'o'}", *args])
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_part_budget_override():
    from types import SimpleNamespace

    args = SimpleNamespace(smoke=False, part_budget=["host=12.5"])
    assert suite._budgets(args)["host"] == 12.5
    with pytest.raises(UserError, match="not a number"):
        suite._budgets(SimpleNamespace(smoke=True, part_budget=["host=soon"]))
