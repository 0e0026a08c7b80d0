"""The engine client against a socket that plays the engine: the messages it sends, and how their
answers reach each request."""

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from contextvars import Context
from typing import Self

import numpy as np
import pytest
from PIL import Image

from model_export.manifest import Manifest
from service.errors import ClientDisconnected, DeadlineExceeded
from service.frontend.decode import Decoder
from service.frontend.engine_client import EngineClient
from service.frontend.engine_link import MAX_MESSAGE
from service.frontend.uploads import Upload
from service.lifecycle import Lifecycle
from service.metrics import FrontendMetrics
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.shm_ring import (
    Done,
    Graph,
    Kind,
    Ring,
    RingLayout,
    Status,
    done,
    kind_of,
    parse_cancel,
    parse_submit,
    welcome,
)
from tests.conftest import encode

PID = 4242  # the engine's, as its welcome says


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.read(DEFAULT_MODEL_DIR)


class FakeEngine:
    """The engine's side of the socket, played by the test: it welcomes the client, reads its
    SUBMITs, and answers each slot with its input's first value as every logit."""

    def __init__(
        self, manifest: Manifest, tensor_slots: int, images_per_request: int = 1, engine_stall_s: float = 30
    ) -> None:
        self.ring = Ring.create(RingLayout.for_model(manifest, 1, 8, tensor_slots))
        self.classes = manifest.num_classes
        self.settings = Settings(
            frontend_processes=1,
            max_queue_images=8,
            max_images_per_request=images_per_request,
            preprocess_threads=2,
            engine_stall_s=engine_stall_s,
        )
        self.address = f"\0vit-engine-client-test-{os.getpid()}"
        lifecycle = Lifecycle(self.settings.retry_after_s, lambda: None, lambda _: None)
        decoder = Decoder(manifest.preprocessing, self.settings.max_image_pixels)
        self.stalls: list[tuple[int, int, float]] = []  # what the client told the supervisor
        self.client = EngineClient(
            self.ring,
            0,
            self.address,
            self.settings,
            decoder,
            lifecycle,
            FrontendMetrics(),
            lambda *report: self.stalls.append(report),
        )

    async def connect(self, listener: socket.socket) -> socket.socket:
        loop = asyncio.get_running_loop()
        connecting = asyncio.create_task(self.client.start(timeout_s=10))
        engine, _ = await loop.sock_accept(listener)
        assert kind_of(await loop.sock_recv(engine, MAX_MESSAGE)) == Kind.HELLO
        info = {
            "pid": PID,
            "provider": "CPUExecutionProvider",
            "requested_providers": ["CPUExecutionProvider"],
            "session_workers": 1,
            "intra_op_threads": 1,
            "rows": {"plain": [["logits", [self.classes]]]},
        }
        await loop.sock_sendall(engine, welcome(json.dumps(info).encode()))
        await connecting
        return engine

    def classify(
        self, value: float, gone: asyncio.Future[None] | None = None, within_s: float = 30
    ) -> asyncio.Task[np.ndarray]:
        """One request of one FP32 row filled with `value`: no decode, so it reaches the engine in
        the turn it starts in. `gone`: its connection's end."""

        async def request() -> np.ndarray:
            row = np.full(self.ring.layout.tensor_shape, value, np.float32)
            async with self.client.admitted(None, time.monotonic() + within_s) as admission:
                answer = await self.client.run(admission, [row], gone=gone)
            return answer.rows[0]["logits"]

        return asyncio.create_task(request())

    def value(self, slot: int) -> float:
        """What the request in this slot filled its row with: which request it is."""
        return float(self.ring.tensors[self.ring.tensor_index(slot)].flat[0])

    async def answer(self, engine: socket.socket, slots: list[int], status: Status = Status.OK) -> None:
        for slot in slots:
            self.ring.outputs[slot, : self.classes] = self.value(slot)
        records = [Done(slot, status, len(slots), 0.0, 0.001) for slot in slots]
        await asyncio.get_running_loop().sock_sendall(engine, done(records))


