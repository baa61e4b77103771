"""A real S3 server for the object-storage tests and benchmark: s3s-fs (SigV4, a directory per
bucket), which tests/run.sh builds and names in $S3S_FS_BIN, and the daemon configuration that
allows its buckets."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from daemon import Daemon

S3S_FS = os.environ.get("S3S_FS_BIN")
NO_SERVER = "S3S_FS_BIN is unset: tests/run.sh builds the S3 server s3s-fs and sets it"
ACCESS, SECRET = "offloadd-py", "py-s3cr3t-never-logged"
REGION = "us-east-1"


class S3Server:
    """s3s-fs serving ``root`` (one directory per bucket, created here) on a free port of
    127.0.0.1. Stop it with :meth:`stop`."""

    def __init__(self, root: Path, buckets: list[str]) -> None:
        if not S3S_FS:
            raise RuntimeError(NO_SERVER)
        for b in buckets:
            (root / b).mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([S3S_FS, "--host", "127.0.0.1", "--port", str(port), "--access-key", ACCESS,
                                      "--secret-key", SECRET, str(root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # ready once it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("s3s-fs did not start") from None
                time.sleep(0.02)

    def client(self, secret: str = SECRET) -> Any:
        """A boto3 S3 client of this server (boto3 ships no type hints)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS, aws_secret_access_key=secret)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def remote_daemon(server: S3Server, bucket: str, roots: list[str], scratch: Path,
                  settings: list[str] | None = None) -> Daemon:
    """A daemon whose ``models.remotes`` allows ``s3://bucket/`` on ``server``, with the
    credentials in a file (as a Kubernetes Secret mounts them) and ``--set`` ``settings``."""
    creds = scratch / "s3.toml"
    creds.write_text(f'aws_access_key_id = "{ACCESS}"\naws_secret_access_key = "{SECRET}"\n')
    config = scratch / "offloadd.toml"
    config.write_text(
        f'[[models.remotes]]\nurl = "s3://{bucket}/"\ncredentials_file = "{creds}"\n'
        f'options = {{ aws_endpoint = "{server.endpoint}", aws_region = "{REGION}", allow_http = "true" }}\n'
    )
    args = ["--config", str(config)]
    for s in settings or []:
        args += ["--set", s]
    return Daemon(roots, args=args)
