"""The control-plane client: one method per RPC, Python names, a timeout on every call.

    import offloadd
    client = offloadd.connect()                   # $OFFLOADD_SOCKET or /tmp/offloadd/offloadd.sock
    client.create_pool("smol", size_bytes=1 << 30)
    client.register_model("smol", pool="smol", path="/models/smol", backend=offloadd.prefetch(1, 1, 2))
    with client.attach("smol", worker_name="worker-0") as lease:
        ...

Errors are :class:`offloadd.OffloaddError` subclasses carrying the daemon's message.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc

from .errors import Internal, InvalidArgument, OffloaddError, Unavailable, from_rpc_error
from .v1 import offloadd_pb2 as pb
from .v1 import offloadd_pb2_grpc as pb_grpc

from .lease import Lease

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: The answer type of a control call.
R = TypeVar("R")

DEFAULT_SOCKET = "/tmp/offloadd/offloadd.sock"
#: Seconds a control call may take before it fails with DeadlineExceeded.
DEFAULT_TIMEOUT = 10.0
#: Seconds RegisterModel(wait=True) may take: a load reads the whole checkpoint.
DEFAULT_LOAD_TIMEOUT = 3600.0
# Tensor specs per CreateModelStream message: about 0.6 MB at the names checkpoints use, and
# never over 3 MiB of specs (long names), well under gRPC's 4 MiB default.
SPECS_PER_MESSAGE = 10_000
SPEC_BYTES_PER_MESSAGE = 3 << 20
# Bytes per WriteModel message: well under gRPC's 4 MiB, big enough that framing costs nothing.
WRITE_BYTES = 1 << 20

Progress = Callable[[pb.ModelProgress], None]


def uva(cpu_offload_bytes: int, params: Iterable[str] = ()) -> pb.Backend:
    """A uva backend: layer parameters up to ``cpu_offload_bytes`` stay in host memory."""
    return pb.Backend(uva=pb.UvaConfig(cpu_offload_bytes=cpu_offload_bytes, params=list(params)))


def prefetch(
    group_size: int, num_in_group: int, prefetch_step: int, params: Iterable[str] = ()
) -> pb.Backend:
    """A prefetch backend with vLLM's three knobs (``--offload-group-size`` and friends)."""
    return pb.Backend(
        prefetch=pb.PrefetchConfig(
            group_size=group_size,
            num_in_group=num_in_group,
            prefetch_step=prefetch_step,
            params=list(params),
        )
    )


