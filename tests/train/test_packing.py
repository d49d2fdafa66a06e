"""Clip packing in the trainer (`data.packing`, issue 16): the host sends the padded clips and
the slots of packed rows (train/step.py InputLayout, clip_packing.device_slots), the step packs
them after its augmentation (clip_packing.pack_on_device) and pools per batch shard. Training
packed gives the losses of training padded (dropout off: masks are drawn per token of another
layout), on the 8-device CPU mesh with GradCache microbatches and clips that the device's frame
dropout shortens; several processes agree on rows and caption length as on padded lengths.
"""

import concurrent.futures
import json
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signclip_jax.data import clip_packing, pipeline
from signclip_jax.errors import UserError
from signclip_jax.model.signclip import segment_mean
from signclip_jax.train import loop as train_lib
from signclip_jax.train import preemption, sharding
from signclip_jax.train import step as step_lib
from tests.helpers import StopAfter, load_config, tiny_config
from tests.model.test_prefix_layout import mixed_batch
from tests.model.test_signclip import tiny_model

LENGTHS = [32, 9, 1, 0, 31, 5, 20, 7, 14, 3, 18, 26]  # 12 clips: 2 shards x 2 microbatches x 3
TEXT_LENGTHS = [9, 3, 2, 8, 1, 5, 6, 7, 9, 4, 2, 3]
PACK = dict(row_len=40, max_frames=32, shards=2, microbatches=2, row_multiple=4)


def _padded(seed=0):
    pose, mask, ids, text_mask = mixed_batch(
        np.random.default_rng(seed), 32, LENGTHS, 15, TEXT_LENGTHS, 120
    )
    return {"pose": pose, "pose_mask": mask, "text_ids": ids, "text_mask": text_mask}


def test_device_packing_builds_the_host_packers_rows():
    """Slots from the host + the gather in the step == clip_packing.pack_batch's rows."""
    batch = _padded()
    frames = clip_packing.frame_counts(batch["pose_mask"])
    slots = clip_packing.device_slots(frames, **PACK)
    on_device = clip_packing.pack_on_device(
        {**batch, **slots}, max_frames=PACK["max_frames"], shards=PACK["shards"]
    )
    host = clip_packing.pack_batch(batch, text_multiple=None, **PACK)
    assert set(on_device) == set(host)
    for key, value in host.items():
        np.testing.assert_array_equal(np.asarray(on_device[key]), value, err_msg=key)
    # Every row of shard d holds only shard d's clips (the gather never crosses devices).
    rows, per_shard = slots["packed_clip"].shape[0] // 2, len(LENGTHS) // 2
    assert (slots["packed_clip"] < per_shard).all()
    assert (host["packed_segments"][:rows] > 0).sum() == (frames[:per_shard] + 2).sum()


@nnx.jit(static_argnames="shards")
def _forward(model, batch, shards=1):
    return model(batch, shards=shards)


def test_clips_shortened_on_the_device_embed_as_unpacked():
    """Frame dropout shortens clips after the host sized their slots: the slots past a
    clip's new [SEP] become padding, and the embeddings (pooled per shard) equal the padded
    model's on the shortened clips, fp32 <= 1e-5."""
    model = tiny_model(seed=3, projection="linear_l2")  # max_frames 32
    batch = _padded(1)
    one_microbatch = {**PACK, "microbatches": 1}
    slots = clip_packing.device_slots(
        clip_packing.frame_counts(batch["pose_mask"]), **one_microbatch
    )
    shorter = np.maximum(clip_packing.frame_counts(batch["pose_mask"]) - [5, 0, 1] * 4, 0)
    batch["pose_mask"] = np.arange(32)[None] < shorter[:, None]
    packed = clip_packing.pack_on_device({**batch, **slots}, max_frames=32, shards=2)
    assert int((np.asarray(packed["packed_segments"]) > 0).sum()) == int((shorter + 2).sum())
    with jax.default_matmul_precision("float32"):
        pose, text = _forward(model, batch)
        ppose, ptext = _forward(model, packed, shards=2)
    assert float(jnp.abs(ppose - pose).max()) <= 1e-5
    assert float(jnp.abs(ptext - text).max()) <= 1e-5


