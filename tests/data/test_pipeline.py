"""grain input pipeline: batch layout, buckets, per-process shards, exact resume with 0 and 2
workers, augmentation only in training, bad data skipped and counted, eval padding."""

from __future__ import annotations

import csv
import itertools
import json
import weakref

import ml_collections
import numpy as np
import pytest

from signclip_jax.data import pipeline, sources
from signclip_jax.data import pose as pose_lib
from signclip_jax.data.synthetic import write_synthetic_dataset
from signclip_jax.data.text import encode_text, load_tokenizer, render_prompt
from signclip_jax.errors import UserError
from tests.data.malformed import write_malformed_poses


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    csv_path = write_synthetic_dataset(out, num_signs=5, signers=6, seed=2)
    return sources.SpreadthesignSource(csv_path, out / "poses", split="all")


def _config(**data) -> ml_collections.ConfigDict:
    base = {
        "max_frames": 128,
        "pose_components": "reduced_face",
        "prompt_template": "spreadthesign",
        "text_max_len": 64,
        "length_buckets": (),
        "workers": 0,
        "max_bad_fraction": 0.01,
        "augment": {"temporal": False},
    }
    base.update(data)
    return ml_collections.ConfigDict({"data": base})


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_layout_matches_per_example_processing(synth, tokenizer):
    cfg = _config()
    it = pipeline.make_train_iterator(
        synth, cfg, tokenizer=tokenizer, seed=0, batch_size_per_process=4
    )
    batches = _take(it, 3)
    spec = pose_lib.PoseSpec(max_frames=128)
    for b in batches:
        assert b["pose"].shape == (4, 128, 609) and b["pose"].dtype == np.float32
        assert b["pose_mask"].shape == (4, 128) and b["pose_mask"].dtype == bool
        assert b["text_ids"].shape == (4, 63) and b["text_ids"].dtype == np.int32
        assert b["text_mask"].shape == (4, 63) and b["text_mask"].dtype == bool
        assert b["index"].dtype == np.int64 and b["valid"].all()
        for row, i in enumerate(b["index"]):
            record = synth[int(i)]
            feats = pose_lib.load_features(record["pose_path"], spec)
            t = feats.shape[0]
            assert b["pose_mask"][row].sum() == t and b["pose_mask"][row, :t].all()
            np.testing.assert_array_equal(b["pose"][row, :t], feats)
            assert not b["pose"][row, t:].any()
            prompt = render_prompt("spreadthesign", text=record["text"],
                                   spoken="en", signed=record["sign_language"])  # fmt: skip
            ids, mask = encode_text(tokenizer, prompt, 64)
            np.testing.assert_array_equal(b["text_ids"][row], ids)
            np.testing.assert_array_equal(b["text_mask"][row], mask)
    seen = np.concatenate([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)  # one epoch: no repeats yet


def test_length_buckets(synth, tokenizer):
    cfg = _config(length_buckets=(32, 64, 96), max_frames=128)
    it = pipeline.make_train_iterator(
        synth, cfg, tokenizer=tokenizer, seed=1, batch_size_per_process=2
    )
    settings = pipeline.settings_from_config(cfg)
    lengths = set()
    for b in _take(it, 12):
        longest = b["pose_mask"].sum(1).max()
        want = min(x for x in (32, 64, 96, 128) if x >= longest)
        assert b["pose"].shape[1] == want == pipeline.bucket_length(longest, settings)
        lengths.add(want)
    assert len(lengths) >= 2  # clips of 40..90 frames fall in different buckets
    assert pipeline.bucket_length(500, settings) == 128
    padded = pipeline.pad_to_length(b, 128)
    assert padded["pose"].shape[1] == 128 and padded["pose_mask"].sum() == b["pose_mask"].sum()
    short = pipeline.make_train_iterator(
        synth, _config(max_frames=16), tokenizer=tokenizer, seed=1, batch_size_per_process=2
    )
    assert next(short)["pose_mask"].all()  # truncated to the first max_frames frames


def test_process_shards_are_disjoint_and_cover(synth, tokenizer):
    n, count = len(synth), 3
    seen = []
    for p in range(count):
        it = pipeline.make_train_iterator(
            synth, _config(), tokenizer=tokenizer, seed=4, process_index=p,
            process_count=count, batch_size_per_process=1, num_epochs=1,
        )  # fmt: skip
        seen.append([int(b["index"][0]) for b in it])
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    assert all(abs(len(s) - n / count) < 1 for s in seen)
    # Epoch 2 is a different order.
    it = pipeline.make_train_iterator(
        synth, _config(), tokenizer=tokenizer, seed=4, batch_size_per_process=n, num_epochs=2
    )
    e1, e2 = next(it)["index"], next(it)["index"]
    assert sorted(e1) == sorted(e2) and not np.array_equal(e1, e2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(synth, tokenizer, workers):
    cfg = _config(workers=workers, augment={"temporal": True, "noise": True},
                  length_buckets=(64,))  # fmt: skip
    kw = dict(tokenizer=tokenizer, seed=7, batch_size_per_process=4)
    # 10 batches of 4 from 30 examples: the resumed part crosses the epoch boundary.
    run = pipeline.make_train_iterator(synth, cfg, **kw)
    head = _take(run, 6)
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    uninterrupted = head + _take(run, 4)
    run.close()
    resumed = pipeline.make_train_iterator(synth, cfg, **kw)
    resumed.set_state(state)
    _same(_take(resumed, 4), uninterrupted[6:])
    resumed.close()
    # Worker processes do not change the batches: the same as an in-process run.
    other = _config(**{**cfg.data, "workers": 2 - workers})
    _same(_take(pipeline.make_train_iterator(synth, other, **kw), 10), uninterrupted)


def test_augmentation_only_in_training(synth, tokenizer):
    cfg = _config(augment={"temporal": True, "noise": True, "noise_std": 0.01})
    n = len(synth)
    train = pipeline.make_train_iterator(
        synth, cfg, tokenizer=tokenizer, seed=3, batch_size_per_process=n, num_epochs=2
    )
    epoch1, epoch2 = next(train), next(train)
    ev = pipeline.make_eval_batches(synth, cfg, tokenizer=tokenizer, batch_size_per_process=n)
    (plain,) = list(ev)
    spec = pose_lib.PoseSpec(max_frames=128)
    for row, i in enumerate(plain["index"]):  # eval: exactly the unaugmented features
        feats = pose_lib.load_features(synth[int(i)]["pose_path"], spec)
        np.testing.assert_array_equal(plain["pose"][row, : len(feats)], feats)
        assert plain["pose_mask"][row].sum() == len(feats)

    def by_index(b):
        return {int(i): b["pose"][r][b["pose_mask"][r]] for r, i in enumerate(b["index"])}

    a, b, ref = by_index(epoch1), by_index(epoch2), by_index(plain)
    assert all(a[i].shape != ref[i].shape or not np.array_equal(a[i], ref[i]) for i in ref)
    assert all(a[i].shape != b[i].shape or not np.array_equal(a[i], b[i]) for i in ref)
    assert {len(a[i]) for i in ref} != {len(ref[i]) for i in ref}  # temporal resampling ran
    # The same (seed, epoch, index) gives the same augmented example.
    again = pipeline.make_train_iterator(
        synth, cfg, tokenizer=tokenizer, seed=3, batch_size_per_process=n, num_epochs=2
    )
    _same([next(again)], [epoch1])


def _manifest_with_bad(tmp_path, synth, n_good):
    bad = write_malformed_poses(tmp_path / "bad")
    rows = [{"pose": synth[i]["pose_path"], "text": synth[i]["text"]} for i in range(n_good)]
    rows += [{"pose": str(path), "text": kind} for path, kind in bad.items()]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"broken json\n')
    return sources.ManifestSource(path), bad


def test_malformed_corpus_is_skipped_and_counted(synth, tokenizer, tmp_path):
    source, bad = _manifest_with_bad(tmp_path, synth, 12)
    cfg = _config(max_bad_fraction=1.0)
    ev = pipeline.make_eval_batches(source, cfg, tokenizer=tokenizer, batch_size_per_process=8)
    batches = list(ev)
    assert len(batches) == len(ev) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[valid].tolist()) == list(range(12))  # exactly the good files
    stats = ev.stats()
    assert (stats.skipped, stats.examined) == (len(bad) + 1, 12 + len(bad) + 1)
    # Training skips them too, without crashing, and the counts survive a resume.
    train = pipeline.make_train_iterator(
        source, cfg, tokenizer=tokenizer, seed=0, batch_size_per_process=4, num_epochs=1
    )
    got = [int(i) for b in train for i in b["index"]]
    assert sorted(got) == list(range(12))
    stats = train.stats()
    assert stats.skipped == len(bad) + 1 and stats.examined == 12 + len(bad) + 1
    assert pipeline.bad_example_stats(train)["data_skipped"] == len(bad) + 1


def test_malformed_csv_rows_are_counted(synth, tokenizer, tmp_path):
    good = [synth[i] for i in range(8)]
    path = tmp_path / "meta.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pose", "videoLanguage", "language", "text"])
        for r in good:
            w.writerow([r["pose_path"], "ase", "en", r["text"]])
        w.writerow(["only-two", "ase"])
        w.writerow(["", "ase", "en", "no file"])
        w.writerow(["missing.pose", "ase", "en", "gone"])
    source = sources.SpreadthesignSource(path, tmp_path, split="all")
    cfg = _config(max_bad_fraction=1.0)
    ev = pipeline.make_eval_batches(source, cfg, tokenizer=tokenizer, batch_size_per_process=4)
    rows = sum(int(b["valid"].sum()) for b in ev)
    assert rows == 8
    assert (ev.stats().skipped, ev.stats().examined) == (3, 11)
    assert any("missing.pose" in e for e in ev.stats().examples)


