"""`vit-bench peers`: check each server's answers, then time them in turns, one server up at a time.

Every server gets the same load generator (bench.load.wire_closed_loop, in its own process), the
same uploads, the same concurrency levels and the same windows as `vit-bench run` uses: at each
level a settle window (about one round trip of every client) and then a timed window. CPU time is
that of the server's whole process tree inside the timed window (bench.cpu).

Round after round, each server is started, timed at every level and stopped, the order reversed
each round: on a shared machine whose speed drifts by a third within minutes, one round is a
sample of one, and a drift that favours the first server of one round favours the last of the
next. Only the server being timed is up: some draw CPU while idle (LitServe's workers a quarter
of a core here, Ray Serve's a tenth), which would be taken from every other server's windows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import onnxruntime as ort
from PIL import Image

from bench.cpu import is_running, process_tree, process_tree_cpu_seconds
from bench.machine import cpu_info, describe_python, gpu_name
from bench.peers import ENTRIES, Peer, installed, load, multipart_request, results_top1
from bench.peers.common import free_port
from bench.peers.report import SERVICE, Gate, Level, PeersResult, System, check_gate
from bench.raw_limit import device_of, measure_layout, provider_for
from bench.server import run_server
from bench.throughput import measurable_levels, percentile, timed_windows
from model_export.manifest import Manifest
from service.settings import Settings, available_cores

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300  # Ray Serve on two busy cores takes a minute; a GPU peer loads CUDA
STOP_GRACE_S = 30  # after SIGTERM, before whatever is left of the tree is killed
FASHION_GATE_IMAGES = 100
# The service's batch limit on CPU, and its GPU image's (VIT_MAX_BATCH_SIZE=64): every peer gets the same.
CPU_MAX_BATCH = int(Settings.model_fields["max_batch_size"].default)
CUDA_MAX_BATCH = 64


class PeerError(RuntimeError):
    """A server that would not start, or gave an answer the bench cannot use."""


@dataclass(frozen=True)
class Uploads:
    images: list[bytes]
    content_type: str


def fashion_mnist_gate(count: int = FASHION_GATE_IMAGES) -> Uploads:
    """The first `count` Fashion-MNIST test images as PNGs (Debian's dataset-fashion-mnist)."""
    from model_export.fashion_mnist import load_split

    images, _ = load_split("test")
    encoded = []
    for pixels in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return Uploads(encoded, "image/png")


def exchange(url: str, requests: list[bytes], timeout_s: float = 60) -> list[tuple[int, bytes]]:
    """Send prebuilt requests one after another on one keep-alive connection, as the load generator
    does, and read each answer the way it does (by Content-Length)."""
    parts = urlsplit(url)
    answers = []
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as connection:
        stream = connection.makefile("rb")
        for request in requests:
            connection.sendall(request)
            status_line = stream.readline()
            if not status_line:
                raise PeerError("closed the connection instead of answering")
            headers = {}
            while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" not in headers:
                raise PeerError(f"answered without Content-Length ({headers}): the load generator cannot time it")
            answers.append((int(status_line.split()[1]), stream.read(int(headers["content-length"]))))
    return answers


def top1_of(url: str, peer: Peer, gate: Uploads, per_request: int) -> list[int]:
    """The server's top-1 for every gate image, sent `per_request` images to a request."""
    chunks = [gate.images[i : i + per_request] for i in range(0, len(gate.images), per_request)]
    answers = []
    for status, body in exchange(url, [peer.request(url, chunk, gate.content_type) for chunk in chunks]):
        if status != 200:
            raise PeerError(f"answered {status}: {body[:300]!r}")
        answers += peer.top1(body)
    return answers


@dataclass(frozen=True)
class Running:
    url: str
    pid: int  # the root of its process tree
    log: Path


def kill_survivors(pids: list[int], wait_s: float = 10) -> list[int]:
    """SIGKILL each of `pids` still running, children first, and wait until they are gone; the
    ones that were still running."""
    survivors = [pid for pid in reversed(pids) if is_running(pid)]
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while any(is_running(pid) for pid in survivors) and time.monotonic() < deadline:
        time.sleep(0.1)
    return survivors


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM the root and give it the grace to stop its own processes; then kill what is left
    of its tree and of its session (Ray's raylet and GCS, workers that outlived their parent)."""
    tree = process_tree(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop within %d s of SIGTERM", process.pid, STOP_GRACE_S)
    survivors = kill_survivors([pid for pid in tree if pid != process.pid] + process_tree(process.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the session it was started in (start_new_session)
    process.wait()
    if survivors:
        logger.info("killed %d process(es) still running after pid %d stopped", len(survivors), process.pid)


@contextmanager
def run_peer(peer: Peer, model_dir: Path, device: str, workers: int, max_batch: int, log: Path) -> Iterator[Running]:
    """The peer as a process tree on a free loopback port; yields its URL; always stopped."""
    port = free_port()
    command = [sys.executable, "-m", peer.module, "--model", str(model_dir), "--device", device]
    command += ["--port", str(port), "--workers", str(workers), "--max-batch-size", str(max_batch)]
    with log.open("ab") as output:  # every start of a run in one log
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Running(f"http://127.0.0.1:{port}", process.pid, log)
    finally:
        stop(process)


def wait_ready(running: Running, request: bytes) -> None:
    """Until the server answers `request` with 200 (its model loaded, its route up)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if not is_running(running.pid):
            raise PeerError(f"exited while starting; its log: {running.log}")
        try:
            if exchange(running.url, [request])[0][0] == 200:
                return
        except (OSError, PeerError, ValueError):
            pass  # not listening yet, or still loading
        if time.monotonic() > deadline:
            raise PeerError(f"no 200 within {STARTUP_TIMEOUT_S} s; its log: {running.log}")
        time.sleep(0.5)


@dataclass(frozen=True)
class Contender:
    """A server up and ready to be timed, and the request it is timed with."""

    name: str
    url: str
    pid: int
    request: bytes


@dataclass(frozen=True)
class Entrant:
    """A server that passed the gate: its name, and how to bring it up (stopped on exit)."""

    name: str
    start: Callable[[], AbstractContextManager[Contender]]


def measure(
    contender: Contender, per_request: int, clients: int, seconds: float, limit: float, round_: int
) -> Level | None:
    """One level as bench.throughput measures the service's, with the CPU time of the server's
    process tree sampled as the timed window opens and closes; None if nothing finished inside it."""

    def sample() -> tuple[float]:
        return (process_tree_cpu_seconds(contender.pid),)

    window = next(timed_windows(contender.url, contender.request, [clients], seconds, per_request, limit, sample), None)
    if window is None:
        return None
    latencies = window.latencies_ms()
    level = Level(
        contender.name,
        window.clients,
        len(window.answered) * per_request / seconds,
        percentile(latencies, 50),
        percentile(latencies, 99),
        window.errors,
        len(window.answered),
        window.spent[0],
        round_,
    )
    logger.info("round %d, %s c=%d: %.1f images/s", round_ + 1, contender.name, clients, level.images_per_s)
    return level


def take_turns(
    entrants: list[Entrant], levels: list[int], rounds: int, time_one: Callable[[Contender, int, int], Level | None]
) -> tuple[list[Level], dict[str, str]]:
    """Each entrant up in turn and timed at every level, round after round, the order reversed each
    round; the levels, and why each server that broke (would not start again, or failed under
    load) was left out: it keeps no figures."""
    timed: list[Level] = []
    broken: dict[str, str] = {}
    for round_ in range(rounds):
        for entrant in entrants if round_ % 2 == 0 else entrants[::-1]:
            if entrant.name in broken:
                continue
            try:
                with entrant.start() as contender:
                    for clients in levels:
                        if (level := time_one(contender, clients, round_)) is None:
                            break  # nothing finished in the window: more clients would read as worse still
                        timed.append(level)
            except Exception as exc:  # a peer that breaks must not take the others' figures with it
                logger.exception("%s broke while timed", entrant.name)
                broken[entrant.name] = repr(exc)
    return [level for level in timed if level.system not in broken], broken


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def run_peers(
    model_dir: Path,
    device: str,
    levels: list[int],
    seconds: float,
    upload: bytes,
    upload_words: str,
    gate: Uploads,
    images_per_request: int = 1,
    only: list[str] | None = None,
    logs: Path = Path("bench-results/peers/logs"),
    rounds: int = 1,
) -> PeersResult:
    """The service and each peer in `only` (default: all), on the same device and load."""
    manifest = Manifest.read(model_dir)
    prep = manifest.preprocessing
    provider = provider_for(device)
    device = device_of(provider)
    cores = available_cores()
    workers = 1 if device == "cuda" else cores
    max_batch = CUDA_MAX_BATCH if device == "cuda" else CPU_MAX_BATCH
    limit_batch = max_batch if device == "cuda" else 1
    shape = (prep.image_size, prep.image_size, prep.channels)
    limit = measure_layout(model_dir / manifest.onnx_file, shape, workers, 1, limit_batch, min(seconds, 2.0), provider)
    measured = measurable_levels(levels, limit.images_per_s / images_per_request, seconds)
    cpu, flags = cpu_info()
    result = PeersResult(
        model=manifest.name,
        variant=manifest.variant,
        device=device,
        machine={
            "cpu": cpu,
            "cores": cores,
            "kernel_flags": flags,
            "gpu": gpu_name() if device == "cuda" else None,
            "python": describe_python(),
        },
        onnxruntime=ort.__version__,
        upload=upload_words,
        images_per_request=images_per_request,
        limit_images_per_s=limit.images_per_s,
        limit_layout=f"{workers} session(s) x 1 thread, batch {limit_batch}",
        skipped_levels=[level for level in levels if level not in measured],
        rounds=rounds,
    )
    logs.mkdir(parents=True, exist_ok=True)
    uploads = [upload] * images_per_request
    # As vit-bench run starts it, with the batch limit every peer gets said aloud.
    queue = max(256, 4 * max(measured) * images_per_request)
    settings: dict[str, object] = {
        "providers": device,
        "require_requested_provider": True,
        "max_queue_images": queue,
        "max_batch_size": max_batch,
    }
    service = Peer(SERVICE, "vit-serve", "service.cli", multipart_request, results_top1, lambda *_: "")

    @contextmanager
    def service_up() -> Iterator[Contender]:
        with run_server(model_dir, None, **settings) as server:
            try:
                yield Contender(
                    SERVICE, server.url, server.process.pid, multipart_request(server.url, uploads, "image/jpeg")
                )
            finally:
                stop(server.process)  # SIGTERM, then whatever of its tree is left

    @contextmanager
    def peer_up(peer: Peer, batch_limit: int, log: Path) -> Iterator[Contender]:
        with run_peer(peer, model_dir, device, workers, batch_limit, log) as running:
            wait_ready(running, peer.request(running.url, gate.images[:images_per_request], gate.content_type))
            yield Contender(peer.name, running.url, running.pid, peer.request(running.url, uploads, "image/jpeg"))

    with service_up() as up:
        reference = top1_of(up.url, service, gate, images_per_request)
    words = ", ".join(f"VIT_{key.upper()}={value}" for key, value in settings.items())
    result.systems.append(System(SERVICE, _version("vit-serve"), f"its defaults, and {words}"))
    entrants = [Entrant(SERVICE, service_up)]
    for entry in ENTRIES:
        if only and entry.name not in only:
            continue
        if not installed(entry):
            result.systems.append(System(entry.name, "-", "-", note="not installed here: make bench-peers"))
            continue
        peer = load(entry)
        batch_limit = peer.batch_limit(max_batch, images_per_request)
        system = System(peer.name, _version(peer.distribution), peer.describe(workers, batch_limit, device))
        log = logs / f"{peer.name}.log"
        log.write_bytes(b"")
        logger.info("starting %s (log: %s)", peer.name, log)
        try:
            with peer_up(peer, batch_limit, log) as up:
                checked = check_gate(peer.name, reference, top1_of(up.url, peer, gate, images_per_request))
        except PeerError as exc:
            checked = Gate(peer.name, len(reference), len(reference), error=str(exc))
        logger.info("%s: %s", peer.name, checked.verdict)
        result.systems.append(replace(system, gate=checked))
        if checked.passed:  # a server that answered the gate wrong, or not at all, is never timed
            entrants.append(Entrant(peer.name, partial(peer_up, peer, batch_limit, log)))

    def time_one(contender: Contender, clients: int, round_: int) -> Level | None:
        return measure(contender, images_per_request, clients, seconds, limit.images_per_s, round_)

    result.levels, broken = take_turns(entrants, measured, rounds, time_one)
    for name, why in broken.items():
        index = next(i for i, s in enumerate(result.systems) if s.name == name)
        result.systems[index] = replace(
            result.systems[index], note=f"passed the gate, then broke: {why}; its log: {logs / f'{name}.log'}"
        )
    return result
