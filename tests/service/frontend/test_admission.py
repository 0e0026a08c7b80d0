"""Admission's size estimates, on a real engine client and ring: what a body is judged to hold."""

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from model_export.manifest import Manifest
from service.errors import Overloaded
from service.frontend.admission import Admission
from service.frontend.decode import Decoder
from service.frontend.engine_client import EngineClient
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.shm_ring import Ring, RingLayout

SLOTS, PER_REQUEST = 16, 8
# Seven: one of the counts whose bytes per image does not always divide back to a whole number.
IMAGES = 7


def _front_ends(count: int) -> list[EngineClient]:
    """The engine clients of `count` front-ends on one ring, as the supervisor lays it out."""
    manifest = Manifest.read(DEFAULT_MODEL_DIR)
    settings = Settings(max_queue_images=SLOTS, max_images_per_request=PER_REQUEST, frontend_processes=count)
    ring = Ring.create(RingLayout.for_model(manifest, count, SLOTS, 1))
    clients = []
    for partition in range(count):
        lifecycle = Lifecycle(settings.retry_after_s, lambda: None, lambda _: None)
        lifecycle.started = lifecycle.engine_connected = True  # as the engine's welcome sets them
        decoder = Decoder(manifest.preprocessing, settings.max_image_pixels)
        address = "no engine: admission needs none"
        metrics = FrontendMetrics()
        clients.append(EngineClient(ring, partition, address, settings, decoder, lifecycle, metrics, lambda *_: None))
    return clients


def admitted(client: EngineClient, size: int | None = None) -> AbstractAsyncContextManager[Admission]:
    """An admission for a body of `size` bytes, due in a minute."""
    return client.admitted(size, time.monotonic() + 60)


@pytest.fixture
def engine() -> Iterator[EngineClient]:
    (client,) = _front_ends(1)
    yield client
    asyncio.run(client.close())


@pytest.fixture
def two_front_ends() -> Iterator[list[EngineClient]]:
    clients = _front_ends(2)
    yield clients
    for client in clients:
        asyncio.run(client.close())


def test_a_body_refused_as_it_streams_is_admitted_again_when_its_images_fit(engine):
    """Refused at its first image, a body teaches its size over the images it was judged to hold:
    the next body of that size is sized to exactly as many, and admitted once they are free, also
    for a size whose bytes per image does not divide back to a whole number in floating point."""
    size = next(size for size in range(1_000_000, 1_100_000) if math.ceil(size / (size / IMAGES)) > IMAGES)
    # Read up to the end of the first image: a little under its share (its part, less the delimiter).
    first_image = size // IMAGES - 40

    async def scenario() -> None:
        async with admitted(engine) as full:
            engine.hold(full, PER_REQUEST, PER_REQUEST * first_image)  # half the slots
            async with admitted(engine):
                # Six free, then five for a body of seven images: refused at its first.
                async with admitted(engine):
                    with pytest.raises(Overloaded):
                        async with admitted(engine, size) as late:
                            engine.hold(late, 1, first_image)
                async with admitted(engine, size) as next_one:  # seven free
                    assert len(next_one.slots) == IMAGES

    asyncio.run(scenario())


def test_a_body_of_fewer_images_than_those_learnt_from_is_sized_to_what_it_holds(engine):
    """The body's framing, learnt spread over eight images, weighs more over two: such a body
    divides to a little over two, and must not take a third slot."""
    part, framing = 48_700, 60  # an image's part; the closing boundary and its CRLFs

    async def scenario() -> None:
        for _ in range(5):  # learnt from eight-image bodies
            async with admitted(engine, PER_REQUEST * part + framing) as full:
                image_slots, _ = engine.slots.settle(full, PER_REQUEST, 0)  # its body is read: learnt
                for slot in image_slots:
                    engine.slots.free(slot)
        async with admitted(engine, 2 * part + framing) as small:
            assert len(small.slots) == 2

    asyncio.run(scenario())


def test_the_queue_bound_is_one_over_every_front_end_however_the_connections_split(two_front_ends):
    """The kernel may hand most connections to one front-end: it admits past an even share while
    the other holds little, and the images held by both together stay within the bound."""
    busy, quiet = two_front_ends

    async def scenario() -> None:
        async with admitted(busy) as first, admitted(busy) as second:
            busy.hold(first, PER_REQUEST, 1000)
            busy.hold(second, 4, 1000)  # 12 of 16 on one front-end
            async with admitted(quiet) as few:
                quiet.hold(few, 4, 1000)
                for front_end in (quiet, busy):
                    with pytest.raises(Overloaded, match=f"{SLOTS} images admitted over every front-end"):
                        async with admitted(front_end):
                            pytest.fail("admitted past the bound")
        async with admitted(quiet) as whole:
            quiet.hold(whole, PER_REQUEST, 1000)
            assert len(whole.slots) == PER_REQUEST

    asyncio.run(scenario())