def test_max_bad_fraction_fails_with_a_clear_message(synth, tokenizer, tmp_path):
    source, bad = _manifest_with_bad(tmp_path, synth, 12)
    cfg = _config(max_bad_fraction=0.2, bad_check_min=10)
    it = pipeline.make_train_iterator(
        source, cfg, tokenizer=tokenizer, seed=0, batch_size_per_process=4
    )
    with pytest.raises(UserError) as e:
        _take(it, 50)
    message = str(e.value)
    assert "max_bad_fraction=0.2" in message and "skipped" in message
    assert any(p.name in message for p in bad) or "line" in message
    # Eval with a finite pass checks at the end whatever the count.
    ev = pipeline.make_eval_batches(
        source, _config(max_bad_fraction=0.2), tokenizer=tokenizer, batch_size_per_process=64
    )
    with pytest.raises(UserError, match="evaluation data"):
        list(ev)
    # Rows dropped while reading the metadata count as well (checked up front).
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"pose": "a.pose"}\n' + "{bad\n" * 3)
    with pytest.raises(UserError, match=r"3 of 4"):
        pipeline.make_train_iterator(
            sources.ManifestSource(broken), cfg, tokenizer=tokenizer, seed=0,
            batch_size_per_process=1,
        )  # fmt: skip


