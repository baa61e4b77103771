"""Weights from object storage: SmolLM2 uploaded to a real S3 server (s3s-fs, SigV4) through its
API with boto3, registered by URL with the Python client, and generating through
``offloadd.hf.from_daemon`` exactly as from the local checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import offloadd
import offloadd.hf
from conftest import PROMPTS, Reference, generate
from s3server import S3S_FS, SECRET, NO_SERVER, S3Server, remote_daemon

pytestmark = pytest.mark.skipif(not S3S_FS, reason=NO_SERVER)
BUCKET = "models"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "s3", [BUCKET])
    yield server
    server.stop()


def test_smollm2_generates_from_weights_streamed_from_s3(s3: S3Server, smol_dir: Path, reference: Reference,
                                                         tmp_path: Path) -> None:
    s3.client().upload_file(str(smol_dir / "model.safetensors"), BUCKET, "smol/model.safetensors")
    d = remote_daemon(s3, BUCKET, [str(smol_dir)], tmp_path)
    try:
        with offloadd.connect(d.uds) as c:
            size = os.path.getsize(smol_dir / "model.safetensors") + (1 << 20)
            c.create_pool("smol", size_bytes=size)
            with pytest.raises(offloadd.NotFound, match="missing"):
                c.register_model("gone", pool="smol", path=f"s3://{BUCKET}/missing/")
            with pytest.raises(offloadd.PermissionDenied, match="models.remotes"):
                c.register_model("elsewhere", pool="smol", path="s3://another-bucket/smol/")
            m = c.register_model("smol", pool="smol", path=f"s3://{BUCKET}/smol/")
            assert m.path == f"s3://{BUCKET}/smol/"
            [obj] = m.source_objects
            assert obj.url == f"s3://{BUCKET}/smol/model.safetensors" and obj.etag
            assert obj.size == os.path.getsize(smol_dir / "model.safetensors")
            # Config and tokenizer from the local directory; every weight from the daemon's pool.
            model = offloadd.hf.from_daemon(c, "smol", str(smol_dir), worker_name="pytest-s3")
            try:
                got = {p: generate(model, smol_dir, p) for p in PROMPTS}
            finally:
                model.offloadd_lease.close()
        reference.check("weights from s3://", got)
        d.log.seek(0)
        assert SECRET not in d.log.read(), "a credential reached the daemon's log"
    finally:
        assert d.stop() == 0
