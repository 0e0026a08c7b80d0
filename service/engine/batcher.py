"""The engine's queue for one graph: images from every front-end, formed into batches.

A batch is formed only when a session worker is free and asks for one, so under load the queue
grows into larger batches by itself; `max_wait_s` lets the first image wait for company. Images
whose deadline passed while queued are handed back apart, never run.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Item:
    owner: object  # the front-end connection the image came from
    slot: int
    deadline: float  # time.monotonic() seconds
    tensor: bool  # an already-normalised FP32 row, not uint8 pixels
    enqueued: float  # time.monotonic() when it joined the queue


class Batcher:
    def __init__(self, max_batch_size: int, max_wait_s: float, on_depth: Callable[[int], None]) -> None:
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        # Told the queue depth, in images, when a batch leaves or work is withdrawn: often enough for
        # a gauge, and not once per arriving image.
        self._on_depth = on_depth
        self._queue: collections.deque[Item] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, items: list[Item]) -> None:
        with self._changed:
            self._queue.extend(items)
            self._changed.notify()

    def remove(self, keep: Callable[[Item], bool]) -> list[Item]:
        """Take out every queued item for which `keep` is False (cancelled, or its front-end died)."""
        with self._changed:
            removed = [item for item in self._queue if not keep(item)]
            if removed:
                self._queue = collections.deque(item for item in self._queue if keep(item))
                self._on_depth(len(self._queue))
            return removed

    def take(self) -> tuple[list[Item], list[Item]] | None:
        """Block for the next batch: (items to run, items that expired on the way). None once
        closed and empty."""
        with self._changed:
            while not self._queue and not self._closed:
                self._changed.wait()
            if not self._queue:
                return None
            batch: list[Item] = []
            expired: list[Item] = []
            window_closes = time.monotonic() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                if not self._queue:
                    remaining = window_closes - time.monotonic()
                    if remaining <= 0 or self._closed or not self._changed.wait(remaining):
                        break
                    continue
                item = self._queue.popleft()
                (expired if time.monotonic() >= item.deadline else batch).append(item)
            self._on_depth(len(self._queue))
            # Another free worker may form the next batch from what is left.
            if self._queue:
                self._changed.notify()
            return batch, expired

    def close(self) -> None:
        """Wake every worker: they drain what is queued, then `take` answers None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