def test_all_bad_stream_fails_even_with_max_fraction_one(tokenizer, tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"pose": str(tmp_path / "gone.pose")}))
    cfg = _config(max_bad_fraction=1.0, bad_check_min=30)
    it = pipeline.make_train_iterator(
        sources.ManifestSource(tmp_path / "m.jsonl"), cfg, tokenizer=tokenizer, seed=0,
        batch_size_per_process=2,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"no usable examples.*all 30 .*gone\.pose"):
        next(it)


def test_eval_batches_same_count_on_every_process(synth, tokenizer):
    n, count, b = len(synth), 4, 4
    per_process = []
    for p in range(count):
        ev = pipeline.make_eval_batches(
            synth, _config(), tokenizer=tokenizer, process_index=p, process_count=count,
            batch_size_per_process=b,
        )  # fmt: skip
        batches = list(ev)
        assert len(batches) == pipeline.eval_num_batches(n, count, b) == len(ev)
        for x in batches:
            assert x["pose"].shape[0] == b
            assert (x["index"][~x["valid"]] == -1).all()
            assert not x["pose_mask"][~x["valid"]].any()
            assert x["text_mask"][~x["valid"]].any(axis=1).all()  # [CLS] [SEP]: no empty rows
            assert [p_ for p_, v in zip(x["prompt"], x["valid"]) if not v] == [""] * int(
                (~x["valid"]).sum()
            )
        per_process.append([int(i) for x in batches for i in x["index"][x["valid"]]])
    assert sorted(i for s in per_process for i in s) == list(range(n))
    again = pipeline.make_eval_batches(
        synth, _config(), tokenizer=tokenizer, process_index=1, process_count=count,
        batch_size=b,
    )  # fmt: skip
    assert [int(i) for x in again for i in x["index"][x["valid"]]] == per_process[1]


