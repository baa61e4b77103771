"""vLLM tests: vLLM 0.33's real loader, config and model classes on CPU, in engine processes of
their own (engine.py), against the real daemon. Run in the vLLM venv by tests/run.sh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from daemon import Daemon  # noqa: E402
from smollm2 import ensure  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_cmd(spec: dict) -> list[str]:
    return [sys.executable, str(HERE / "engine.py"), json.dumps({"port": free_port(), **spec})]


def run_engine(spec: dict, env: dict[str, str] | None = None) -> dict:
    """One engine start; its report (or {"error", "message"})."""
    out = subprocess.run(engine_cmd(spec), capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout + out.stderr[-2000:]
    lines[0]["stderr"] = out.stderr
    return lines[0]


@pytest.fixture(scope="session")
def ckpt() -> Path:
    return ensure()


@pytest.fixture(scope="session")
def default_digests(ckpt: Path) -> dict[str, str]:
    """vLLM's DefaultModelLoader: the parameters every other load must reproduce bit for bit."""
    r = run_engine({"ckpt": str(ckpt), "load_format": "auto"})
    assert r["outcome"] == "default" and len(r["digests"]) > 100
    return r["digests"]


@pytest.fixture(scope="session")
def daemon(ckpt: Path, default_digests: dict[str, str]) -> Iterator[Daemon]:
    """One daemon; the first engine start publishes SmolLM2 (checked in test_first_start)."""
    d = Daemon([str(ckpt)])
    yield d
    assert d.stop() == 0
