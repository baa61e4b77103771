"""What one party sharing the daemon can do to another, from the Python client: a publication
is written through the daemon and closed by its seal, and a model whose bytes changed behind the
daemon's back is taken out of service, which its leases learn at their next renewal."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import offloadd
from daemon import Daemon

pb = offloadd.v1.offloadd_pb2


def test_a_publication_is_written_by_the_daemon_and_closed_by_its_seal(client: offloadd.Client) -> None:
    client.create_pool("q", size_bytes=1 << 20)
    specs = [pb.TensorSpec(name="a", dtype="F32", shape=[3, 1000]), pb.TensorSpec(name="b", dtype="U8", shape=[5])]
    created = client.create_model("pub", pool="q", tensors=specs)
    assert len(created.publish_token) == 32
    a = np.arange(3000, dtype=np.float32).reshape(3, 1000)
    b = bytes([1, 2, 3, 4, 5])
    # 12 kB of a go in one message, and both tensors in one call.
    assert client.write_model(created, [("a", a), ("b", b)]) == 12_005
    with pytest.raises(offloadd.PermissionDenied, match="publish_token"):
        client.seal_model("pub", "0" * 32)
    sealed = client.seal_model("pub", created.publish_token)
    assert sealed.state == pb.MODEL_STATE_READY and sealed.durable
    assert not client.get_model("pub").publish_token, "only CreateModel answers the token"
    with pytest.raises(offloadd.FailedPrecondition, match="sealed"):
        client.write_model(created, [("b", b)])
    with client.attach("pub") as lease:
        assert np.array_equal(lease.numpy("a"), a)
        assert lease.numpy("b").tobytes() == b
    # The pool file is the daemon's to write: 0640, whatever the umask.
    assert Path(client.get_pool("q").path).stat().st_mode & 0o777 == 0o640


def test_a_model_whose_bytes_changed_is_taken_out_of_service(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    save_file({"model.layers.0.w": np.arange(4096, dtype=np.float32)}, str(ckpt))
    d = Daemon([str(tmp_path)], args=["--set", "models.scrub_bytes_per_second=1073741824"])
    try:
        with offloadd.connect(d.uds) as client:
            client.create_pool("p", size_bytes=1 << 20)
            client.register_model("m", pool="p", path=str(ckpt))
            lease = client.attach("m", ttl=60)
            t = client.get_model("m", include_tensors=True).tensors[0]
            with open(client.get_pool("p").path, "r+b") as f:  # root, behind the daemon's back
                f.seek(t.offset + 100)
                f.write(b"\xff\xff\xff\xff")
            deadline = time.monotonic() + 60
            while client.get_model("m").state != pb.MODEL_STATE_FAILED:
                assert time.monotonic() < deadline, "the scrubber did not notice"
            m = client.get_model("m")
            assert "out of service" in m.error and "model.layers.0.w" in m.error
            with pytest.raises(offloadd.LeaseLost, match="out of service"):
                lease.renew()
            assert not lease.alive
            assert client.get_model("m").attached_workers == 0, "the lease detached itself"
            with pytest.raises(offloadd.FailedPrecondition):
                client.attach("m")
            assert client.get_info().scrub.out_of_service == ["m"]
    finally:
        assert d.stop() == 0