class Client:
    """A connection to one daemon. Thread-safe; share one per process."""

    def __init__(
        self,
        target: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        target = target or os.environ.get("OFFLOADD_SOCKET") or DEFAULT_SOCKET
        token = token or _token_from_env()
        tls = tls or Tls.from_env()
        #: Sent as ``authorization: Bearer <token>`` on every call (TCP listeners with
        #: ``server.auth_token_file``); the Unix socket does not need it.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        if target.startswith("unix:"):
            target = target[len("unix:"):]
        # Tensor tables of 100k-tensor checkpoints are over gRPC's default 4 MiB; these are the
        # daemon's own limits (offloadd::proto::MAX_RESPONSE_BYTES / MAX_REQUEST_BYTES).
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 16 << 20),
            # The daemon is a sidecar that restarts in well under a second. With gRPC's default
            # reconnect backoff (1 s, growing to 120 s) a channel that saw it down would fail
            # every call at once for up to two minutes after it is back.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if target.startswith("/"):
            #: The Unix socket path, where the onload fast path is served; None over TCP.
            self.uds_path: str | None = target
            address = f"unix:{target}"
            # grpcio sends the socket path as :authority, which the daemon's HTTP/2 layer rejects.
            options.append(("grpc.default_authority", "localhost"))
        else:
            self.uds_path = None
            address = target
        self.target = target
        self.timeout = timeout
        self._closed = False
        if tls is not None and self.uds_path is None:
            self._channel = grpc.secure_channel(address, tls.credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.OffloadStub(self._channel)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        response: type[R],
        request: object,
        timeout: float | None = None,
        wait_for_ready: bool = False,
    ) -> R:
        """Calls ``method`` and returns its answer as ``response``, the type the proto declares
        for it (checked, so a wrong pairing fails at once instead of far from here)."""
        if self._closed:
            raise Unavailable(f"this client of {self.target} was closed; connect again")
        try:
            reply = getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata, wait_for_ready=wait_for_ready
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if not isinstance(reply, response):
            raise Internal(f"{method} answered {type(reply).__name__}, not {response.__name__}")
        return reply

    # node
    def get_info(self) -> pb.GetInfoResponse:
        return self._call("GetInfo", pb.GetInfoResponse, pb.GetInfoRequest())

    # pools
    def create_pool(self, name: str, size_bytes: int, device: str = "cpu") -> pb.Pool:
        return self._call(
            "CreatePool", pb.Pool, pb.CreatePoolRequest(name=name, device=device, size_bytes=size_bytes)
        )

    def get_pool(self, name: str) -> pb.Pool:
        return self._call("GetPool", pb.Pool, pb.GetPoolRequest(name=name))

    def list_pools(self) -> list[pb.Pool]:
        return list(self._call("ListPools", pb.ListPoolsResponse, pb.ListPoolsRequest()).pools)

    def delete_pool(self, name: str) -> pb.Pool:
        return self._call("DeletePool", pb.Pool, pb.DeletePoolRequest(name=name))

    # models
    def register_model(
        self,
        name: str,
        pool: str,
        path: str,
        backend: pb.Backend | None = None,
        wait: bool = True,
        progress: Progress | None = None,
        timeout: float = DEFAULT_LOAD_TIMEOUT,
    ) -> pb.Model:
        """Registers a safetensors checkpoint. With ``wait``, returns once the model is READY
        (``progress`` is called with each update on the way); raises if the load fails."""
        request = pb.RegisterModelRequest(
            name=name, pool=pool, path=path, wait=wait and progress is None, backend=backend
        )
        model = self._call("RegisterModel", pb.Model, request, timeout=timeout)
        if not wait or progress is None:
            return model
        for update in self.watch_model(name, timeout=timeout):
            progress(update)
            if update.state == pb.MODEL_STATE_FAILED:
                # As RegisterModel(wait=true) answers a failed load: INTERNAL.
                raise Internal(f"model {name!r} failed to load: {update.error}")
        return self.get_model(name)

    def watch_model(
        self, name: str, timeout: float = DEFAULT_LOAD_TIMEOUT
    ) -> Iterator[pb.ModelProgress]:
        """The model's progress: its current state first, then every change until READY or
        FAILED."""
        try:
            yield from self._stub.WatchModel(
                pb.WatchModelRequest(name=name), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def get_model(self, name: str, include_tensors: bool = False) -> pb.Model:
        """The model; with ``include_tensors`` its whole tensor table, read page by page."""
        model = self._call(
            "GetModel", pb.Model, pb.GetModelRequest(name=name, include_tensors=include_tensors)
        )
        return self._rest_of_table(model)

    def list_models(self) -> list[pb.Model]:
        return list(self._call("ListModels", pb.ListModelsResponse, pb.ListModelsRequest()).models)

    def unregister_model(self, name: str) -> pb.Model:
        return self._call("UnregisterModel", pb.Model, pb.UnregisterModelRequest(name=name))

    def create_model(
        self,
        name: str,
        pool: str,
        tensors: Iterable[pb.TensorSpec],
        backend: pb.Backend | None = None,
    ) -> pb.Model:
        """Allocates ranges for tensors the caller writes itself, then :meth:`seal_model`.
        Returns the model with its whole tensor table (offsets). The specs go in pages of
        10,000 (or 3 MiB) over CreateModelStream, so a mixture-of-experts model's 100k+ tensors
        stay under gRPC's 4 MiB message limit; the answer's table is read page by page."""
        requests = [
            pb.CreateModelRequest(
                name=name if i == 0 else "",
                pool=pool if i == 0 else "",
                tensors=page,
                backend=backend if i == 0 else None,
            )
            for i, page in enumerate(_pages(list(tensors)))
        ]
        model = self._call("CreateModelStream", pb.Model, iter(requests))
        return self._rest_of_table(model)

    def _rest_of_table(self, model: pb.Model) -> pb.Model:
        """Appends the pages after ``model.next_page_token`` to ``model.tensors``."""
        while model.next_page_token:
            page = self._call(
                "GetModel", pb.Model, pb.GetModelRequest(
                    name=model.name, include_tensors=True, page_token=model.next_page_token
                ),
            )
            model.tensors.extend(page.tensors)
            model.next_page_token = page.next_page_token
        return model

    def write_model(self, created: pb.Model, tensors: Iterable[tuple[str, Buffer]]) -> int:
        """Sends a publication's bytes: each ``(tensor name, bytes)`` pair fills that tensor of
        ``created`` (what :meth:`create_model` answered, with its offsets and publish token),
        in messages of 1 MiB over one WriteModel stream. The daemon writes them into the pool;
        publishers never map it writable. Returns the bytes written."""
        offsets = {t.name: (t.offset, t.length) for t in created.tensors}
        # The tensors are read lazily (a GPU tensor's host copy lives only while it is sent), so
        # a bad pair is found mid-stream: the stream ends there and the error is raised after.
        bad: list[OffloaddError] = []

        def messages() -> Iterator[pb.WriteModelRequest]:
            first = True
            for name, data in tensors:
                if name not in offsets:
                    bad.append(InvalidArgument(f"{created.name} has no tensor {name!r}"))
                    return
                offset, length = offsets[name]
                view = memoryview(data).cast("B")
                if view.nbytes != length:
                    bad.append(InvalidArgument(f"{name} is {length} bytes in the table, {view.nbytes} given"))
                    return
                for at in range(0, view.nbytes, WRITE_BYTES):
                    yield pb.WriteModelRequest(
                        name=created.name if first else "",
                        publish_token=created.publish_token if first else "",
                        offset=offset + at,
                        data=view[at : at + WRITE_BYTES].tobytes(),
                    )
                    first = False

        reply = self._call("WriteModel", pb.WriteModelResponse, messages(), timeout=DEFAULT_LOAD_TIMEOUT)
        if bad:
            raise bad[0]
        return reply.bytes_written

    def seal_model(self, name: str, publish_token: str) -> pb.Model:
        """Ends a publication: checksums what :meth:`write_model` wrote and makes it READY."""
        return self._call(
            "SealModel", pb.Model, pb.SealModelRequest(name=name, publish_token=publish_token),
            timeout=DEFAULT_LOAD_TIMEOUT,
        )

    def set_backend(self, model: str, backend: pb.Backend) -> pb.Model:
        return self._call("SetBackend", pb.Model, pb.SetBackendRequest(model=model, backend=backend))

    # workers
    def attach(
        self, model: str, worker_name: str = "", ttl: float = 0.0, end_with_fast_path: bool = False
    ) -> Lease:
        """Attaches to a READY model and returns a :class:`~offloadd.Lease` (a context manager
        that renews itself and detaches on close). ``ttl`` in seconds; 0 takes the daemon's
        default. With ``end_with_fast_path`` (over the Unix socket) the lease connects its
        onload fast path at once, and the daemon ends the lease the moment that connection
        closes (the process died, whether or not it ever onloaded), not only after the ttl."""
        worker_name = worker_name or f"python-{os.getpid()}"
        raw = self.attach_worker(model, worker_name, int(ttl * 1000), end_with_fast_path)
        try:
            # AttachWorker answers the first 10,000 rows of the table; the rest come in pages.
            while raw.next_page_token:
                page = self.get_lease_tensors(raw.lease_id, raw.next_page_token)
                raw.tensors.extend(page.tensors)
                raw.next_page_token = page.next_page_token
            return Lease(self, raw, end_with_fast_path)
        except OffloaddError:
            self.detach_worker(raw.lease_id)
            raise

    def get_lease_tensors(self, lease_id: str, page_token: str, page_size: int = 0) -> pb.LeaseTensorPage:
        """A page of a lease's tensor table after AttachWorker's first (``Lease.next_page_token``)."""
        request = pb.GetLeaseTensorsRequest(lease_id=lease_id, page_token=page_token, page_size=page_size)
        return self._call("GetLeaseTensors", pb.LeaseTensorPage, request)

    def attach_worker(
        self, model: str, worker_name: str, ttl_ms: int = 0, end_with_fast_path: bool = False
    ) -> pb.Lease:
        """The raw AttachWorker call (its table's first page); :meth:`attach` wraps its answer."""
        return self._call(
            "AttachWorker", pb.Lease, pb.AttachWorkerRequest(
                model=model,
                worker_name=worker_name,
                ttl_ms=ttl_ms,
                end_with_fast_path=end_with_fast_path,
            ),
        )

    def keep_alive(
        self, lease_id: str, wait_for_ready: bool = False, timeout: float | None = None
    ) -> pb.KeepAliveResponse:
        """Renews a lease. With ``wait_for_ready`` the call waits (up to ``timeout``) for a
        daemon that is not reachable yet, instead of failing at once."""
        request = pb.KeepAliveRequest(lease_id=lease_id)
        return self._call("KeepAlive", pb.KeepAliveResponse, request, timeout, wait_for_ready)

    def detach_worker(self, lease_id: str) -> pb.DetachWorkerResponse:
        return self._call("DetachWorker", pb.DetachWorkerResponse, pb.DetachWorkerRequest(lease_id=lease_id))

    def onload_to_static(
        self, lease_id: str, layer: int, async_copy: bool = False, slot_free_event: bytes = b""
    ) -> pb.OnloadToStaticResponse:
        return self._call(
            "OnloadToStatic", pb.OnloadToStaticResponse, pb.OnloadToStaticRequest(
                lease_id=lease_id,
                layer=layer,
                async_copy=async_copy,
                slot_free_event=slot_free_event,
            ),
        )


def _pages(specs: list[pb.TensorSpec]) -> list[list[pb.TensorSpec]]:
    """``specs`` in pages of at most SPECS_PER_MESSAGE specs and SPEC_BYTES_PER_MESSAGE bytes
    (a spec larger than that alone); one empty page for no specs, which still names the model."""
    pages: list[list[pb.TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.ByteSize() + 8  # the field's key and length
        if pages[-1] and (len(pages[-1]) == SPECS_PER_MESSAGE or size + n > SPEC_BYTES_PER_MESSAGE):
            pages.append([])
            size = 0
        pages[-1].append(spec)
        size += n
    return pages


def _token_from_env() -> str | None:
    """``$OFFLOADD_TOKEN``, else the contents of ``$OFFLOADD_TOKEN_FILE`` (a mounted Secret)."""
    token = os.environ.get("OFFLOADD_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("OFFLOADD_TOKEN_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return None


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM files for a TCP listener with TLS: the CA its certificate chains to, and for mutual
    TLS (``server.tls_client_ca_file``) this client's certificate chain and key."""

    ca: str
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_env(cls) -> Tls | None:
        ca = os.environ.get("OFFLOADD_TLS_CA")
        if not ca:
            return None
        return cls(ca, os.environ.get("OFFLOADD_TLS_CERT"), os.environ.get("OFFLOADD_TLS_KEY"))

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("TLS: give both a client certificate and its key, or neither")

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


def connect(
    target: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    tls: Tls | None = None,
) -> Client:
    """Connects to a daemon: a Unix socket path (``/…`` or ``unix:/…``; default
    ``$OFFLOADD_SOCKET``, else ``/tmp/offloadd/offloadd.sock``) or ``host:port`` for TCP.
    ``token`` (default ``$OFFLOADD_TOKEN`` or the file ``$OFFLOADD_TOKEN_FILE``) is the bearer
    token a TCP listener with ``server.auth_token_file`` asks for. ``tls`` (default from
    ``$OFFLOADD_TLS_CA``, ``$OFFLOADD_TLS_CERT``, ``$OFFLOADD_TLS_KEY``) connects over TLS to a
    listener with ``server.tls_cert_file``; the Unix socket never uses it.

    Connecting is lazy; a daemon that is not running makes the first call raise
    :class:`~offloadd.Unavailable` (within ``timeout`` seconds)."""
    return Client(target, timeout, token, tls)
