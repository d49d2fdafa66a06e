"""End-to-end training on generated data: files written, resume after a stop equals an
uninterrupted run bit for bit (CPU), bad configs are clear errors.

A tiny random BERT (2 layers, width 32) replaces the MiniLM weights to keep compiles short;
the tokenizer is still the bundled MiniLM one. The mesh spans the 8 host CPU devices.
"""

import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax import run as run_lib
from signclip_jax.data import pipeline
from signclip_jax.errors import UserError
from signclip_jax.evaluation import cli as evaluate_cli
from signclip_jax.train import loop as train_lib
from signclip_jax.train import preemption, sharding
from tests.helpers import ROOT, StopAfter, load_config, tiny_config

pytestmark = pytest.mark.slow


def _params(workdir: Path, step: int):
    step_dir = workdir / "checkpoints" / str(step) / "params"
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(step_dir)
    return jax.tree.map(np.asarray, tree)


def _metrics(workdir: Path):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def straight_run(tiny_workdir):
    """An uninterrupted 4-step run on the 8-device mesh (the shared `tiny_workdir`, same
    config and same generated data as `synthetic_dir`): (workdir, last train metrics)."""
    last = [r for r in _metrics(tiny_workdir) if r.get("split") == "train"][-1]
    return tiny_workdir, last


def test_train_writes_workdir_and_resumes_exactly(
    tmp_path, synthetic_dir, straight_run, monkeypatch
):
    straight, last = straight_run
    assert last["step"] == 4 and np.isfinite(last["loss"])

    for name in ("config.json", "bert_config.json", "model_config.json", "metrics.jsonl"):
        assert (straight / name).exists(), name
    assert (straight / "tokenizer" / "tokenizer.json").exists()
    rows = _metrics(straight)
    assert all("step" in r for r in rows)
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [2, 4] and all("loss" in r for r in train_rows)
    val = [r for r in rows if r.get("split") == "val"]
    # The default config.evals: the validation of old, key for key (and no other evaluator).
    assert {r.get("split") for r in rows} == {"train", "val"}
    assert [r["step"] for r in val] == [4] and list(val[-1]) == ["step", "split", *VAL_KEYS]
    assert np.isfinite([val[-1][k] for k in VAL_KEYS]).all()
    meta = ckpt_lib.Checkpointer(straight).read_meta(4)["metrics"]
    assert meta == pytest.approx({f"val/{k}": val[-1][k] for k in VAL_KEYS})

    # Stopped by a signal after 2 steps, then resumed: same parameters, bit for bit.
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(preemption, "PreemptionGuard", lambda: StopAfter(1))
    first = train_lib.train(tiny_config(synthetic_dir), str(resumed))
    assert first["step"] == 2
    assert ckpt_lib.Checkpointer(resumed).all_steps() == [2]
    monkeypatch.undo()
    train_lib.train(tiny_config(synthetic_dir), str(resumed))

    a, b = _params(straight, 4), _params(resumed, 4)
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    loss_a = [r["loss"] for r in _metrics(straight) if r.get("split") == "train" and r["step"] == 4]
    loss_b = [r["loss"] for r in _metrics(resumed) if r.get("split") == "train" and r["step"] == 4]
    assert loss_a == loss_b


VAL_KEYS = [
    "loss",
    *(f"t2v/{m}@{k}" for k in (1, 5, 10) for m in ("R", "P")),
    "t2v/MedianR",
    "t2v/MeanR",
    *(f"v2t/R@{k}" for k in (1, 5, 10)),
    "v2t/MedianR",
    "v2t/MeanR",
    "examples",
]


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    else:
        out[prefix] = tree
    return out


