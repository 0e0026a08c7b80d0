"""schemathesis against the live server's own OpenAPI document: no 5xx, and responses as documented."""

import os
import subprocess
import sys
from pathlib import Path

from bench.server import run_server
from tests.conftest import REPO

CHECKS = "no_unplanned_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = 30  # per operation and phase: bounded, so CI time is too


def test_the_api_keeps_its_own_contract():
    st = str(Path(sys.executable).parent / "st")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks", "PYTHONPATH": str(REPO)}
    with run_server() as server:
        result = subprocess.run(
            [
                st,
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                "1",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=600,
        )
        assert server.process.poll() is None, "the server died under schemathesis"
        assert server.stop() == 0
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout
