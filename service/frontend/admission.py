"""This front-end's slots of the ring, and how requests get them: admission's one bound over
every front-end, the images a body is judged to hold, and the 429 when they do not fit.

A request's image slots are reserved before its body is read, from its Content-Length and the
bytes per image of the bodies read so far, so a full server refuses without reading uploads it
would refuse; as a streamed body's images arrive it holds more, or is refused the moment they do
not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import Overloaded
from service.frontend.body import BodyClock
from service.metrics import FrontendMetrics
from service.settings import Settings
from service.shm_ring import Ring

BYTES_PER_IMAGE_WEIGHT = 0.2  # of each new body in the moving average: a few requests to follow a change
# A body holds a whole number of images, and divides back to a little more than it holds: its own
# framing (the closing boundary) is spread over the images of the bodies learnt from, and differs
# for another count (learnt from 32-image bodies, a 4-image body of the same image divided to
# 4.0004), and the quotient carries float noise. Neither must round up to one image more, which a
# burst that exactly fills the queue would pay with a 429. An image more than the estimate is
# still held as it arrives (SlotPool.hold).
FRAMING_ALLOWANCE = 0.05  # of an image


@dataclass(eq=False)
class Admission:
    """What an admitted request holds while its body is read: the image slots its size suggests."""

    declared_bytes: int | None  # the body's Content-Length, when it has one
    clock: BodyClock  # the request's deadline, and the body's pace while it is read
    slots: list[int]
    reading: bool = True  # until the core call takes the body's inputs

    @property
    def deadline(self) -> float:
        return self.clock.deadline

    def body_read(self) -> None:
        self.reading = False
        self.clock.stop()


class SlotPool:
    def __init__(self, ring: Ring, partition: int, settings: Settings, metrics: FrontendMetrics) -> None:
        self.ring = ring
        self.partition = partition
        self.settings = settings
        self.metrics = metrics
        layout = ring.layout
        # Stacks: the slot freed last is reused first, so a light load keeps touching the same pages.
        self._free_images = list(reversed(layout.image_slot_ids(partition)))
        self._free_tensors = list(reversed(layout.tensor_slot_ids(partition)))
        self._bytes_per_image: float | None = None  # of the bodies read so far, a moving average

    def reserve(self, declared_bytes: int | None, clock: BodyClock) -> Admission:
        """The slots for the images a body of this size is likely to hold, or 429 and none."""
        return Admission(declared_bytes, clock, self._take(self._free_images, self._expected(declared_bytes)))

    def _expected(self, declared_bytes: int | None) -> int:
        """The images a body of this size holds, judged by the bodies this front-end has read. At
        least its share of a full body (max_body_bytes / max_images_per_request each), so the bytes
        read at once stay bounded before anything is learnt; one without a Content-Length."""
        if declared_bytes is None:
            return 1
        settings = self.settings
        expected = math.ceil(declared_bytes * settings.max_images_per_request / settings.max_body_bytes)
        if self._bytes_per_image is not None:
            expected = max(expected, math.ceil(declared_bytes / self._bytes_per_image - FRAMING_ALLOWANCE))
        return max(1, min(settings.max_images_per_request, expected))

    def hold(self, admission: Admission, images: int, bytes_read: int) -> None:
        """As a streamed body's images arrive, keep a slot for each image the body now looks to
        hold (its Content-Length at the bytes per image read so far): 429 as soon as they do not fit,
        without reading the rest. Before anything is learnt every body is admitted as one image,
        so this is what keeps a cold burst of large bodies from being read whole to be refused."""
        # Its Content-Length, when the images read so far have bytes to judge the rest by.
        declared = admission.declared_bytes if bytes_read else None
        expected = images
        if declared is not None:
            # Rounded down: what was read never includes the body's closing boundary, so a body of N
            # like images reads as a little over N; rounding up would keep a slot too many.
            expected = max(images, min(self.settings.max_images_per_request, declared * images // bytes_read))
        missing = expected - len(admission.slots)
        if missing <= 0:
            return
        try:
            admission.slots += self._take(self._free_images, missing)
        except Overloaded:
            # Taught as the whole body would teach it once read (its size over its images), so that
            # the admissions that follow refuse such bodies at once, and admit them when they fit.
            self._learn(declared, expected)
            raise

    def settle(self, admission: Admission, images: int, tensors: int) -> tuple[list[int], list[int]]:
        """The request's slots, now that its body is read: the admission's image slots trimmed or
        topped up to the images it holds, and its tensor slots. A body of encoded images only,
        what admission estimates, teaches its bytes per image."""
        if not tensors:
            self._learn(admission.declared_bytes, images)
        held = admission.slots
        for slot in held[images:]:
            self.free(slot)
        admission.slots = held[:images]
        admission.slots += self._take(self._free_images, images - len(admission.slots))
        tensor_slots = self._take(self._free_tensors, tensors)
        image_slots, admission.slots = admission.slots, []
        return image_slots, tensor_slots

    def _learn(self, declared_bytes: int | None, images: int) -> None:
        # A sample of no bytes would make the size zero, and the next body is divided by it.
        if not declared_bytes or not images:
            return
        sample = declared_bytes / images
        previous = self._bytes_per_image
        self._bytes_per_image = sample if previous is None else previous + BYTES_PER_IMAGE_WEIGHT * (sample - previous)

    def _image_room(self) -> int:
        """Images this front-end may still admit: what the queue has left over every front-end."""
        held_by_all = int(self.ring.admitted.sum())
        return min(len(self._free_images), self.settings.max_queue_images - held_by_all)

    def _take(self, free: list[int], count: int) -> list[int]:
        """`count` slots from a free stack, or 429 and none."""
        if not count:
            return []
        if count > (self._image_room() if free is self._free_images else len(free)):
            self._refuse_full(count, free)
        slots = [free.pop() for _ in range(count)]
        self._publish_held()
        self.metrics.images_in_flight.inc(count)
        return slots

    def _refuse_full(self, count: int, free: list[int]) -> None:
        self.metrics.rejections.labels(reason="overloaded").inc()
        if free is self._free_tensors:
            limit = f"{self.ring.layout.tensor_slots} FP32 tensors on this front-end"
        else:
            limit = f"{self.settings.max_queue_images} images admitted over every front-end"
        raise Overloaded(
            f"no room for {count} more ({limit} at most); retry later", retry_after=self.settings.retry_after_s
        )

    def free(self, slot: int) -> None:
        (self._free_tensors if self.ring.layout.is_tensor(slot) else self._free_images).append(slot)
        self._publish_held()
        self.metrics.images_in_flight.dec()

    def _publish_held(self) -> None:
        # The one count of this process that the other front-ends read (in _image_room).
        self.ring.admitted[self.partition] = self.ring.layout.image_slots - len(self._free_images)