def test_bfloat16_training_feeds_bfloat16_poses(tmp_path, synthetic_dir, monkeypatch):
    # data.pose_dtype "auto" with model.dtype bfloat16: train and validation batches carry
    # bf16 poses (half the bytes), and the run trains (finite loss, validation metrics).
    fed = []
    shard_batch = sharding.shard_batch

    def spy(batch, *args, **kwargs):
        fed.append(np.asarray(batch["pose"]).dtype.name)
        return shard_batch(batch, *args, **kwargs)

    monkeypatch.setattr(sharding, "shard_batch", spy)
    config = tiny_config(synthetic_dir, total_steps=2)
    config.model.dtype = "bfloat16"
    config.eval_every_steps = 2
    config.data.workers = 0
    train_lib.train(config, str(tmp_path / "w"))
    # 2 train steps, >= 1 val batch. Train batches carry the stored float16 points (the step
    # augments them on the device: data.augment_on_device); val batches the bf16 features.
    assert len(fed) >= 3 and set(fed) == {"float16", "bfloat16"}
    rows = _metrics(tmp_path / "w")
    assert np.isfinite([r["loss"] for r in rows if r.get("split") == "train"]).all()
    assert any(r.get("split") == "val" for r in rows)


def test_zero_shot_while_training_is_the_evaluate_commands_zero_shot(tmp_path, synthetic_dir):
    # Opt-in evaluator: config.evals.zeroshot (off by default). It logs under its own name,
    # joins the checkpoint metrics, and gives the numbers of `evaluate --tasks=zeroshot`.
    config = tiny_config(synthetic_dir, total_steps=2)
    config.eval_every_steps = 2
    config.data.workers = 0
    config.evals.zeroshot.every_steps = 0  # as often as val
    workdir = tmp_path / "w"
    train_lib.train(config, str(workdir))
    rows = _metrics(workdir)
    zs = [r for r in rows if r.get("split") == "zeroshot"]
    val = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in zs] == [r["step"] for r in val] == [2]
    zs, val = zs[0], val[0]
    assert set(zs) == {"step", "split", "top1", "top5", "top10", "MedianR", "MeanR",
                       "classes", "examples"}  # fmt: skip
    assert zs["examples"] == val["examples"] and zs["classes"] >= 2
    for k in (1, 5, 10):  # one language, the split's own classes: zero-shot top-k is V2T R@k
        assert zs[f"top{k}"] == pytest.approx(val[f"v2t/R@{k}"])
    meta = ckpt_lib.Checkpointer(workdir).read_meta(2)["metrics"]
    assert meta["zeroshot/top1"] == zs["top1"] and meta["val/loss"] == val["loss"]

    opts = evaluate_cli.Options(
        workdir=str(workdir), split="val", tasks=("zeroshot",), out=str(tmp_path / "eval"),
        batch_size=8, plot=False, save_embeddings=False,
    )  # fmt: skip
    command = evaluate_cli.run_evaluation(opts)["zeroshot"]
    for k in ("top1", "top5", "top10", "MedianR", "MeanR", "classes", "examples"):
        assert command[k] == pytest.approx(zs[k]), k


def test_batch_not_divisible_is_a_clear_error(tmp_path, synthetic_dir):
    config = tiny_config(synthetic_dir)
    config.batch_size = 12  # 8 devices
    with pytest.raises(UserError, match="batch_size 12"):
        train_lib.train(config, str(tmp_path / "w"))


def _run_cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "signclip_jax.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("hub_model", ["bert-base-cased", "no-such-org/no-such-bert"])
def test_cli_hub_model_offline_is_one_clear_error(tmp_path, hub_model):
    result = _run_cli(
        "--config=configs/spreadthesign.py:runlocal",
        f"--workdir={tmp_path / 'w'}",
        f"--config.model.text_model={hub_model}",
    )
    assert result.returncode == 2
    assert hub_model in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_explains_and_succeeds():
    result = _run_cli("--help")
    assert result.returncode == 0
    assert "--workdir" in result.stdout and "Trains SignCLIP" in result.stdout


def test_cli_requires_workdir():
    result = _run_cli("--config=configs/demo.py")
    assert result.returncode == 2 and "--workdir" in result.stderr


