"""Pin what the service runs on: write constraints.txt, or check that it still pins everything.

    python docker/lock.py            resolve '.[cpu]' and '.[gpu]' afresh (newest in pyproject's
                                     ranges) and write every package of both to constraints.txt
    python docker/lock.py --check    resolve both under constraints.txt; exit 1 naming any package
                                     it does not pin or pins for nothing, or any pin outside the
                                     ranges of what requires it (pip then cannot resolve)

pip resolves without installing (`--dry-run --report`). The CUDA and cuDNN wheels of the gpu extra
are left to docker/Dockerfile.gpu, which pins them: the test environment's torch needs other
versions of some of them, and constraints.txt must install beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
EXTRAS = ("cpu", "gpu")
PROJECT = "vit-serve"
HEADER = """\
# The exact versions the service runs on: everything `pip install '.[cpu]'` or '.[gpu]' brings,
# but the CUDA and cuDNN wheels, which docker/Dockerfile.gpu pins. `make serve`, `make test` (so
# CI) and both images install with `-c constraints.txt`: an image built later installs what CI
# tested, and a new release of a dependency (uvicorn's protocol class is subclassed) reaches them
# only through `make lock`. pyproject.toml keeps ranges, for installs into other environments.
# Written by `make lock` (docker/lock.py) on Python 3.11; tests/test_packaging.py checks it.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_by_the_gpu_image(name: str) -> bool:
    return name.startswith("nvidia-")


def resolve(extra: str, constraints: Path | None = None) -> dict[str, str]:
    """Every package pip would install for the extra (the project itself and CUDA wheels left out)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        command += ["--report", str(report), f"{REPO}[{extra}]"]
        if constraints is not None:
            command += ["--constraint", str(constraints)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            # pip explains a conflict on stdout, after its progress lines.
            start = done.stdout.find("The conflict is caused by")
            why = done.stdout[start:] if start >= 0 else ""
            raise SystemExit(f"pip cannot resolve '.[{extra}]':\n{done.stderr.strip()}\n{why.strip()}")
        installs = json.loads(report.read_text())["install"]
    found = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}
    return {name: version for name, version in found.items() if name != PROJECT and not pinned_by_the_gpu_image(name)}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def write() -> None:
    resolved: dict[str, str] = {}
    for extra in EXTRAS:
        for name, version in resolve(extra).items():
            if resolved.setdefault(name, version) != version:
                raise SystemExit(f"{name}: the extras resolve to {resolved[name]} and {version}; pin one in pyproject")
    lines = [f"{name}=={version}" for name, version in sorted(resolved.items())]
    CONSTRAINTS.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{CONSTRAINTS.name}: {len(lines)} packages")


def check() -> list[str]:
    """What is wrong with constraints.txt; empty when it pins every package of the extras, and no other."""
    pins = read_pins(CONSTRAINTS)
    problems, installed = [], set()
    for extra in EXTRAS:
        for name, version in resolve(extra, CONSTRAINTS).items():
            installed.add(name)
            if name not in pins:
                problems.append(f"'.[{extra}]' installs {name} {version}, which constraints.txt does not pin")
    problems += [f"constraints.txt pins {name}, which no extra installs" for name in sorted(pins.keys() - installed)]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="check constraints.txt instead of writing it")
    if not parser.parse_args().check:
        write()
        return
    problems = check()
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit("constraints.txt is out of date: run `make lock`")
    print("constraints.txt pins every package of '.[cpu]' and '.[gpu]'")


if __name__ == "__main__":
    main()