def test_settings_validation():
    with pytest.raises(UserError, match=r"unknown data\.augment key"):
        pipeline.settings_from_config(_config(augment={"tempral": True}))
    with pytest.raises(UserError, match="length_buckets"):
        pipeline.settings_from_config(_config(length_buckets=(0, 64)))
    with pytest.raises(UserError, match="components"):
        pipeline.settings_from_config(_config(pose_components="feet"))
    assert pipeline.settings_from_config(_config()).augment == ()  # all switches off


def test_pose_dtype_follows_a_16_bit_model_and_rounds_like_the_model(synth, tokenizer):
    # data.pose_dtype "auto": a bf16 model gets bf16 poses (the frame MLP casts them to bf16
    # first anyway); given config.data alone, or a float32 model, the poses stay float32.
    bf16 = _config(augment={"temporal": True})
    bf16.model = ml_collections.ConfigDict({"dtype": "bfloat16"})
    assert pipeline.settings_from_config(bf16).pose_dtype == "bfloat16"
    assert pipeline.settings_from_config(bf16.data).pose_dtype == "float32"
    fp32 = _config(augment={"temporal": True})
    fp32.model = ml_collections.ConfigDict({"dtype": "float32"})
    assert pipeline.settings_from_config(fp32).pose_dtype == "float32"
    assert pipeline.settings_from_config(_config(pose_dtype="float16")).pose_dtype == "float16"
    with pytest.raises(UserError, match=r"data\.pose_dtype must be auto or one of"):
        pipeline.settings_from_config(_config(pose_dtype="int8"))

    kw = dict(tokenizer=tokenizer, seed=3, batch_size_per_process=4)
    wide = _take(pipeline.make_train_iterator(synth, fp32, **kw), 2)
    narrow = _take(pipeline.make_train_iterator(synth, bf16, **kw), 2)
    for w, n in zip(wide, narrow):
        assert w["pose"].dtype == np.float32 and n["pose"].dtype.name == "bfloat16"
        assert n["pose"].nbytes * 2 == w["pose"].nbytes
        # the same augmented examples, rounded to nearest even as XLA's convert rounds
        np.testing.assert_array_equal(
            n["pose"].view(np.uint16), w["pose"].astype(n["pose"].dtype).view(np.uint16)
        )
        for key in ("pose_mask", "text_ids", "index"):
            np.testing.assert_array_equal(n[key], w[key])
    (evaluated,) = _take(pipeline.make_eval_batches(synth, bf16, tokenizer=tokenizer,
                                                    batch_size_per_process=64), 1)  # fmt: skip
    assert evaluated["pose"].dtype.name == "bfloat16"


def test_packed_shards_give_the_same_batches(synth, tokenizer, tmp_path):
    from signclip_jax.data.packing import pack

    pack(synth, tmp_path / "p", spec=pose_lib.PoseSpec(max_frames=0), dtype="float32")
    packed = sources.PackedSource(tmp_path / "p")
    cfg = _config(augment={"temporal": True, "spatial": True}, length_buckets=(64,))
    kw = dict(tokenizer=tokenizer, seed=5, batch_size_per_process=6)
    from_files = _take(pipeline.make_train_iterator(synth, cfg, **kw), 6)
    _same(_take(pipeline.make_train_iterator(packed, cfg, **kw), 6), from_files)
    with pytest.raises(UserError, match="packed with pose components"):
        pipeline.make_train_iterator(packed, _config(pose_components="hands"), **kw)


