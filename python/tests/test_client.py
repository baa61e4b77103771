"""The client against the real daemon: every RPC, errors with the daemon's message, leases,
zero-copy views, the onload fast path and its RPC fallback over TCP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import offloadd
from daemon import Daemon

LAYERS = 5


def tiny_checkpoint(root: Path) -> dict[str, np.ndarray]:
    """Five 'layers' of two tensors each, plus an embedding; every byte distinct per layer."""
    tensors = {"model.embed_tokens.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
    for layer in range(LAYERS):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = np.full((32, 32), layer, np.float32)
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = np.full((32, 16), -layer, np.float16)
    save_file(tensors, str(root / "tiny.safetensors"))
    return tensors


def register(client: offloadd.Client, root: Path, backend=None, name: str = "tiny") -> dict[str, np.ndarray]:
    tensors = tiny_checkpoint(root)
    try:
        client.create_pool("p", size_bytes=1 << 20)
    except offloadd.AlreadyExists:
        pass
    client.register_model(name, pool="p", path=str(root / "tiny.safetensors"), backend=backend)
    return tensors


def test_every_rpc_round_trips(client: offloadd.Client, tmp_path: Path):
    info = client.get_info()
    assert info.devices[0].id == "cpu"
    pool = client.create_pool("p", size_bytes=1 << 20)
    assert pool.size_bytes == 1 << 20 and client.get_pool("p").name == "p"
    assert [p.name for p in client.list_pools()] == ["p"]
    seen: list[int] = []
    tiny_checkpoint(tmp_path)
    m = client.register_model("tiny", pool="p", path=str(tmp_path / "tiny.safetensors"),
                              backend=offloadd.prefetch(1, 1, 2), progress=lambda u: seen.append(u.state))
    assert m.state == offloadd.v1.offloadd_pb2.MODEL_STATE_READY
    assert seen[-1] == offloadd.v1.offloadd_pb2.MODEL_STATE_READY
    assert m.load_seconds > 0, "a model loaded from a checkpoint says how long its bytes took"
    assert [x.name for x in client.list_models()] == ["tiny"]
    full = client.get_model("tiny", include_tensors=True)
    assert {t.layer for t in full.tensors if t.HasField("layer")} == set(range(LAYERS))
    assert client.set_backend("tiny", offloadd.uva(0)).backend.HasField("uva")
    assert client.unregister_model("tiny").name == "tiny"
    assert client.delete_pool("p").name == "p"
    spec = offloadd.v1.offloadd_pb2.TensorSpec(name="w", dtype="F32", shape=[4])
    client.create_pool("q", size_bytes=1 << 16)
    created = client.create_model("pub", pool="q", tensors=[spec])
    assert created.state == offloadd.v1.offloadd_pb2.MODEL_STATE_AWAITING_SEAL
    # A pair that does not fit the table is refused by name before anything more is sent.
    with pytest.raises(offloadd.InvalidArgument, match="has no tensor 'v'"):
        client.write_model(created, [("v", np.arange(4, dtype=np.float32))])
    with pytest.raises(offloadd.InvalidArgument, match="16 bytes in the table, 12 given"):
        client.write_model(created, [("w", np.arange(3, dtype=np.float32))])
    assert client.write_model(created, [("w", np.arange(4, dtype=np.float32))]) == 16
    assert client.seal_model("pub", created.publish_token).state == offloadd.v1.offloadd_pb2.MODEL_STATE_READY


def test_a_mixture_of_experts_model_is_published_in_pages(client: offloadd.Client):
    # 200k specs (12 MB) and their table (18 MB), each far over one 4 MiB message: the client
    # sends and reads both in pages.
    n = 200_000
    specs = [
        offloadd.v1.offloadd_pb2.TensorSpec(
            name=f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w", dtype="U8", shape=[4]
        )
        for i in range(n)
    ]
    client.create_pool("moe", size_bytes=64 << 20)
    created = client.create_model("moe", pool="moe", tensors=specs)
    assert created.tensor_count == n and not created.next_page_token
    assert [t.name for t in created.tensors] == [s.name for s in specs]
    assert len({t.offset for t in created.tensors}) == n



def test_specs_and_tables_of_long_names_are_paged_by_bytes(client: offloadd.Client):
    # 6,000 names of 3,000 bytes: 18 MB of specs, over the daemon's 16 MiB request limit in one
    # message of 10,000, and a table of the same size. Both go in pages under 4 MiB.
    n = 6_000
    specs = [
        offloadd.v1.offloadd_pb2.TensorSpec(name=f"experts.{i}.".ljust(3000, "x"), dtype="U8", shape=[4])
        for i in range(n)
    ]
    assert len(offloadd.client._pages(specs)) > 1
    assert all(sum(s.ByteSize() for s in p) < 3 << 20 for p in offloadd.client._pages(specs))
    client.create_pool("long", size_bytes=8 << 20)
    created = client.create_model("long", pool="long", tensors=specs)
    assert [t.name for t in created.tensors] == [s.name for s in specs]
    client.seal_model("long", created.publish_token)
    with client.attach("long") as lease:
        assert list(lease.tensors) == [s.name for s in specs]

def test_errors_carry_the_daemons_message(client: offloadd.Client, tmp_path: Path):
    with pytest.raises(offloadd.NotFound, match="nope"):
        client.attach("nope")
    with pytest.raises(offloadd.NotFound):
        client.get_pool("nope")
    client.create_pool("p", size_bytes=1 << 20)
    with pytest.raises(offloadd.AlreadyExists, match="p"):
        client.create_pool("p", size_bytes=1 << 20)
    with pytest.raises(offloadd.ResourceExhausted):
        client.create_pool("huge", size_bytes=1 << 60)
    with pytest.raises(offloadd.PermissionDenied):
        client.register_model("etc", pool="p", path="/etc/hostname")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(offloadd.InvalidArgument, match="bad.safetensors") as e:
        client.register_model("bad", pool="p", path=str(tmp_path / "bad.safetensors"))
    assert isinstance(e.value, offloadd.OffloaddError) and e.value.message in str(e.value)
    with pytest.raises(offloadd.InvalidArgument):
        client.set_backend("x", offloadd.v1.offloadd_pb2.Backend())
    # A 16 KiB name is refused with its own error, the echo clipped to fit an HTTP/2 header.
    with pytest.raises(offloadd.InvalidArgument, match="more bytes cut") as e:
        client.create_pool("n" * 16384, size_bytes=1 << 20)
    assert len(e.value.message) < 1200
    client.get_info()  # still serving


def test_a_tcp_listener_with_a_token_needs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    token = "py-" + "0123456789abcdef" * 2
    (tmp_path / "token").write_text(token + "\n")
    d = Daemon([str(tmp_path)], tcp=True, args=["--set", f"server.auth_token_file={tmp_path / 'token'}"])
    try:
        with offloadd.connect(d.tcp) as c, pytest.raises(offloadd.Unauthenticated, match="bearer token"):
            c.get_info()
        with offloadd.connect(d.tcp, token=token) as c:
            c.create_pool("p", size_bytes=1 << 20)
            with pytest.raises(offloadd.NotFound):  # the stream carries the token too
                list(c.watch_model("nope-missing", timeout=5))
        monkeypatch.setenv("OFFLOADD_TOKEN_FILE", str(tmp_path / "token"))
        with offloadd.connect(d.tcp) as c:
            assert [p.name for p in c.list_pools()] == ["p"]
        with offloadd.connect(d.uds) as c:
            c.get_info()  # the Unix socket is guarded by its mode, not the token
    finally:
        assert d.stop() == 0


def _pki(d: Path) -> None:
    """A CA and a server and a client certificate signed by it, made with openssl as an operator
    would (deploy/README.md, "TLS")."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=offloadd-ca",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
             "-keyout", str(d / f"{who}.key"), "-out", str(d / f"{who}.csr"))
        ossl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "1", "-extfile", str(d / "san.ext"), "-out", str(d / f"{who}.pem"))


