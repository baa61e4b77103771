"""Starts the real offloadd binary for the Python tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def binary() -> Path:
    """$OFFLOADD_BIN, else the debug build (tests/run.sh builds it first)."""
    path = Path(os.environ.get("OFFLOADD_BIN") or REPO / "target" / "debug" / "offloadd")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `cargo build --bins` (tests/run.sh does)")
    return path


class Daemon:
    """One daemon process on a Unix socket (and TCP on port 0 when asked), in its own scratch
    directories, with the given model roots. Stop it with :meth:`stop`. A ``pools_dir`` the
    caller owns outlives the daemon, so the next one can adopt its pools."""

    def __init__(self, roots: list[str], tcp: bool = False, env: dict[str, str] | None = None,
                 args: list[str] | None = None, uds: str | None = None,
                 pools_dir: str | None = None) -> None:
        self.scratch = tempfile.TemporaryDirectory(prefix="offloadd-py-")
        self.pools = None if pools_dir else tempfile.TemporaryDirectory(prefix="offloadd-py-", dir="/dev/shm")
        pools = pools_dir or self.pools.name
        self.uds = uds or os.path.join(self.scratch.name, "offloadd.sock")
        cmd = [str(binary()), "serve", "--uds-path", self.uds, "--pools-dir", pools,
               "--set", f"models.roots={','.join(roots)}", *(args or [])]
        if tcp:
            cmd += ["--tcp-addr", "127.0.0.1:0"]
        full_env = {"PATH": os.environ.get("PATH", ""), "OFFLOADD_LOG": "warn", **(env or {})}
        self.log = open(os.path.join(self.scratch.name, "daemon.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=full_env, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"offloadd exited {self.proc.returncode} before ready:\n{self.log.read()}")
        ready = json.loads(line)
        assert ready["event"] == "ready", ready
        self.pid: int = ready["pid"]
        self.tcp: str | None = ready.get("tcp")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        if self.pools is not None:
            self.pools.cleanup()
        self.scratch.cleanup()
        return code