@pytest.mark.shared_data
def test_real_recording_through_eval_matches_golden_features(shared_pose, tokenizer, tmp_path):
    import hashlib

    path = shared_pose("spreadthesign-ase-house.pose")
    (tmp_path / "m.jsonl").write_text(json.dumps({"pose": str(path), "text": "house"}) + "\n")
    src = sources.ManifestSource(tmp_path / "m.jsonl")
    (batch,) = list(
        pipeline.make_eval_batches(src, _config(max_frames=256), tokenizer=tokenizer,
                                   batch_size_per_process=1)
    )  # fmt: skip
    assert batch["pose"].shape == (1, 256, 609) and batch["pose_mask"].sum() == 73
    digest = hashlib.md5(batch["pose"][0, :73].tobytes()).hexdigest()
    assert digest == "e672b202825fa4d2fedbdf36f65289cf"  # reference section 3.9
    assert batch["prompt"][0] == "<en> <ase> house"


def test_length_groups_sort_windows_and_resume_exactly(synth, tokenizer):
    # data.length_group_batches=K: each window of K batches is sorted by clip length and cut
    # into K batches (fewer padded frames with buckets); the examples are the same ones, and
    # a resume inside a window continues exactly.
    buckets = {"length_buckets": (48, 64, 80), "max_frames": 96}
    kw = dict(tokenizer=tokenizer, seed=3, batch_size_per_process=3)
    plain = pipeline.make_train_iterator(synth, _config(**buckets), **kw)
    grouped_cfg = _config(**buckets, length_group_batches=4)
    grouped = pipeline.make_train_iterator(synth, grouped_cfg, **kw)
    a, b = _take(plain, 8), _take(grouped, 8)

    def window(batches, k):
        return sorted(int(i) for x in batches[k : k + 4] for i in x["index"])

    for k in (0, 4):  # two windows of 4 batches x 3 examples: the same examples
        assert window(a, k) == window(b, k)
        # Within a window the batches split the sorted lengths: no overlap between batches.
        spans = sorted(
            (x["pose_mask"].sum(1).min(), x["pose_mask"].sum(1).max()) for x in b[k : k + 4]
        )
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans))
    padded = lambda batches: sum(x["pose"].shape[1] for x in batches)
    assert padded(b) < padded(a)
    # Resume in the middle of a window.
    state = json.loads(json.dumps(grouped.get_state()))
    more = _take(grouped, 6)
    resumed = pipeline.make_train_iterator(synth, grouped_cfg, **kw)
    _take(resumed, 1)
    resumed.set_state(state)
    _same(_take(resumed, 6), more)
    # Without buckets grouping cannot pad less: a clear error.
    with pytest.raises(UserError, match="length_buckets"):
        pipeline.make_train_iterator(synth, _config(length_group_batches=4), **kw)
    with pytest.raises(UserError, match="length_group_batches must be >= 0"):
        pipeline.make_train_iterator(synth, _config(**buckets, length_group_batches=-1), **kw)


# --- data.augment_on_device: the host reads, pads and draws the resampled frame counts -------

DEVICE = {"temporal": True, "spatial": True, "noise": True, "flip_prob": 0.2}


