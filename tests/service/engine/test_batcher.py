"""The engine's queue on its own, with real threads: batches in order, expiry, cancellation, the wait window."""

import threading
import time

from service.engine.batcher import Batcher, Item


def _items(owner, slots, deadline_s=5.0):
    now = time.monotonic()
    return [Item(owner, slot, now + deadline_s, tensor=False, enqueued=now) for slot in slots]


def _batcher(max_batch_size=4, max_wait_s=0.0):
    depths = []
    return Batcher(max_batch_size, max_wait_s, depths.append), depths


def test_batches_hold_at_most_the_maximum_in_arrival_order():
    batcher, depths = _batcher()
    batcher.put(_items("a", range(6)))
    first, expired = batcher.take()
    assert [i.slot for i in first] == [0, 1, 2, 3] and not expired
    second, _ = batcher.take()
    assert [i.slot for i in second] == [4, 5]
    assert depths == [2, 0]  # the gauge follows the queue as batches leave


def test_expired_images_are_handed_back_apart_and_never_batched():
    batcher, _ = _batcher()
    batcher.put(_items("a", [1], deadline_s=-1.0) + _items("a", [2]))
    batch, expired = batcher.take()
    assert [i.slot for i in batch] == [2] and [i.slot for i in expired] == [1]


def test_remove_takes_out_only_what_is_not_kept():
    batcher, _ = _batcher()
    batcher.put(_items("a", [1, 2]) + _items("b", [3]))
    removed = batcher.remove(lambda item: item.owner != "a")
    assert [i.slot for i in removed] == [1, 2] and len(batcher) == 1


def test_the_first_image_waits_for_company_until_the_batch_is_full():
    batcher, _ = _batcher(max_batch_size=2, max_wait_s=5.0)
    batcher.put(_items("a", [1]))
    threading.Timer(0.05, lambda: batcher.put(_items("a", [2]))).start()
    started = time.monotonic()
    batch, _ = batcher.take()
    assert [i.slot for i in batch] == [1, 2] and time.monotonic() - started < 4.0


def test_the_window_closes_on_a_partial_batch():
    batcher, _ = _batcher(max_batch_size=4, max_wait_s=0.2)
    batcher.put(_items("a", [1]))
    started = time.monotonic()
    batch, _ = batcher.take()
    assert [i.slot for i in batch] == [1] and time.monotonic() - started >= 0.19


def test_without_a_window_a_lone_image_goes_at_once():
    batcher, _ = _batcher(max_wait_s=0.0)
    batcher.put(_items("a", [1]))
    started = time.monotonic()
    batch, _ = batcher.take()
    assert len(batch) == 1 and time.monotonic() - started < 0.05


def test_close_lets_workers_drain_what_is_queued_then_stop():
    batcher, _ = _batcher(max_batch_size=2)
    batcher.put(_items("a", [1, 2, 3]))
    batcher.close()
    assert len(batcher.take()[0]) == 2 and len(batcher.take()[0]) == 1
    assert batcher.take() is None


def test_a_waiting_worker_wakes_for_new_work():
    batcher, _ = _batcher()
    taken = []
    worker = threading.Thread(target=lambda: taken.append(batcher.take()))
    worker.start()
    time.sleep(0.05)
    batcher.put(_items("a", [7]))
    worker.join(timeout=2)
    assert [i.slot for i in taken[0][0]] == [7]