def test_cli_unwritable_workdir_is_one_line_before_any_work(tmp_path):
    """An existing file, a path under a file, and /proc (unwritable for root too, as CI runs)."""
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    workdirs = [a_file, a_file / "run"]
    if Path("/proc/self").exists():
        workdirs.append(Path("/proc/signclip-run"))
    for workdir in workdirs:
        result = _run_cli("--config=configs/demo.py", f"--workdir={workdir}")
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2, result.stderr[-2000:]
        assert last.startswith(f"error: --workdir: cannot write in {workdir} ("), last
        assert "Traceback" not in result.stderr
    assert a_file.read_text() == "x"


_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={devices}"
from absl import flags
flags.FLAGS.mark_as_parsed()
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers import tiny_config
from signclip_jax.train import loop as train
config = tiny_config(Path({synthetic!r}))
if {no_dropout}:
    config.model.hidden_dropout = 0.0
    config.model.attention_dropout = 0.0
config.data.packing = {packing}
config.data.length_buckets = {buckets}
{count_gathers}
train.train(config, {workdir!r})
{report_gathers}
"""

# Counts the host all-gathers the training loop makes (caller in the package, not under the
# evaluation's embedding functions, which gather every eval batch's rows by design).
_COUNT_GATHERS = """
import traceback
from jax.experimental import multihost_utils
_gather, _loop_gathers = multihost_utils.process_allgather, []
def _counting(*args, **kwargs):
    stack = traceback.extract_stack()[:-1]
    evaluation = {"embed_batch", "embed_texts", "_gather_rows", "_gather_texts"}
    if "signclip_jax" in stack[-1].filename and not evaluation & {f.name for f in stack}:
        _loop_gathers.append(stack[-1].name)
    return _gather(*args, **kwargs)
