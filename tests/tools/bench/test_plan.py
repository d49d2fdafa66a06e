"""tools/bench/plan.py: the Spreadthesign length model and the shapes of the timed batches."""

from __future__ import annotations

import numpy as np
import pytest

from signclip_jax.tools.bench import plan as plan_lib


def test_plan_batches():
    rng = np.random.default_rng(1)
    lengths = plan_lib.spreadthesign_lengths(rng, 100_000, 256)
    assert lengths.min() >= 1 and lengths.max() <= 256
    assert abs(lengths.mean() - plan_lib.ST_MEAN_FRAMES) < 2  # clipping trims a little
    assert abs(np.median(lengths) - plan_lib.ST_MEDIAN_FRAMES) <= 1

    kw = dict(steps=20, batch_size=64, max_frames=256, text_len=63, buckets=(64, 128, 192))
    plain = plan_lib.plan_batches(**kw, seed=3)
    grouped = plan_lib.plan_batches(**kw, sort_by_length=True, seed=3)
    for plan in (plain, grouped):
        assert plan.lengths.shape == (20, 64) and plan.text_lengths.shape == (20, 64)
        for step in range(plan.steps):
            longest = plan.lengths[step].max()
            # The smallest of (64, 128, 192, 256) that holds the longest row.
            assert plan.padded[step] == min(b for b in (64, 128, 192, 256) if b >= longest)
            pose_mask, text_mask = plan.masks(step)
            assert pose_mask.shape == (64, plan.padded[step]) and text_mask.shape == (64, 63)
            assert (pose_mask.sum(1) == plan.lengths[step]).all()
            assert (text_mask.sum(1) == plan.text_lengths[step]).all()
        s = plan.summary()
        assert s["useful_frame_fraction"] == pytest.approx(
            plan.lengths.sum() / (plan.padded.sum() * 64)
        )
    # Grouping rows of similar length is what lets buckets pay off.
    assert grouped.summary()["mean_padded_frames"] < plain.summary()["mean_padded_frames"]
    assert grouped.summary()["useful_frame_fraction"] > plain.summary()["useful_frame_fraction"]
    assert sorted(grouped.lengths.ravel()) == sorted(plain.lengths.ravel())  # same rows

    fixed = plan_lib.plan_batches(steps=3, batch_size=4, max_frames=256, text_len=23, frames=40)
    assert list(fixed.padded) == [40, 40, 40] and fixed.lengths.max() <= 40
