"""Run `vit-serve` as a separate process on loopback, for the benchmarks and the tests."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.settings import DEFAULT_MODEL_DIR

STARTUP_TIMEOUT_S = 120


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def _pump(stream: io.TextIOBase, lines: list[str], announced: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.append(line)
        if "running on http://" in line:  # vit-serve's supervisor, or a plain uvicorn (the baseline)
            announced.put(line)
    announced.put(None)  # the process closed its output: it has exited


@contextmanager
def run_server(
    model_dir: Path = DEFAULT_MODEL_DIR, environment: dict[str, str] | None = None, **settings: object
) -> Iterator[ServerProcess]:
    """`vit-serve` on 127.0.0.1 and a free port, with VIT_* settings from keywords (and any other
    variables from `environment`); killed on exit if still running."""
    command = ["-m", "service.cli", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
    env = {**(environment or {}), **{f"VIT_{k.upper()}": str(v) for k, v in settings.items()}}
    with run_uvicorn_process(command, env) as server:
        yield server


@contextmanager
def run_uvicorn_process(python_args: list[str], env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`python <python_args>` serving with uvicorn on 127.0.0.1:0; the port is read from uvicorn's own log line."""
    process = subprocess.Popen(
        [sys.executable, *python_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    announced: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stdout, lines, announced), daemon=True)
    reader.start()
    try:
        try:
            line = announced.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError("server did not start in time:\n" + "".join(lines)) from None
        if line is None:
            raise RuntimeError(f"server exited with {process.wait()}:\n" + "".join(lines))
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1)  # type: ignore[union-attr]
        yield ServerProcess(process, f"http://127.0.0.1:{port}", lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]