multihost_utils.process_allgather = _counting
"""
_REPORT_GATHERS = 'print("LOOP_GATHERS", len(_loop_gathers), _loop_gathers, flush=True)'


def _run_code(
    synthetic_dir,
    workdir,
    *,
    devices,
    no_dropout=False,
    count_gathers=False,
    packing=False,
    buckets=(),
):
    return _RUN.format(
        root=str(ROOT), synthetic=str(synthetic_dir), workdir=str(workdir), devices=devices,
        no_dropout=no_dropout, packing=packing, buckets=buckets,
        count_gathers=_COUNT_GATHERS if count_gathers else "",
        report_gathers=_REPORT_GATHERS if count_gathers else "",
    )  # fmt: skip


# Clips of 40-90 frames: the processes' length buckets differ from batch to batch.
_BUCKETS = (48, 64, 80)


def _logged_losses(workdir):
    return [(r["step"], r["loss"]) for r in _metrics(workdir) if r.get("split") in ("train", "val")]


def _subprocess_env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("XLA_FLAGS", None)
    return env


def test_one_device_matches_eight_devices(tmp_path, synthetic_dir, straight_run):
    """Same seed, same data: the loss trajectory on 1 device equals the 8-device one."""

    eight, _ = straight_run
    one = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-c", _run_code(synthetic_dir, one, devices=1)],
        cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _logged_losses(eight), _logged_losses(one)
    assert [s for s, _ in a] == [s for s, _ in b]
    diff = np.abs(np.array([v for _, v in a]) - np.array([v for _, v in b]))
    print(f"1 vs 8 devices, max |d loss| over {len(a)} logged losses: {diff.max():.3g}")
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5, atol=1e-5)


def test_two_processes_match_one_process(tmp_path, synthetic_dir):
    """2 processes x 4 CPU devices on loopback (gloo), packed (data.packing) == 1 process on
    1 device, padded (1 and 8 devices agree: the test above).

    Dropout is off: each process reads every other example of the shuffled stream, so the
    global batch holds the same examples in another row order; the loss does not depend on
    row order, but dropout masks do (and packing lays tokens out differently). The processes'
    length buckets, packed row counts and caption lengths differ (data.length_buckets with
    clips of 40-90 frames), and the loop agrees on them and on stopping with one host
    all-gather at start-up, not one per step (it made two per step before).
    """

    single = tmp_path / "single"
    result = subprocess.run(
        [sys.executable, "-c",
         _run_code(synthetic_dir, single, devices=1, no_dropout=True, buckets=_BUCKETS)],
        cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    multi = tmp_path / "multi"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _run_code(
                    synthetic_dir,
                    multi,
                    devices=4,
                    no_dropout=True,
                    count_gathers=True,
                    packing=True,
                    buckets=_BUCKETS,
                ),
            ],
            cwd=ROOT,
            env=_subprocess_env(
                SIGNCLIP_COORDINATOR=f"127.0.0.1:{port}",
                SIGNCLIP_NUM_PROCESSES="2",
                SIGNCLIP_PROCESS_ID=str(pid),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        counts = [line for line in out.splitlines() if line.startswith("LOOP_GATHERS")]
        assert counts == ["LOOP_GATHERS 1 ['_allgather_max']"], out[-3000:]
    a, b = _logged_losses(single), _logged_losses(multi)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 3
    diff = np.abs(np.array([v for _, v in a]) - np.array([v for _, v in b]))
    print(f"2 processes vs 1, max |d loss| over {len(a)} logged losses: {diff.max():.3g}")
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5, atol=1e-5)
    assert ckpt_lib.Checkpointer(multi).all_steps() == [2, 4]


def _manifest_from(workdir: Path, path: Path) -> Path:
    """A manifest CSV (pose, text, split) over the synthetic clips a tiny run trained on."""

    config = json.loads((workdir / "config.json").read_text())
    synthetic = Path(config["data"]["synthetic_dir"])
    poses = sorted((synthetic / "poses").glob("*.pose"))
    rows = list(csv.DictReader(next(synthetic.glob("*.csv")).open()))
    text_of = {r["pose"]: r["text"] for r in rows if r["language"] == "en"}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["pose", "text", "split"])
        for i, p in enumerate(poses):
            # Upper case plus a digit: the asl_citizen gloss clean-up undoes both.
            writer.writerow(
                [str(p), f"{text_of[p.name].upper()}{i % 3}", "val" if i % 4 == 0 else "train"]
            )
    return path


def test_finetune_from_a_workdir(tmp_path, tiny_workdir):
    """configs/finetune_islr.py: architecture, tokenizer and weights come from init_from."""
    config = load_config("finetune_islr", "dataset=manifest,batch_size=8")
    config.compilation_cache_dir = ""  # stay out of ~/.cache (as tests/helpers.tiny_config)
    config.init_from = str(tiny_workdir)
    config.total_steps = 2
    config.eval_every_steps = 2
    config.data.manifest = str(_manifest_from(tiny_workdir, tmp_path / "manifest.csv"))
    config.data.workers = 0
    config.data.gloss_style = "asl_citizen"
    config.loss.name = "clip"  # the source used signclip: its loss scalars start fresh
    config.optimizer.lr = 0.0  # so the fine-tuned weights must equal the source's

    with pytest.raises(UserError, match="max_frames=256 exceeds"):
        train_lib.train(config, str(tmp_path / "too_long"))
    config.data.max_frames = 96
    out = tmp_path / "ft"
    train_lib.train(config, str(out))

    source_spec = json.loads((tiny_workdir / "model_config.json").read_text())
    assert json.loads((out / "model_config.json").read_text()) == source_spec
    assert source_spec["video_layers"] != config.model.video_layers  # taken from the source
    a, b = _flatten(_params(tiny_workdir, 4)["model"]), _flatten(_params(out, 2)["model"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert float(_params(out, 2)["loss"]["logit_scale"]) == pytest.approx(np.log(1 / 0.07))
    val = [r for r in _metrics(out) if r.get("split") == "val"]
    assert val and np.isfinite(val[-1]["loss"])


def test_finetune_from_a_checkpoint_step_and_config_errors(tmp_path, tiny_workdir):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_config("finetune_islr", "dataset=nope")
    config = load_config("finetune_islr", "dataset=manifest,batch_size=8")
    config.compilation_cache_dir = ""  # stay out of ~/.cache (as tests/helpers.tiny_config)
    config.init_from = str(tmp_path / "missing")
    config.data.manifest = str(_manifest_from(tiny_workdir, tmp_path / "manifest.csv"))
    with pytest.raises(UserError, match="no checkpoints"):
        train_lib.train(config, str(tmp_path / "ft"))
    # A step directory works as init_from too (its workdir supplies config and tokenizer).
    run_dir, step_dir = run_lib.resolve_run_dir(tiny_workdir / "checkpoints" / "2")
    assert run_dir == tiny_workdir and step_dir.name == "2"


def test_compilation_cache_is_written_even_after_a_first_compile(tmp_path):
    # config.compilation_cache_dir: "~" expands, and enabling it after this process has
    # compiled something still takes effect (JAX otherwise decides once, at the first compile).
    code = (
        "import jax, jax.numpy as jnp\n"
        "from signclip_jax.train.monitor import enable_compilation_cache\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.jit(lambda x: x + 1)(jnp.ones(3))\n"
        "print(enable_compilation_cache('~/xla-cache'))\n"
        "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3))\n"
        # A second directory (bench after a training run in one process) is used from then on.
        "enable_compilation_cache('~/second-cache')\n"
        "jax.jit(lambda x: x * 3 - 1)(jnp.ones(4))\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp_path / "xla-cache")
    first = sorted(p.name for p in (tmp_path / "xla-cache").iterdir())
    second = sorted(p.name for p in (tmp_path / "second-cache").iterdir())
    assert first and second and not set(first) & set(second)


# ---------------------------------------------------------------------------------------------
# The loop's input side (`_Inputs`): two processes simulated by two threads that meet in a
# fake step, as the real step's all-reduce makes them meet.


class _FakeIterator:
    """Batches [rows, lengths[i], 3]; its state and counters count the batches yielded."""

    def __init__(self, lengths, rows=2, start=0):
        self.lengths, self.rows, self.n = lengths, rows, start

    def __next__(self):
        length = self.lengths[self.n]
        self.n += 1
        rows = self.rows
        return {
            "pose": np.full((rows, length, 3), self.n, np.float32),
            "pose_mask": np.ones((rows, length), bool),
            "text_ids": np.zeros((rows, 4), np.int32),
            "text_mask": np.ones((rows, 4), bool),
            "index": np.arange(rows),
        }

    def get_state(self):
        return {"n": self.n}

    def stats(self):
        return pipeline.InputStats(examined=self.n * self.rows, skipped=0, examples=[])


class _Meet:
    """Where the simulated processes exchange values: each gets the elementwise maximum."""

    def __init__(self, parties=2):
        self.barrier = threading.Barrier(parties, timeout=30)
        self.values = {}

    def __call__(self, pid, value):
        self.values[pid] = np.asarray(value)
        self.barrier.wait()
        out = np.max(np.stack(list(self.values.values())), axis=0)
        self.barrier.wait()
        return out


class _Read:
    """A step's agreement as the host reads it: records when it is read (np.asarray)."""

    def __init__(self, value, step, events):
        self.value, self.step, self.events = value, step, events

    def __array__(self, dtype=None, copy=None):
        self.events.append(("read", self.step))
        return self.value


