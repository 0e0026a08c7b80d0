"""The contract between the front-ends and the engine: slots in one shared memory file, and the
small messages that pass a slot's ownership back and forth.

Memory. The supervisor creates the ring as an anonymous memfd before any other process starts,
and every child maps the file descriptor it inherits. A memfd has no name in /dev/shm, so the
kernel frees it with the last process that maps it: nothing can outlive the server, even after
`kill -9` of any of its processes. The file holds four regions:

    pixels   (image slots, H, W, C) uint8       written by a front-end's decoder, read by the engine
    tensors  (tensor slots, C, H, W) float32    already-normalised rows (the OIP FP32 input), likewise
    outputs  (all slots, row_floats) float32    every output row of the image, written by the engine
    admitted (partitions,) int64                the image slots each front-end holds, which every
                                                front-end sums to keep the one queue bound

Ownership. Front-end k owns partition k: its image slots and its tensor slots. It writes a slot's
input only while the slot is its own, then hands the slot to the engine with SUBMIT; from then on
only the engine touches it (reads the input, writes the output row) until it answers DONE for
that slot, which hands it back. Because ownership moves only with messages, no field of the
shared memory is ever written by two processes at once, and nothing needs a lock: a front-end
writes only its own `admitted` count, and the supervisor zeroes it once that front-end is dead. A
front-end that dies leaves its slots to the engine, which drops what is still queued and finishes
what is running before it welcomes that partition's next front-end.

Every partition has room for the whole queue, so the kernel's uneven spread of connections over
the front-ends does not refuse work while others have room: the bound is the sum of the counts.
Two front-ends admitting at the same instant may pass it by a request each; a partition's pages
are touched only as its slots are used (the free slots are stacks).

Messages travel over one SOCK_SEQPACKET Unix socket per front-end (message boundaries kept,
ordered, reliable), each a packed header and fixed-size records.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

from model_export.manifest import Manifest

_ALIGN = 64  # each region starts on a cache line


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def row_floats(manifest: Manifest) -> int:
    """Room for one image's row of every output of either graph: logits, embedding, and the
    explain graph's two maps and its share per prefix token. The engine checks the real rows
    against it at warm-up."""
    cfg = manifest.config
    grid = int(cfg.get("img_size", 0)) // max(1, int(cfg.get("patch_size", 1)))  # type: ignore[call-overload]
    embed = int(cfg.get("embed_dim", 0))  # type: ignore[call-overload]
    return manifest.num_classes + embed + 2 * grid * grid + len(manifest.prefix_tokens)


@dataclass(frozen=True)
class RingLayout:
    partitions: int  # one per front-end
    image_slots: int  # uint8 image slots per partition
    tensor_slots: int  # float32 tensor slots per partition
    pixel_shape: tuple[int, int, int]  # (H, W, C) of the model's input
    row_floats: int  # float32 values per slot for its output rows

    @classmethod
    def for_model(cls, manifest: Manifest, partitions: int, image_slots: int, tensor_slots: int) -> RingLayout:
        prep = manifest.preprocessing
        shape = (prep.image_size, prep.image_size, prep.channels)
        return cls(partitions, image_slots, tensor_slots, shape, row_floats(manifest))

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.pixel_shape
        return (channels, height, width)

    @property
    def total_images(self) -> int:
        return self.partitions * self.image_slots

    @property
    def total_slots(self) -> int:
        return self.partitions * (self.image_slots + self.tensor_slots)

    def image_slot_ids(self, partition: int) -> range:
        return range(partition * self.image_slots, (partition + 1) * self.image_slots)

    def tensor_slot_ids(self, partition: int) -> range:
        first = self.total_images + partition * self.tensor_slots
        return range(first, first + self.tensor_slots)

    def is_tensor(self, slot: int) -> bool:
        return slot >= self.total_images

    def _regions(self) -> tuple[int, int, int, int, int]:
        """Byte offsets of the pixels, tensors, outputs and admitted regions, and the file's size."""
        pixels = self.total_images * int(np.prod(self.pixel_shape))
        tensors = self.partitions * self.tensor_slots * int(np.prod(self.pixel_shape)) * 4
        outputs = self.total_slots * self.row_floats * 4
        tensors_at = _aligned(pixels)
        outputs_at = tensors_at + _aligned(tensors)
        admitted_at = outputs_at + _aligned(outputs)
        return 0, tensors_at, outputs_at, admitted_at, admitted_at + _aligned(self.partitions * 8)

    @property
    def nbytes(self) -> int:
        return self._regions()[4]

    def to_dict(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "image_slots": self.image_slots,
            "tensor_slots": self.tensor_slots,
            "pixel_shape": list(self.pixel_shape),
            "row_floats": self.row_floats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RingLayout:
        height, width, channels = data["pixel_shape"]
        return cls(
            int(data["partitions"]),
            int(data["image_slots"]),
            int(data["tensor_slots"]),
            (int(height), int(width), int(channels)),
            int(data["row_floats"]),
        )


class Ring:
    """One process's mapping of the ring, with numpy views on its four regions."""

    def __init__(self, layout: RingLayout, fd: int) -> None:
        self.layout = layout
        self.fd = fd
        self._map = mmap.mmap(fd, layout.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _, tensors_at, outputs_at, admitted_at, _ = layout._regions()
        buffer = memoryview(self._map)
        self.pixels = np.frombuffer(buffer, np.uint8, layout.total_images * int(np.prod(layout.pixel_shape)))
        self.pixels = self.pixels.reshape(layout.total_images, *layout.pixel_shape)
        tensor_count = layout.partitions * layout.tensor_slots
        self.tensors = np.frombuffer(buffer, np.float32, tensor_count * int(np.prod(layout.pixel_shape)), tensors_at)
        self.tensors = self.tensors.reshape(tensor_count, *layout.tensor_shape)
        self.outputs = np.frombuffer(buffer, np.float32, layout.total_slots * layout.row_floats, outputs_at)
        self.outputs = self.outputs.reshape(layout.total_slots, layout.row_floats)
        self.admitted = np.frombuffer(buffer, np.int64, layout.partitions, admitted_at)

    @classmethod
    def create(cls, layout: RingLayout) -> Ring:
        """A new anonymous ring; its descriptor is inheritable, for the children to map."""
        fd = os.memfd_create("vit-serve-ring", 0)  # without MFD_CLOEXEC: children inherit it
        os.ftruncate(fd, layout.nbytes)
        return cls(layout, fd)

    def tensor_index(self, slot: int) -> int:
        return slot - self.layout.total_images

    def gather_pixels(self, slots: Sequence[int], into: np.ndarray) -> None:
        """These slots' pixels into the first rows of `into`, in order: one plain slice copy each
        (memcpy, unlike np.take's loop)."""
        for index, slot in enumerate(slots):
            into[index] = self.pixels[slot]


class Kind(IntEnum):
    """The first byte of every message."""

    HELLO = 1  # front-end -> engine: I am partition k
    WELCOME = 2  # engine -> front-end: JSON about the engine (provider, output rows)
    SUBMIT = 3  # front-end -> engine: these slots are yours, for this graph, by these deadlines
    CANCEL = 4  # front-end -> engine: nobody waits for these any more
    DONE = 5  # engine -> front-end: these slots are yours again, with a status each


class Status(IntEnum):
    OK = 0  # the output row is written
    EXPIRED = 1  # the deadline passed while queued: never run
    CANCELLED = 2  # cancelled while queued: never run
    FAILED = 3  # the batch it ran in failed (the engine logs why)


class Graph(IntEnum):
    PLAIN = 0
    EXPLAIN = 1


_HEAD = struct.Struct("<BBH")  # kind, graph (SUBMIT) or 0, record count (or partition for HELLO)
_SUBMITTED = struct.Struct("<Id")  # slot, deadline (CLOCK_MONOTONIC seconds, the same in every process)
_CANCELLED = struct.Struct("<I")
_DONE = struct.Struct("<IBHff")  # slot, status, batch size, queue wait (s), batch inference (s)


class Done(NamedTuple):  # a tuple: the engine makes one per image, and a frozen dataclass costs 2 us each
    slot: int
    status: Status
    batch_size: int
    queue_wait_s: float
    inference_s: float


def hello(partition: int) -> bytes:
    return _HEAD.pack(Kind.HELLO, 0, partition)


def welcome(info_json: bytes) -> bytes:
    return _HEAD.pack(Kind.WELCOME, 0, 0) + info_json


def submit(graph: Graph, records: Sequence[tuple[int, float]]) -> bytes:
    """These slots, each with its request's deadline, for this graph."""
    return _HEAD.pack(Kind.SUBMIT, graph, len(records)) + b"".join(_SUBMITTED.pack(*r) for r in records)


def cancel(slots: list[int]) -> bytes:
    return _HEAD.pack(Kind.CANCEL, 0, len(slots)) + b"".join(_CANCELLED.pack(s) for s in slots)


def done(records: list[Done]) -> bytes:
    body = b"".join(_DONE.pack(*record) for record in records)
    return _HEAD.pack(Kind.DONE, 0, len(records)) + body


def kind_of(message: bytes) -> Kind:
    return Kind(message[0])


def parse_hello(message: bytes) -> int | None:
    """The partition a HELLO names; None for anything else."""
    if len(message) < _HEAD.size or message[0] != Kind.HELLO:
        return None
    partition: int = _HEAD.unpack_from(message)[2]
    return partition


def parse_welcome(message: bytes) -> bytes:
    return message[_HEAD.size :]


def _records(message: bytes, record: struct.Struct) -> Iterator[tuple[Any, ...]]:
    _, _, count = _HEAD.unpack_from(message)
    return record.iter_unpack(message[_HEAD.size : _HEAD.size + count * record.size])


def parse_submit(message: bytes) -> tuple[Graph, list[tuple[int, float]]]:
    return Graph(message[1]), list(_records(message, _SUBMITTED))


def parse_cancel(message: bytes) -> list[int]:
    return [slot for (slot,) in _records(message, _CANCELLED)]


def parse_done(message: bytes) -> list[Done]:
    return [Done(slot, Status(status), size, wait, run) for slot, status, size, wait, run in _records(message, _DONE)]