def test_device_augmentation_batches_hold_the_stored_clips(synth, tokenizer):
    cfg = _config(augment=DEVICE, augment_on_device=True, max_frames=64, length_buckets=(48,))
    settings = pipeline.settings_from_config(cfg)
    n = len(synth)
    it = pipeline.make_train_iterator(
        synth, cfg, tokenizer=tokenizer, seed=2, batch_size_per_process=4
    )
    spec = pose_lib.PoseSpec(max_frames=0)
    resampled = 0
    for step in range(10):  # 40 examples of 30: crosses into epoch 1
        b = next(it)
        assert set(b) == {"pose", "pose_mask", "pose_observed", "aug_frames", "aug_id",
                          "text_ids", "text_mask", "index", "label", "valid"}  # fmt: skip
        length = b["pose"].shape[1]
        assert b["pose"].shape == (4, length, 609) and b["pose"].dtype == np.float32
        assert b["pose_observed"].shape == (4, length, 26) and b["valid"].all()
        slots = np.maximum(b["pose_mask"].sum(1), b["aug_frames"])
        assert length == pipeline.device_length(int(slots.max()), settings)
        for row, i in enumerate(b["index"]):
            epoch = (step * 4 + row) // n
            assert b["aug_id"][row].tolist() == [epoch, int(i)]
            record = synth[int(i)]
            arr = pipeline.record_pose_array(record, spec)
            t_in, frames = pipeline.device_frames(arr.num_frames, arr.fps, epoch, int(i),
                                                  settings, seed=2)  # fmt: skip
            t = int(t_in[0])
            assert b["aug_frames"][row] == frames[0] and b["pose_mask"][row].sum() == t
            assert t == (arr.num_frames if frames[0] else min(arr.num_frames, 64))
            np.testing.assert_array_equal(b["pose"][row, :t], arr.points[:t].reshape(t, -1))
            assert not b["pose"][row, t:].any()
            bits = np.unpackbits(b["pose_observed"][row].reshape(-1))[: t * 203]
            np.testing.assert_array_equal(bits.reshape(t, 203), arr.observed[:t])
            resampled += bool(frames[0])
    assert 0 < resampled < 40
    # 16-bit models: the points travel as float16.
    half = _config(**{**cfg.data, "pose_dtype": "bfloat16"})
    b16 = next(pipeline.make_train_iterator(synth, half, tokenizer=tokenizer, seed=2,
                                            batch_size_per_process=4))  # fmt: skip
    assert b16["pose"].dtype == np.float16


def test_device_augmentation_eval_batches_are_not_augmented(synth, tokenizer):
    on = _config(augment=DEVICE, augment_on_device=True)
    off = _config(augment=DEVICE)
    kw = dict(tokenizer=tokenizer, batch_size_per_process=8)
    _same(list(pipeline.make_eval_batches(synth, on, **kw)),
          list(pipeline.make_eval_batches(synth, off, **kw)))  # fmt: skip


class _Records:
    """A source that is not a PackedSource: the per-example path over the same records."""

    def __init__(self, inner):
        self.inner, self.skipped = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


@pytest.fixture(scope="module")
def packed16(synth, tmp_path_factory):
    from signclip_jax.data.packing import pack

    out = tmp_path_factory.mktemp("packed16")
    pack(synth, out, spec=pose_lib.PoseSpec(max_frames=0), dtype="float16")
    return sources.PackedSource(out)


@pytest.mark.parametrize("groups", [0, 3])
def test_device_augmentation_from_packed_shards_reads_whole_batches(packed16, tokenizer, groups):
    """Packed shards: workers read and pad whole batches (length groups included); the
    batches equal the per-example path's, and resume exactly inside a window."""
    cfg = _config(augment=DEVICE, augment_on_device=True, max_frames=64, length_buckets=(48,),
                  length_group_batches=groups, pose_dtype="bfloat16")  # fmt: skip
    kw = dict(tokenizer=tokenizer, seed=5, batch_size_per_process=3)
    fast = pipeline.make_train_iterator(packed16, cfg, **kw)
    want = _take(pipeline.make_train_iterator(_Records(packed16), cfg, **kw), 12)
    got = _take(fast, 7)
    state = json.loads(json.dumps(fast.get_state()))
    got += _take(fast, 5)
    _same(got, want)
    assert got[0]["pose"].dtype == np.float16  # the shards' own bytes
    resumed = pipeline.make_train_iterator(packed16, cfg, **kw)
    resumed.set_state(state)
    _same(_take(resumed, 5), want[7:])
    assert resumed.stats().examined == 36 and resumed.stats().skipped == 0
    # A state of the other pipeline (augmentation on the host) is a clear error, both ways.
    host = _config(**{**cfg.data, "augment_on_device": False})
    other = pipeline.make_train_iterator(packed16, host, **kw)
    with pytest.raises(UserError, match="saved by the batch reader of packed shards"):
        other.set_state(state)
    with pytest.raises(UserError, match="saved by the per-example pipeline"):
        pipeline.make_train_iterator(packed16, cfg, **kw).set_state(other.get_state())