def _fake_run(pid, lengths, *, processes, meet=None, total=8, start=0, stop_at=None):
    """The train loop's input side over a fake step; returns what each step saw."""
    gathers, events, seen = [], [], {}
    it = _FakeIterator(lengths, start=start)

    def allgather_max(values):
        gathers.append(values)
        return meet(pid, values)

    inputs = train_lib._Inputs(
        it, dict, first=start + 1, last=total, process_count=processes,
        allgather_max=allgather_max,
    )  # fmt: skip
    step = start
    while step < total:
        requested = stop_at is not None and step + 1 >= stop_at
        batch = inputs.batch(step + 1, stop_requested=requested)
        events.append(("dispatch", step + 1))
        metrics = {"loss": 0.0}
        if "agree" in batch:
            agreed = meet(pid, batch["agree"].max(axis=0))
            metrics["agree"] = _Read(agreed, step + 1, events)
        step += 1
        stop = inputs.after_step(step, metrics, stop_requested=requested)
        assert "agree" not in metrics  # never logged
        seen[step] = (batch["pose"].shape[1], inputs.consumed.state, inputs.consumed.stats)
        if stop:
            break
    return {"seen": seen, "gathers": gathers, "events": events, "iterator_at": it.n}


def _two_processes(lengths, **kwargs):
    meet = _Meet()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(_fake_run, pid, lengths[pid], processes=2, meet=meet, **kwargs)
            for pid in range(2)
        ]
        return [r.result(timeout=60) for r in runs]


