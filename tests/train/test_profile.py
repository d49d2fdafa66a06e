"""config.profile_steps: a JAX profiler trace of the chosen training steps in WORKDIR/profile/."""

from __future__ import annotations

import gzip
import json

import pytest

from signclip_jax.errors import UserError
from signclip_jax.train import loop as train_lib
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "spec, steps", [("", None), ("100:103", (100, 103)), (" 7 ", (7, 8)), ("1:2", (1, 2))]
)
def test_parse_profile_steps(spec, steps):
    assert train_lib.parse_profile_steps(spec) == steps


@pytest.mark.parametrize("spec", ["3:3", "0:2", "5:4", "a:b", "1:", ":4", "-1"])
def test_bad_profile_steps_are_one_clear_error(spec):
    with pytest.raises(UserError, match=r"profile_steps=.*START:STOP"):
        train_lib.parse_profile_steps(spec)


def test_bad_profile_steps_fail_before_training(tmp_path):
    config = tiny_config(tmp_path / "synthetic", total_steps=2)
    config.profile_steps = "4:2"
    with pytest.raises(UserError, match="profile_steps"):
        train_lib.train(config, str(tmp_path / "w"))
    assert not (tmp_path / "synthetic").exists()  # no data generated, nothing trained


@pytest.mark.slow  # a 3-step run: ~40 s of CPU
def test_profiled_run_writes_a_trace_of_the_chosen_steps(tmp_path):
    config = tiny_config(tmp_path / "synthetic", total_steps=3)
    config.profile_steps = "2:4"
    config.eval_every_steps = 100
    config.data.workers = 0
    config.data.length_buckets = ()  # one compiled shape: the traced steps only run
    workdir = tmp_path / "w"
    train_lib.train(config, str(workdir))
    traces = sorted((workdir / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    xplanes = sorted((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and len(xplanes) == 1, sorted(workdir.rglob("*"))
    events = json.load(gzip.open(traces[0]))["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [2, 3]  # the chosen steps, each once
    # The trace holds device work too, not only the host's annotations.
    assert sum(e.get("ph") == "X" for e in events) > 100