def test_input_layout_sizes_and_inputs():
    config = load_config("demo", "tiny")
    config.data.packing = True
    config.microbatches = 2
    layout = step_lib.InputLayout.from_config(config, max_frames=32, local_shards=2)
    assert (layout.row_len, layout.row_multiple, layout.text_multiple) == (34, 8, 8)
    batch = _padded()
    batch["aug_frames"] = np.array([0, 12, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0], np.int32)
    # Resampled counts replace the read ones, capped at max_frames.
    assert list(layout.clip_frames(batch)) == [32, 12, 1, 0, 32, 5, 20, 7, 14, 3, 18, 26]
    length, rows, text_len = layout.sizes(batch)
    assert (length, text_len) == (32, 15) and rows % 8 == 0  # 9 tokens -> 16, at most 15
    inputs = layout.inputs(batch, (40, rows + 8, 16))  # agreed sizes larger than its own
    assert inputs["pose"].shape[1] == 40 and inputs["packed_clip"].shape == (rows + 8, 34)
    assert inputs["text_ids"].shape == (12, 16)
    config.data.packing_row_len = 20
    with pytest.raises(UserError, match="packing_row_len=20 is shorter than one full clip"):
        step_lib.InputLayout.from_config(config, max_frames=32, local_shards=2)


def test_processes_agree_on_rows_and_caption_length():
    """Two simulated processes (threads) feeding packed inputs: every step's rows and caption
    length are the larger of the two processes' own, with one host all-gather at start-up."""
    layout = step_lib.InputLayout(packing=True, max_frames=32, row_len=34, text_multiple=4)
    frames = [[[30, 30, 2, 2], [5, 5, 5, 5], [30, 30, 30, 30]], [[5, 5, 5, 5], [30, 30, 30, 30],
              [2, 2, 2, 2]]]  # fmt: skip
    texts = [[3, 9, 3], [9, 3, 3]]
    barrier, shared = threading.Barrier(2, timeout=30), {}

    def meet(pid, value):
        shared[pid] = np.asarray(value)
        barrier.wait()
        out = np.max(np.stack([shared[0], shared[1]]), axis=0)
        barrier.wait()
        return out

    class Batches:
        def __init__(self, pid):
            self.pid, self.n = pid, 0

        def __next__(self):
            f, t = np.array(frames[self.pid][self.n]), texts[self.pid][self.n]
            self.n += 1
            return {
                "pose": np.ones((4, 32, 3), np.float32),
                "pose_mask": np.arange(32)[None] < f[:, None],
                "text_ids": np.ones((4, 12), np.int32),
                "text_mask": np.arange(12)[None] < t,
            }

        def get_state(self):
            return {"n": self.n}

        def stats(self):
            return pipeline.InputStats(examined=4 * self.n, skipped=0, examples=[])

    def run(pid):
        gathers, seen = [], []
        inputs = train_lib._Inputs(
            Batches(pid), dict, first=1, last=3, process_count=2, layout=layout,
            allgather_max=lambda v: gathers.append(v) or meet(pid, v),
        )  # fmt: skip
        for step in range(1, 4):
            batch = inputs.batch(step)
            seen.append((batch["packed_clip"].shape[0], batch["text_ids"].shape[1]))
            metrics = {"agree": meet(pid, batch["agree"].max(axis=0))}
            inputs.after_step(step, metrics, stop_requested=False)
        return seen, gathers

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        (a, gathers_a), (b, gathers_b) = pool.map(run, [0, 1])
    own = [[tuple(layout.sizes(b)[1:]) for b in _all(Batches(pid), 3)] for pid in (0, 1)]
    # Own (rows, caption): p0 (3, 4), (1, 12), (4, 4); p1 (1, 12), (4, 4), (1, 4).
    assert own == [[(3, 4), (1, 12), (4, 4)], [(1, 12), (4, 4), (1, 4)]]
    assert a == b == [(3, 12), (4, 12), (4, 4)]
    assert len(gathers_a) == len(gathers_b) == 1