_LENGTHS = [[48, 96, 64, 48, 80, 48, 64, 96, 48, 48], [64, 48, 64, 80, 48, 48, 96, 64, 48, 48]]


def test_processes_agree_on_lengths_without_a_collective_per_step():
    runs = _two_processes(_LENGTHS)
    common = [max(a, b) for a, b in zip(*_LENGTHS)]
    for pid, run in enumerate(runs):
        # Every step pads to the longest of both processes' buckets (what the per-step
        # all-gather gave), but only one host all-gather ran: at start-up, for steps 1-2.
        assert [run["seen"][k][0] for k in range(1, 9)] == common[:8]
        assert len(run["gathers"]) == 1 and list(run["gathers"][0]) == _LENGTHS[pid][:2]
        # Step k-1's agreement is read only once step k is queued: the device never idles.
        for kind, k in run["events"]:
            if kind == "read":
                assert run["events"].index(("dispatch", k + 1)) < run["events"].index((kind, k))
        # Logs and checkpoints record the iterator as of each step's batch, not as of the
        # batches fetched ahead.
        assert [run["seen"][k][1] for k in range(1, 9)] == [{"n": k} for k in range(1, 9)]
        assert run["seen"][8][2]["data_examined"] == 16.0


def test_a_stop_on_one_process_stops_both_at_the_same_step_and_resumes_exactly():
    # Process 1 polls a signal before step 3; both stop after step 4, in agreement.
    meet = _Meet()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(
                _fake_run, pid, _LENGTHS[pid], processes=2, meet=meet,
                stop_at=3 if pid == 1 else None,
            )
            for pid in range(2)
        ]  # fmt: skip
        runs = [r.result(timeout=60) for r in runs]
    for run in runs:
        assert max(run["seen"]) == 4 and run["seen"][4][1] == {"n": 4}
        assert run["iterator_at"] == 6  # fetched ahead; the checkpoint records n=4
    # Resumed from that checkpoint (iterator at 4): steps 5-8 as in an uninterrupted run.
    straight, resumed = _two_processes(_LENGTHS), _two_processes(_LENGTHS, start=4)
    for a, b in zip(straight, resumed):
        assert {k: a["seen"][k] for k in range(5, 9)} == b["seen"]
        assert len(b["gathers"]) == 1


def test_one_process_feeds_its_own_lengths_and_stops_at_once():
    run = _fake_run(0, _LENGTHS[0], processes=1, stop_at=3)
    assert run["gathers"] == [] and not any(kind == "read" for kind, _ in run["events"])
    assert {k: v[0] for k, v in run["seen"].items()} == {1: 48, 2: 96, 3: 64}
    assert run["seen"][3][1] == {"n": 3} and run["iterator_at"] == 3  # nothing fetched past it
