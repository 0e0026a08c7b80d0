"""The engine alone, fed as fast as a front-end can: its own CPU per image, and so how many images
one engine process can hand to a GPU.

The bench takes the place of front-end 0: it fills that partition's slots once, then keeps a
fixed number of one-image requests in the engine: the slots of each DONE are sent again in one SUBMIT.
Beforehand it copies those slots into a batch itself, as the engine does, to show how much of the
engine's figure is that copy: memory bandwidth, which no bookkeeping can save.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.cpu import process_tree_cpu_seconds
from service.frontend.decode import Decoder
from service.settings import Settings
from service.shm_ring import Graph, Kind, Ring, Status, hello, kind_of, parse_done, submit
from service.supervisor import Supervisor


@dataclass(frozen=True)
class EngineLimit:
    in_flight: int
    max_batch_size: int
    images_per_s: float
    engine_cpu_us: float  # per image
    copy_us: float  # per image: the bench's own copy of the pixels into a batch, alone
    mean_batch: float


def measure(model_dir: Path, image: bytes, in_flight: int, max_batch_size: int, seconds: float) -> EngineLimit:
    settings = Settings(
        model_dir=model_dir,
        frontend_processes=1,
        max_batch_size=max_batch_size,
        max_queue_images=in_flight,
        max_images_per_request=1,
    )
    supervisor = Supervisor(settings, "127.0.0.1", 0)
    try:
        engine = supervisor.spawn("engine")
        supervisor.wait_ready([engine])
        ring = supervisor.ring
        slots = list(ring.layout.image_slot_ids(0))[:in_flight]
        decoder = Decoder.from_settings(supervisor.manifest.preprocessing, settings)
        for slot in slots:
            decoder.decode_into(image, ring.pixels[slot])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(supervisor.engine_address)
        sock.send(hello(0))
        if kind_of(sock.recv(1 << 16)) != Kind.WELCOME:
            raise RuntimeError("the engine did not welcome the bench")
        copy_us = _copy_alone_us(ring, slots, max_batch_size)
        return _drive(sock, slots, engine.process.pid, in_flight, max_batch_size, seconds, copy_us)
    finally:
        supervisor.stop()


def _copy_alone_us(ring: Ring, slots: list[int], batch: int, seconds: float = 1.0) -> float:
    """CPU per image of the engine's copy (Ring.gather_pixels) of these slots into batches, done here alone."""
    into = np.empty((batch, *ring.layout.pixel_shape), dtype=np.uint8)
    batches = [slots[start : start + batch] for start in range(0, len(slots), batch)]
    copied, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for members in batches:
            ring.gather_pixels(members, into)
        copied += len(slots)
    return 1e6 * (time.process_time() - started) / copied


def _drive(
    sock: socket.socket, slots: list[int], pid: int, in_flight: int, batch: int, seconds: float, copy_us: float
) -> EngineLimit:
    far = time.monotonic() + 3600
    for slot in slots:
        sock.send(submit(Graph.PLAIN, [(slot, far)]))
    images, batches = 0, 0.0
    cpu_before, started = process_tree_cpu_seconds(pid), time.monotonic()
    while (now := time.monotonic()) < started + seconds:
        records = parse_done(sock.recv(1 << 16))
        for record in records:
            if record.status != Status.OK:
                raise RuntimeError(f"slot {record.slot}: {record.status.name}")
            images += 1
            batches += 1 / record.batch_size  # each image carries its batch's size
        # In one SUBMIT, as a busy front-end sends the images that reached it in one turn of its loop.
        sock.send(submit(Graph.PLAIN, [(record.slot, far) for record in records]))
    cpu = process_tree_cpu_seconds(pid) - cpu_before
    elapsed = now - started
    engine_cpu_us = 1e6 * cpu / max(1, images)
    return EngineLimit(in_flight, batch, images / elapsed, engine_cpu_us, copy_us, images / max(1.0, batches))