def test_mutual_tls_over_tcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _pki(tmp_path)
    d = Daemon([str(tmp_path)], tcp=True, args=[
        "--set", f"server.tls_cert_file={tmp_path / 'server.pem'}",
        "--set", f"server.tls_key_file={tmp_path / 'server.key'}",
        "--set", f"server.tls_client_ca_file={tmp_path / 'ca.pem'}",
    ])
    try:
        mine = offloadd.Tls(str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        with offloadd.connect(d.tcp, tls=mine) as c:
            assert c.get_info().devices[0].id == "cpu"
        # No client certificate, or no TLS at all: the handshake fails, the call is Unavailable.
        for tls in (offloadd.Tls(str(tmp_path / "ca.pem")), None):
            with offloadd.connect(d.tcp, tls=tls, timeout=5) as c, pytest.raises(offloadd.Unavailable):
                c.get_info()
        with pytest.raises(offloadd.InvalidArgument, match="both"):
            offloadd.connect(d.tcp, tls=offloadd.Tls(str(tmp_path / "ca.pem"), cert=str(tmp_path / "client.pem")))
        for var, name in (("OFFLOADD_TLS_CA", "ca.pem"), ("OFFLOADD_TLS_CERT", "client.pem"), ("OFFLOADD_TLS_KEY", "client.key")):
            monkeypatch.setenv(var, str(tmp_path / name))
        with offloadd.connect(d.tcp) as c:
            c.get_info()
        with offloadd.connect(d.uds) as c:
            c.get_info()  # the Unix socket never uses TLS
    finally:
        assert d.stop() == 0


def test_a_200k_tensor_table_is_over_the_grpc_default_and_still_attaches(client: offloadd.Client, tmp_path: Path):
    n = 200_000
    save_file({f"model.layers.{i // 1000}.experts.{i % 1000}.w": np.full(4, i % 251, np.uint8) for i in range(n)},
              str(tmp_path / "moe.safetensors"))
    client.create_pool("big", size_bytes=64 << 20)
    client.register_model("moe", pool="big", path=str(tmp_path / "moe.safetensors"))
    with client.attach("moe") as lease:
        assert len(lease.tensors) == n
        assert lease.numpy("model.layers.199.experts.998.w").tolist() == [199998 % 251] * 4
        # Each row reads the daemon's answer in place, and is read-only like it.
        t = lease.tensor("model.layers.199.experts.998.w")
        assert (t.dtype, t.shape, t.layer, t.placement, t.length, t.static_segment) == ("U8", (4,), 199, "device", 4, None)
        assert t == lease.tensors[t.name] and t != lease.tensor("model.layers.0.experts.0.w")
        assert {t, lease.tensors[t.name]} == {t} and "experts.998" in repr(t)
        with pytest.raises(AttributeError):
            t.offset = 0  # type: ignore[misc]
    # GetModel pages the table (10,000 tensors an answer); the client follows the pages.
    table = client.get_model("moe", include_tensors=True)
    assert table.tensor_count == n and len({t.name for t in table.tensors}) == n
    assert not table.next_page_token


def test_a_daemon_that_is_not_running_is_unavailable_within_the_timeout(tmp_path: Path):
    with offloadd.connect(str(tmp_path / "none.sock"), timeout=2.0) as c:
        t = time.monotonic()
        with pytest.raises(offloadd.Unavailable):
            c.get_info()
        assert time.monotonic() - t < 2.5
    with socket.socket() as s:  # a TCP port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with offloadd.connect(f"127.0.0.1:{port}", timeout=2.0) as c:
        with pytest.raises(offloadd.Unavailable):
            c.list_pools()


def test_views_are_zero_copy_and_read_only(client: offloadd.Client, tmp_path: Path):
    tensors = register(client, tmp_path, offloadd.uva(1 << 30))
    with client.attach("tiny", worker_name="views", ttl=5) as lease:
        start, length = lease.segment_range(0)
        for name, want in tensors.items():
            view = lease.numpy(name)
            np.testing.assert_array_equal(view, want)
            assert start <= view.ctypes.data < start + length
            t = lease.torch(name)
            assert start <= t.data_ptr() < start + length
            assert t.numpy().tobytes() == want.tobytes()
        with pytest.raises(ValueError):
            lease.numpy("model.embed_tokens.weight")[0, 0] = 1.0
        with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
            lease.torch("model.layers.1.mlp.up_proj.weights")
        assert all(t.placement == "uva" for t in lease.tensors.values() if t.layer is not None)


@pytest.mark.parametrize("transport", ["uds", "tcp"])
def test_onload_fills_each_static_slot(daemon: Daemon, tmp_path: Path, transport: str):
    """Over the Unix socket the fast path serves onload; over TCP the RPC does. Same bytes."""
    with offloadd.connect(daemon.uds) as c:
        tensors = register(c, tmp_path, offloadd.prefetch(1, 1, 2))
    target = daemon.uds if transport == "uds" else daemon.tcp
    with offloadd.connect(target) as c, c.attach("tiny", ttl=5) as lease:
        assert lease.prefetch_next == [2, 3, 4, 1, 0]
        for k, layer in enumerate(lease.offloaded_layers):
            done = lease.onload(layer)
            assert done.slot == k % 2 and done.bytes > 0
            for name in (f"model.layers.{layer}.mlp.up_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"):
                assert lease.static(name).numpy().tobytes() == tensors[name].tobytes()
        assert (lease._fast is not None) == (transport == "uds")
        with pytest.raises(offloadd.InvalidArgument, match="99"):
            lease.onload(99)


def test_async_onload_gets_the_rpcs_answer_on_either_transport(daemon: Daemon, tmp_path: Path):
    """Async onload (cuda) rides the fast path as flags in the layer word. On the cpu device the
    daemon refuses it, and the fast path gives exactly the RPC's code and message; the
    connection goes on serving synchronous onloads."""
    with offloadd.connect(daemon.uds) as c:
        register(c, tmp_path, offloadd.prefetch(1, 1, 2))
    handle = bytes(range(64))
    answers = {}
    for transport, target in (("uds", daemon.uds), ("tcp", daemon.tcp)):
        with offloadd.connect(target) as c, c.attach("tiny", ttl=5) as lease:
            got = []
            for kwargs, err in (
                ({"async_copy": True}, offloadd.FailedPrecondition),
                ({"async_copy": True, "slot_free_event": handle}, offloadd.FailedPrecondition),
                ({"slot_free_event": handle}, offloadd.InvalidArgument),
            ):
                with pytest.raises(err) as e:
                    lease.onload(1, **kwargs)
                got.append(e.value.message)
            assert lease.onload(1).bytes > 0
            answers[transport] = got
    assert answers["uds"] == answers["tcp"], answers
    assert "async" in answers["uds"][0], answers
    with offloadd.connect(daemon.uds) as c, c.attach("tiny", ttl=5) as lease:
        with pytest.raises(ValueError, match="64-byte"):
            lease.onload(1, async_copy=True, slot_free_event=b"short")


def test_a_lease_reaped_while_in_use_fails_the_next_onload(client: offloadd.Client, tmp_path: Path):
    register(client, tmp_path, offloadd.prefetch(1, 1, 1))
    lease = client.attach("tiny", ttl=0.3)
    lease.onload(0)
    lease._stop.set()  # the worker stops renewing, as a hung process would
    deadline = time.monotonic() + 10
    while client.get_model("tiny").attached_workers and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the daemon's state, not a sleep standing in for it
    assert client.get_model("tiny").attached_workers == 0, "the daemon reaped the lease"
    with pytest.raises(offloadd.LeaseLost, match="attach again"):
        lease.onload(1)
    with pytest.raises(offloadd.LeaseLost):
        lease.torch("model.layers.1.mlp.up_proj.weight")
    lease.close()


def test_a_lease_tied_to_the_fast_path_ends_when_the_connection_closes(client: offloadd.Client, tmp_path: Path):
    register(client, tmp_path, offloadd.prefetch(1, 1, 2))
    lease = client.attach("tiny", ttl=600, end_with_fast_path=True)
    lease.onload(0)  # opens the fast path
    lease._fast.close()  # as when the process dies
    deadline = time.monotonic() + 30
    while True:  # the daemon ends it on the connection's thread: wait for that, not the ttl
        try:
            client.keep_alive(lease.id)
        except offloadd.NotFound:
            break
        assert time.monotonic() < deadline, "the lease outlived its connection"
    with pytest.raises(offloadd.LeaseLost):
        lease._fast = None
        lease.onload(1)


def test_a_tied_lease_ends_when_its_process_is_killed_even_if_it_never_onloaded(
    client: offloadd.Client, daemon: Daemon, tmp_path: Path
):
    """A vLLM engine that offloads nothing never onloads; killed by signal (no atexit), its
    lease must still end at once, not after the ttl, or the next start cannot change the
    backend."""
    register(client, tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import offloadd, sys; c = offloadd.connect(sys.argv[1]); "
            "l = c.attach('tiny', ttl=600, end_with_fast_path=True); "
            "print(l.id, flush=True); sys.stdin.read()"
        ), daemon.uds],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    lease_id = child.stdout.readline().strip()
    assert client.get_model("tiny").attached_workers == 1
    child.kill()
    child.wait()
    deadline = time.monotonic() + 30  # far under the 600 s ttl
    while True:  # the daemon ends it on the connection's thread: wait for that, not the ttl
        try:
            client.keep_alive(lease_id)
        except offloadd.NotFound:
            break
        assert time.monotonic() < deadline, "the lease outlived its process"
    assert client.get_model("tiny").attached_workers == 0