def test_device_augmentation_from_packed_shards_with_workers(packed16, tokenizer):
    # Worker processes send the clips unpadded; the main process pads them: same batches.
    cfg = _config(augment=DEVICE, augment_on_device=True, max_frames=64, length_buckets=(48,),
                  length_group_batches=2)  # fmt: skip
    kw = dict(tokenizer=tokenizer, seed=1, batch_size_per_process=4)
    want = _take(pipeline.make_train_iterator(packed16, cfg, **kw), 9)
    two = _config(**{**cfg.data, "workers": 2})
    it = pipeline.make_train_iterator(packed16, two, **kw)
    _same(_take(it, 9), want)
    it.close()


def test_compact_clips_pad_like_the_in_process_path():
    settings = pipeline.settings_from_config(_config())
    rng = np.random.default_rng(0)
    dtype = np.dtype(np.float16)
    clips = [None if t == 0 else (rng.normal(size=(t, 609)).astype(dtype),
                                  rng.integers(0, 256, (t * 203 + 7) // 8).astype(np.uint8))
             for t in (5, 0, 17, 1)]  # fmt: skip
    want = pipeline._pad_into(pipeline._BufferPool(settings, dtype), clips, 24)
    compact = pipeline._compact(clips, 24, dtype, settings)
    assert compact["compact_points"].shape == (23, 609)  # no padding travels
    got = pipeline._Pad(settings, dtype, 4)({**compact, "index": np.arange(4)})
    _same([got], [{**want, "index": np.arange(4)}])


def test_device_augmentation_unreadable_packed_record_is_an_empty_counted_row(
    packed16, tokenizer, tmp_path
):
    from signclip_jax.data.packing import ShardWriter

    reader = packed16._open()
    writer = ShardWriter(tmp_path, 1000)
    for i in range(len(packed16)):
        writer.write(b"garbage" if i == 4 else reader[i])
    writer.close_shard()
    index = dict(packed16.index, shards=writer.shards)
    (tmp_path / sources.PACKED_INDEX).write_text(json.dumps(index))
    damaged = sources.PackedSource(tmp_path)
    cfg = _config(augment=DEVICE, augment_on_device=True, max_bad_fraction=0.5)
    kw = dict(tokenizer=tokenizer, seed=0, batch_size_per_process=len(damaged))
    it = pipeline.make_train_iterator(damaged, cfg, num_epochs=1, **kw)
    (b,) = list(it)
    row = int(np.flatnonzero(b["index"] == 4)[0])
    assert not b["valid"][row] and b["valid"].sum() == len(damaged) - 1
    assert not b["pose_mask"][row].any() and b["aug_frames"][row] == 0
    stats = it.stats()
    assert (stats.examined, stats.skipped) == (len(damaged), 1)
    assert "packed record 4" in stats.examples[0] and "not a valid packed" in stats.examples[0]
    strict = _config(augment=DEVICE, augment_on_device=True, max_bad_fraction=0.0,
                     bad_check_min=1)  # fmt: skip
    with pytest.raises(UserError, match="too many unusable examples"):
        next(pipeline.make_train_iterator(damaged, strict, **kw))


def test_device_batch_buffers_are_reused_without_stale_data(packed16, tokenizer):
    # A batch's arrays are refilled once nothing holds them any more: the rows must then
    # equal a fresh batch's (no frames or bits left over from longer clips before).
    cfg = _config(augment=DEVICE, augment_on_device=True, max_frames=64)
    kw = dict(tokenizer=tokenizer, seed=9, batch_size_per_process=5)
    fast = pipeline.make_train_iterator(packed16, cfg, **kw)
    slow = pipeline.make_train_iterator(_Records(packed16), cfg, **kw)
    earlier, reused = [], 0
    for _ in range(18):
        a = next(fast)
        _same([a], [next(slow)])
        storage = a["pose"].base  # the batch arrays are views of reusable storage
        reused += any(ref() is storage for ref in earlier)
        earlier.append(weakref.ref(storage))
        del storage
        del a  # released: its arrays go back to the pool
    assert reused >= 10
