"""The server's model thread (serving/batcher.py): concurrent requests merge into shared model
calls, results split back in order, a failing call fails every request merged into it, and a
full queue refuses more work."""

import threading
import time

import numpy as np
import pytest

from signclip_jax.serving.batcher import Batcher, QueueFull


class FakeEmbedder:
    """Rows encode their input (pose: frame count, text: length) so splitting can be checked;
    the first call blocks until released, so later requests pile up behind it."""

    hidden_size = 2

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[tuple[int, int]] = []

    def embed_features(self, feats):
        self.release.wait(10)
        self.calls.append(("pose", len(feats)))
        return np.array([[len(f), i] for i, f in enumerate(feats)], np.float32)

    def embed_texts(self, texts):
        self.release.wait(10)
        self.calls.append(("text", len(texts)))
        if "boom" in texts:
            raise RuntimeError("model failure")
        return np.array([[len(t), i] for i, t in enumerate(texts)], np.float32)


def test_batcher_merges_and_splits():
    fake = FakeEmbedder()
    batcher = Batcher(fake, batch_size=64, wait_s=0.0, max_queue=100)
    first = batcher.submit([np.zeros((3, 1))], [])
    time.sleep(0.1)  # the model thread is now blocked inside the first call
    later = [batcher.submit([np.zeros((k, 1))] * k, ["t" * k]) for k in range(1, 6)]
    fake.release.set()
    assert first.result(5)[0].tolist() == [[3, 0]]
    for k, future in enumerate(later, start=1):
        poses, texts = future.result(5)
        assert poses[:, 0].tolist() == [k] * k and texts[:, 0].tolist() == [k]
    # The five waiting requests went through each tower once, together.
    assert fake.calls == [("pose", 1), ("pose", 15), ("text", 5)]
    assert (batcher.batches, batcher.requests) == (2, 6)


def test_batcher_errors_and_backpressure():
    fake = FakeEmbedder()
    batcher = Batcher(fake, batch_size=64, wait_s=0.0, max_queue=2)
    blocker = batcher.submit([], ["a"])
    time.sleep(0.1)
    bad, good = batcher.submit([], ["boom"]), batcher.submit([], ["ok"])
    with pytest.raises(QueueFull):  # queue holds 2: the third waits nowhere
        batcher.submit([], ["x"])
    fake.release.set()
    blocker.result(5)
    with pytest.raises(RuntimeError, match="model failure"):
        bad.result(5)
    with pytest.raises(RuntimeError):  # merged with the failing one: told, not left hanging
        good.result(5)
    assert batcher.submit([], ["fine"]).result(5)[1].tolist() == [[4, 0]]