def _all(iterator, n):
    return [next(iterator) for _ in range(n)]


def _train_losses(tmp_path, synthetic, name, *, packing, augment_on_device, monkeypatch=None):
    config = tiny_config(synthetic, total_steps=2)
    # 8 shards x 2 microbatches, 2 clips per (shard, microbatch); rows of 2 full clips.
    config.batch_size, config.microbatches = 32, 2
    config.data.packing_row_len = 2 * (config.data.max_frames + 2)
    config.model.hidden_dropout = config.model.attention_dropout = 0.0
    config.data.augment.frame_dropout_rate = 0.3
    config.data.augment.flip_prob = 0.5
    config.data.augment_on_device = augment_on_device
    config.data.packing = packing
    config.log_every_steps = 1
    workdir = tmp_path / name
    if monkeypatch is not None:  # stopped after step 1, then resumed
        with monkeypatch.context() as patch:
            patch.setattr(preemption, "PreemptionGuard", lambda: StopAfter(0))
            assert train_lib.train(config, str(workdir))["step"] == 1
    train_lib.train(config, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in rows]


@pytest.mark.slow
def test_packed_training_gives_the_padded_losses(tmp_path, monkeypatch):
    """Device augmentation (the default) with frame dropout and flips, 8 shards x 2
    microbatches: 2 steps packed, stopped after the first and resumed, give the uninterrupted
    padded run's losses and gradient norms (packing is a function of each batch, and the
    batches resume exactly)."""
    synthetic = tmp_path / "synthetic"
    padded = _train_losses(tmp_path, synthetic, "padded", packing=False, augment_on_device=True)
    traced, pack = [], clip_packing.pack_on_device

    def spy(batch, **kwargs):
        out = pack(batch, **kwargs)
        traced.append((batch["pose"].shape[0], out["packed_pose"].shape[0]))
        return out

    monkeypatch.setattr(clip_packing, "pack_on_device", spy)
    packed = _train_losses(tmp_path, synthetic, "packed", packing=True, augment_on_device=True,
                           monkeypatch=monkeypatch)  # fmt: skip
    # The packed run packed: 32 clips in fewer rows (16: one per shard and microbatch).
    assert traced and all(rows < clips for clips, rows in traced), traced
    assert [r[0] for r in padded] == [r[0] for r in packed] and len(padded) >= 3
    for a, b in zip(padded, packed):
        values = [[x for x in row[1:] if x is not None] for row in (a, b)]
        np.testing.assert_allclose(*values, rtol=1e-5, atol=1e-5)


def test_packing_and_pooling_stay_on_each_device():
    """On the 8-device mesh the step's gather into rows and the per-clip pooling compile to
    no cross-device collective (pooled per shard); pooled as one block they all-gather."""
    mesh = sharding.make_mesh((8,), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 33, 64)
    slots = clip_packing.device_slots(frames, row_len=34, max_frames=32, shards=8)
    batch = {
        "pose": rng.normal(size=(64, 32, 4)).astype(np.float32),
        "pose_mask": np.arange(32)[None] < frames[:, None],
        **slots,
    }
    batch = jax.device_put(batch, shard)

    def collectives(shards):
        def pooled(b):
            p = clip_packing.pack_on_device(b, max_frames=32, shards=shards)
            real = p["packed_segments"] > 0
            return segment_mean(
                p["packed_pose"], p["packed_segments"], real, p["clip_row"], p["clip_segment"],
                shards,
            )  # fmt: skip

        hlo = jax.jit(pooled, out_shardings=shard).lower(batch).compile().as_text()
        return len(re.findall(r"(all-gather|all-to-all|all-reduce|collective-permute)\(", hlo))

    assert collectives(8) == 0
    assert collectives(1) > 0  # the check can fail: one block needs other devices' rows