class Connection(asyncio.Future[None]):
    """A connection's end, as the HTTP protocol hands it to a request, counting who waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    def add_done_callback(self, fn: Callable[[Self], object], /, *, context: Context | None = None) -> None:
        self.waiting += 1
        super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Self], object], /) -> int:
        removed = super().remove_done_callback(fn)
        self.waiting -= removed
        return removed


def serve(fake: FakeEngine, scenario: Callable[[socket.socket], Awaitable[None]]) -> None:
    async def run() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(fake.address)
            listener.listen(1)
            listener.setblocking(False)
            engine = await fake.connect(listener)
            with engine:
                await scenario(engine)
            await fake.client.close()

    asyncio.run(run())


def test_requests_handed_over_in_one_turn_of_the_loop_share_one_submit_and_each_gets_its_own_row(manifest):
    fake = FakeEngine(manifest, tensor_slots=5)

    async def scenario(engine: socket.socket) -> None:
        requests = [fake.classify(i) for i in range(5)]
        graph, records = parse_submit(await asyncio.get_running_loop().sock_recv(engine, MAX_MESSAGE))
        assert graph == Graph.PLAIN and len(records) == 5
        await fake.answer(engine, [slot for slot, _ in records])
        for i, logits in enumerate(await asyncio.gather(*requests)):
            assert logits.shape == (fake.classes,) and (logits == i).all()

    serve(fake, scenario)


def test_a_client_that_leaves_while_the_engine_works_gets_499_and_its_image_is_cancelled_there(manifest):
    fake = FakeEngine(manifest, tensor_slots=2)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        closed, still_open = Connection(), Connection()
        leaving, staying = fake.classify(0, closed), fake.classify(1, still_open)
        _, records = parse_submit(await loop.sock_recv(engine, MAX_MESSAGE))
        closed.set_result(None)
        with pytest.raises(ClientDisconnected):
            await leaving
        cancelled = parse_cancel(await asyncio.wait_for(loop.sock_recv(engine, MAX_MESSAGE), 10))
        assert [fake.value(slot) for slot in cancelled] == [0]
        await fake.answer(engine, cancelled, Status.CANCELLED)
        await fake.answer(engine, [slot for slot, _ in records if slot not in cancelled])
        assert (await staying == 1).all()
        assert still_open.waiting == 0  # an answered request leaves nothing on its connection

    serve(fake, scenario)


def test_a_request_cancelled_while_its_image_decodes_holds_the_slot_until_the_decode_ends(manifest):
    """A front-end's shutdown cancels what is still in flight: a decode thread may be writing into
    the slot, so the slot goes back only once the write is over, and nothing reaches the engine."""
    fake = FakeEngine(manifest, tensor_slots=0)
    writing, release = threading.Event(), threading.Event()

    class SlowDecoder(Decoder):
        def decode_into(self, data: bytes, out: np.ndarray) -> None:
            writing.set()
            release.wait(10)
            out[...] = 7

    fake.client.decoder = SlowDecoder(manifest.preprocessing, fake.settings.max_image_pixels)

    async def scenario(engine: socket.socket) -> None:
        async def request() -> None:
            async with fake.client.admitted(None, time.monotonic() + 30) as admission:
                await fake.client.run(admission, [Upload("a.jpg", b"jpeg")])

        running = asyncio.create_task(request())
        assert await asyncio.to_thread(writing.wait, 10)
        running.cancel()
        await asyncio.sleep(0.05)
        assert not running.done() and fake.ring.admitted[0] == 1  # held while the thread writes
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert fake.ring.admitted[0] == 0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.get_running_loop().sock_recv(engine, MAX_MESSAGE), 0.2)

    serve(fake, scenario)


def test_a_client_that_leaves_while_its_images_decode_gets_499_and_no_further_image_is_decoded(manifest):
    """Each decode thread finishes the image it holds (a slot is never freed mid-write); the other
    uploads are never decoded and nothing reaches the engine."""
    fake = FakeEngine(manifest, tensor_slots=0, images_per_request=6)
    started: list[int] = []
    both_busy, release = threading.Event(), threading.Event()

    class SlowDecoder(Decoder):
        def decode_into(self, data: bytes, out: np.ndarray) -> None:
            started.append(int(data))
            if len(started) == 2:
                both_busy.set()
            release.wait(10)
            out[...] = 7

    fake.client.decoder = SlowDecoder(manifest.preprocessing, fake.settings.max_image_pixels)

    async def scenario(engine: socket.socket) -> None:
        closed = Connection()

        async def request() -> None:
            async with fake.client.admitted(None, time.monotonic() + 30) as admission:
                uploads = [Upload(f"{i}.jpg", str(i).encode()) for i in range(6)]
                await fake.client.run(admission, uploads, gone=closed)

        running = asyncio.create_task(request())
        assert await asyncio.to_thread(both_busy.wait, 10)
        closed.set_result(None)
        await asyncio.sleep(0.05)
        assert not running.done() and fake.ring.admitted[0] == 6  # held while the threads write
        release.set()
        with pytest.raises(ClientDisconnected):
            await running
        assert sorted(started) == [0, 1] and fake.ring.admitted[0] == 0
        (left,) = [s for s in fake.client.metrics.rejections.collect()[0].samples if s.name.endswith("_total")]
        assert left.labels == {"reason": "client_disconnected"} and left.value == 1
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.get_running_loop().sock_recv(engine, MAX_MESSAGE), 0.2)

    serve(fake, scenario)


def test_a_requests_one_small_jpeg_decodes_on_the_event_loop_even_in_company_and_several_on_threads(manifest):
    """Handing a small decode to a thread costs about what the decode does; a request of several
    images, or of one that is not quick (progressive), keeps the loop free for the others."""
    fake = FakeEngine(manifest, tensor_slots=0)
    decoded_on: list[tuple[bytes, int]] = []  # each decode's image and thread

    class Recording(Decoder):
        def decode_into(self, data: bytes, out: np.ndarray) -> None:
            decoded_on.append((data, threading.get_ident()))
            super().decode_into(data, out)

    fake.client.decoder = Recording(manifest.preprocessing, fake.settings.max_image_pixels)
    jpeg = encode(Image.fromarray(np.full((64, 48), 200, np.uint8)), "JPEG")
    progressive = encode(Image.fromarray(np.full((64, 48), 200, np.uint8)), "JPEG", progressive=True)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()

        async def threads_used(*images: bytes) -> list[bool]:
            async def request() -> None:
                async with fake.client.admitted(None, time.monotonic() + 30) as admission:
                    await fake.client.run(admission, [Upload(f"{i}.jpg", data) for i, data in enumerate(images)])

            decoded_on.clear()
            running = asyncio.create_task(request())
            _, records = parse_submit(await asyncio.wait_for(loop.sock_recv(engine, MAX_MESSAGE), 10))
            await loop.sock_sendall(engine, done([Done(slot, Status.OK, 1, 0.0, 0.001) for slot, _ in records]))
            await running
            return [thread != threading.get_ident() for _, thread in decoded_on]

        assert await threads_used(jpeg) == [False]
        with fake.client.lifecycle.track():  # another request, reading its body meanwhile
            assert await threads_used(jpeg) == [False]
        assert await threads_used(progressive) == [True]
        assert await threads_used(jpeg, jpeg) == [True, True]

    serve(fake, scenario)


async def _one_submit_each(fake: FakeEngine, count: int) -> list[asyncio.Task[np.ndarray]]:
    requests = []
    for i in range(count):  # a turn each, so a SUBMIT each
        requests.append(fake.classify(i))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    return requests


def test_submits_the_engine_is_too_slow_to_read_wait_for_its_socket_to_drain(manifest):
    """An engine whose reader falls behind fills the front-end's socket (a few hundred messages by
    default): the SUBMITs that do not fit leave once it drains, none is lost."""
    count = 1200
    fake = FakeEngine(manifest, tensor_slots=count)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        requests = await _one_submit_each(fake, count)  # nobody reads them yet
        submitted: list[int] = []
        while len(submitted) < count:
            _, records = parse_submit(await asyncio.wait_for(loop.sock_recv(engine, MAX_MESSAGE), 10))
            submitted += [slot for slot, _ in records]
        assert sorted(submitted) == sorted(set(submitted))
        await fake.answer(engine, submitted)
        for i, logits in enumerate(await asyncio.gather(*requests)):
            assert (logits == i).all()

    serve(fake, scenario)


def test_requests_abandoned_behind_a_full_socket_are_cancelled_in_the_engine_or_never_sent(manifest):
    """Clients that leave while the engine's socket is full: what the engine was told of gets a
    CANCEL once the socket drains (none is dropped), and what it was not told of is never sent."""
    count, abandoned = 1200, [*range(10), *range(1190, 1200)]
    fake = FakeEngine(manifest, tensor_slots=count)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        requests = await _one_submit_each(fake, count)  # nobody reads them: the socket fills
        for i in abandoned:
            requests[i].cancel()
        await asyncio.sleep(0.1)
        submitted: dict[float, int] = {}
        cancelled: set[float] = set()
        live = set(range(count)) - set(abandoned)
        while not (live <= submitted.keys() and submitted.keys() - live <= cancelled):
            message = await asyncio.wait_for(loop.sock_recv(engine, MAX_MESSAGE), 10)
            if kind_of(message) == Kind.CANCEL:
                cancelled |= {fake.value(slot) for slot in parse_cancel(message)}
            else:
                for slot, _ in parse_submit(message)[1]:
                    assert fake.value(slot) not in submitted
                    submitted[fake.value(slot)] = slot
        assert cancelled and cancelled <= set(abandoned)  # the first ones were sent before their clients left
        await fake.answer(engine, [submitted[i] for i in sorted(cancelled)], Status.CANCELLED)
        await fake.answer(engine, [submitted[i] for i in sorted(live)])
        for i in sorted(live):
            assert (await requests[i] == i).all()

    serve(fake, scenario)


def test_an_engine_that_keeps_an_image_past_its_deadline_and_the_allowance_is_reported_stuck_once(manifest):
    """The request ends at its deadline (504) and cancels its image; an engine that answers neither
    the batch nor the CANCEL still holds it 0.3 s (VIT_ENGINE_STALL_S) later: the supervisor is told."""
    fake = FakeEngine(manifest, tensor_slots=2, engine_stall_s=0.3)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        request = fake.classify(1.0, within_s=0.2)
        assert kind_of(await loop.sock_recv(engine, MAX_MESSAGE)) == Kind.SUBMIT
        with pytest.raises(DeadlineExceeded):
            await request
        assert kind_of(await loop.sock_recv(engine, MAX_MESSAGE)) == Kind.CANCEL  # and never answered
        started = time.monotonic()
        while not fake.stalls and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        ((pid, images, late_s),) = fake.stalls
        assert pid == PID and images == 1 and late_s >= 0.3
        await asyncio.sleep(1.5)  # once per engine: the supervisor kills it, and the next is watched anew
        assert len(fake.stalls) == 1

    serve(fake, scenario)


def test_an_engine_that_answers_a_late_cancel_is_not_stuck(manifest):
    fake = FakeEngine(manifest, tensor_slots=2, engine_stall_s=0.3)

    async def scenario(engine: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        request = fake.classify(1.0, within_s=0.2)
        ((slot, _),) = parse_submit(await loop.sock_recv(engine, MAX_MESSAGE))[1]
        with pytest.raises(DeadlineExceeded):
            await request
        assert parse_cancel(await loop.sock_recv(engine, MAX_MESSAGE)) == [slot]
        await fake.answer(engine, [slot], Status.CANCELLED)
        await asyncio.sleep(2.0)
        assert fake.stalls == []
        second = fake.classify(2.0)
        ((slot_again, _),) = parse_submit(await loop.sock_recv(engine, MAX_MESSAGE))[1]
        await fake.answer(engine, [slot_again])
        assert (await second)[0] == 2.0

    serve(fake, scenario)
