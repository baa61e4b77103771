"""vLLM's first start reading SmolLM2's weights from a model the daemon streamed from S3
(s3s-fs, SigV4), its model directory holding only the config and tokenizer: the node's one copy
of a checkpoint from object storage feeds the engine, which publishes; the next start attaches.
Both generate what vLLM's own disk load generates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import offloadd
from conftest import compare, offloadd_spec, run_llm
from s3server import NO_SERVER, S3S_FS, S3Server, remote_daemon


@pytest.mark.skipif(not S3S_FS, reason=NO_SERVER)
def test_first_start_reads_the_weights_the_daemon_streamed_from_s3(ckpt: Path, disk: dict, tmp_path: Path) -> None:
    server = S3Server(tmp_path / "s3", ["models"])
    try:
        # A bucket is a directory of the server's root; the object is served (ETag and all)
        # through the S3 API the daemon speaks.
        (tmp_path / "s3" / "models" / "smol").mkdir()
        shutil.copy(ckpt / "model.safetensors", tmp_path / "s3" / "models" / "smol" / "model.safetensors")
        meta = tmp_path / "smol"
        shutil.copytree(ckpt, meta, ignore=shutil.ignore_patterns("*.safetensors"))
        d = remote_daemon(server, "models", [str(meta)], tmp_path)
        try:
            with offloadd.connect(d.uds) as c:
                size = (ckpt / "model.safetensors").stat().st_size + (1 << 20)
                c.create_pool("checkpoints", size_bytes=size)
                c.register_model("smol-s3", pool="checkpoints", path="s3://models/smol/")
            spec = offloadd_spec(meta, d.uds, extra={"weights": "smol-s3"})
            first = run_llm(spec)
            assert "read the checkpoint from the daemon's model smol-s3" in first["log"], first["log"][-3000:]
            assert "offloadd: published" in first["log"]
            print(f"\nfirst start from s3: logprobs within {compare(first, disk):.3g} of vLLM's disk load")
            second = run_llm(spec)
            assert "offloadd: attached" in second["log"], second["log"][-3000:]
            print(f"second start: logprobs within {compare(second, disk):.3g}")
            # Without the model, the engine says what to do instead of looking for files.
            with offloadd.connect(d.uds) as c:
                for m in c.list_models():
                    c.unregister_model(m.name)
            gone = run_llm(spec, ok=False)
            assert "register the checkpoint first" in gone["log"], gone["log"][-3000:]
        finally:
            assert d.stop() == 0
    finally:
        server.stop()