def test_a_lease_renews_itself_and_detaches_on_close(client: offloadd.Client, tmp_path: Path):
    register(client, tmp_path, offloadd.prefetch(1, 1, 1))
    with client.attach("tiny", ttl=0.3) as lease:
        renewed = lease._renewed
        deadline = time.monotonic() + 10
        while lease._renewed == renewed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease._renewed > renewed, "the background thread renewed the lease"
        lease.onload(0)
        assert client.get_model("tiny").attached_workers == 1
    assert client.get_model("tiny").attached_workers == 0
    with pytest.raises(offloadd.LeaseLost, match="closed"):
        lease.onload(0)


def test_a_daemon_restart_loses_the_lease(tmp_path: Path):
    uds = str(tmp_path / "offloadd.sock")
    d = Daemon([str(tmp_path)], uds=uds)
    with offloadd.connect(uds) as c:
        register(c, tmp_path, offloadd.prefetch(1, 1, 1))
        lease = c.attach("tiny", ttl=30)
        lease.onload(0)
        assert d.stop() == 0
        with pytest.raises(offloadd.Unavailable):
            lease.onload(1)  # no daemon at all: not lost yet, the daemon may come back
        d = Daemon([str(tmp_path)], uds=uds)
        try:
            with pytest.raises(offloadd.LeaseLost, match="attach again"):
                lease.onload(1)  # a new daemon that never granted this lease
            with pytest.raises(offloadd.LeaseLost):
                lease.numpy("model.layers.1.mlp.up_proj.weight")
            lease.close()
        finally:
            assert d.stop() == 0


def test_nothing_is_pinned_when_the_policy_says_no(tmp_path: Path):
    d = Daemon([str(tmp_path)], env={"VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY": "1"})
    try:
        with offloadd.connect(d.uds) as c:
            register(c, tmp_path, offloadd.uva(1 << 30))
            with c.attach("tiny") as lease:
                assert not lease.pinned
                assert "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY" in lease.pin_reason
                lease.torch("model.layers.0.mlp.up_proj.weight").sum()
                locked = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmLck")]
                assert locked == ["VmLck:\t       0 kB"], locked
    finally:
        assert d.stop() == 0
