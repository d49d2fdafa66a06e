"""The server's model thread: merges concurrent requests into batches for an `Embedder`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """`max_queue` requests already wait for the model (the server answers 503)."""


@dataclasses.dataclass
class _Job:
    poses: list[np.ndarray]  # features [T_i, D]
    texts: list[str]
    future: concurrent.futures.Future


class Batcher:
    """One model thread: merges concurrent requests into batches for an `Embedder`.

    `submit(poses, texts)` returns a Future of (pose embeddings [P, H], text embeddings [T, H]).
    The thread takes every request already queued, then waits up to `wait_s` for more while a
    tower has fewer than `batch_size` rows, and runs each tower once on the merged rows
    (`Embedder` splits anything larger into batch_size chunks, so no new shapes compile).
    A failing model call fails every request merged into it.
    """

    def __init__(self, embedder: Any, *, batch_size: int, wait_s: float, max_queue: int):
        self.embedder = embedder
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.batches = 0  # model calls made (pose and text towers together): for tests/stats
        self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="signclip-model", daemon=True)
        self._thread.start()

    def submit(
        self, poses: Sequence[np.ndarray], texts: Sequence[str]
    ) -> concurrent.futures.Future:
        """Queues one request; QueueFull when max_queue requests are waiting already."""
        job = _Job(list(poses), list(texts), concurrent.futures.Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull("too many requests waiting") from None
        return job.future

    def _collect(self) -> list[_Job]:
        jobs = [self._queue.get()]
        poses, texts = len(jobs[0].poses), len(jobs[0].texts)
        deadline = time.monotonic() + self.wait_s
        while poses < self.batch_size and texts < self.batch_size:
            try:  # everything already waiting, then whatever arrives before the deadline
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            jobs.append(job)
            poses, texts = poses + len(job.poses), texts + len(job.texts)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = [j for j in self._collect() if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            poses = [p for j in jobs for p in j.poses]
            texts = [t for j in jobs for t in j.texts]
            hidden = self.embedder.hidden_size
            pose_emb = self.embedder.embed_features(poses) if poses else np.zeros((0, hidden))
            text_emb = self.embedder.embed_texts(texts) if texts else np.zeros((0, hidden))
        except BaseException as e:  # every waiting request must hear of it
            log.exception("model call failed")
            for j in jobs:
                j.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(jobs)
        p = t = 0
        for j in jobs:
            j.future.set_result(
                (
                    pose_emb[p : p + len(j.poses)].astype(np.float32),
                    text_emb[t : t + len(j.texts)].astype(np.float32),
                )
            )
            p, t = p + len(j.poses), t + len(j.texts)


__all__ = ["Batcher", "QueueFull"]
