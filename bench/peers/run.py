"""`vit-bench peers`: start each server, check its answers, time it, stop it; the service first.

Every server gets the same load generator (bench.load.wire_closed_loop, in its own process), the
same uploads, the same concurrency levels and the same windows as `vit-bench run` uses: at each
level a settle window (about one round trip of every client) and then a timed window. CPU time is
that of the server's whole process tree inside the timed window (bench.cpu).
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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import onnxruntime as ort
from PIL import Image

from bench.cpu import is_running, process_tree, process_tree_cpu_seconds
from bench.machine import cpu_info, gpu_name
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
    with log.open("wb") as output:
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


def measure(
    system: str, url: str, request: bytes, per_request: int, levels: list[int], seconds: float, limit: float, pid: int
) -> list[Level]:
    """Each level as bench.throughput measures the service's, with the CPU time of the server's
    process tree sampled as the timed window opens and closes."""
    results = []
    windows = timed_windows(url, request, levels, seconds, per_request, limit, lambda: (process_tree_cpu_seconds(pid),))
    for window in windows:
        latencies = window.latencies_ms()
        results.append(
            Level(
                system,
                window.clients,
                len(window.answered) * per_request / seconds,
                percentile(latencies, 50),
                percentile(latencies, 99),
                window.errors,
                len(window.answered),
                window.spent[0],
            )
        )
        logger.info("%s c=%d: %.1f images/s", system, window.clients, results[-1].images_per_s)
    return results


def gate_then_time(gate: Gate, time_it: Callable[[], list[Level]]) -> list[Level]:
    """A server that answered the gate wrong, or not at all, is never timed."""
    return time_it() if gate.passed else []


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
) -> PeersResult:
    """The service, then each peer in `only` (default: all), on the same device and load."""
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
        machine={"cpu": cpu, "cores": cores, "kernel_flags": flags, "gpu": gpu_name() if device == "cuda" else None},
        onnxruntime=ort.__version__,
        upload=upload_words,
        images_per_request=images_per_request,
        limit_images_per_s=limit.images_per_s,
        limit_layout=f"{workers} session(s) x 1 thread, batch {limit_batch}",
        skipped_levels=[level for level in levels if level not in measured],
    )
    logs.mkdir(parents=True, exist_ok=True)
    uploads = [upload] * images_per_request

    def timing(url: str, peer_request: Callable[[str, list[bytes], str], bytes], name: str, pid: int) -> list[Level]:
        request = peer_request(url, uploads, "image/jpeg")
        return measure(name, url, request, images_per_request, measured, seconds, limit.images_per_s, pid)

    # As vit-bench run starts it, with the batch limit every peer gets said aloud.
    queue = max(256, 4 * max(measured) * images_per_request)
    settings: dict[str, object] = {
        "providers": device,
        "require_requested_provider": True,
        "max_queue_images": queue,
        "max_batch_size": max_batch,
    }
    with run_server(model_dir, None, **settings) as server:
        try:
            service = Peer(SERVICE, "vit-serve", "service.cli", multipart_request, results_top1, lambda *_: "")
            reference = top1_of(server.url, service, gate, images_per_request)
            words = ", ".join(f"VIT_{key.upper()}={value}" for key, value in settings.items())
            result.systems.append(System(SERVICE, _version("vit-serve"), f"its defaults, and {words}"))
            result.levels += timing(server.url, multipart_request, SERVICE, server.process.pid)
        finally:
            stop(server.process)

    for entry in ENTRIES:
        if only and entry.name not in only:
            continue
        if not installed(entry):
            result.systems.append(System(entry.name, "-", "-", note="not installed here: make bench-peers"))
            continue
        peer = load(entry)
        system = System(peer.name, _version(peer.distribution), peer.describe(workers, max_batch, device))
        log = logs / f"{peer.name}.log"
        logger.info("starting %s (log: %s)", peer.name, log)
        with run_peer(peer, model_dir, device, workers, max_batch, log) as running:
            try:
                wait_ready(running, peer.request(running.url, gate.images[:images_per_request], gate.content_type))
                checked = check_gate(peer.name, reference, top1_of(running.url, peer, gate, images_per_request))
            except PeerError as exc:
                checked = Gate(peer.name, len(reference), len(reference), error=str(exc))
            logger.info("%s: %s", peer.name, checked.verdict)
            note, time_it = None, partial(timing, running.url, peer.request, peer.name, running.pid)
            try:
                result.levels += gate_then_time(checked, time_it)
            except Exception as exc:  # a peer that breaks under load must not take the others' figures with it
                logger.exception("%s broke while timed", peer.name)
                note = f"passed the gate, then broke under load: {exc!r}; its log: {log}"
            result.systems.append(replace(system, gate=checked, note=note))
    return result
