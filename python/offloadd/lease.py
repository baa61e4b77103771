"""A worker's lease: the mapped pool, the tensor table, zero-copy views, onload.

The pool is mapped read-only: a view handed out by :meth:`Lease.numpy` or :meth:`Lease.torch`
shares its memory with the daemon and every other worker, with no copy. numpy views refuse
writes; a write through a torch view kills the process with SIGSEGV (torch cannot mark a tensor
read-only), so treat them as read-only.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import (
    FailedPrecondition,
    LeaseLost,
    NotFound,
    OffloaddError,
    Unavailable,
    UnknownTensor,
)
from .fast import FastPath, Onloaded
from .tensor import NUMPY_DTYPES, Tensor, typed_view
from .v1 import offloadd_pb2 as pb

_log = logging.getLogger("offloadd")

if TYPE_CHECKING:
    import torch
    # Lease has a method named torch, which hides the module inside the class body.
    from torch import Tensor as TorchTensor

#: Seconds an onload that lost its connection waits to ask the daemon whether the lease lives:
#: a restart takes well under a second, and the channel retries every second at most.
CONFIRM_TIMEOUT = 2.0

class LeaseService(Protocol):
    """What a lease needs of the client that made it; :class:`offloadd.Client` is one. A
    protocol, so that this module does not import the client, which imports it."""

    uds_path: str | None

    def keep_alive(
        self, lease_id: str, wait_for_ready: bool = False, timeout: float | None = None
    ) -> pb.KeepAliveResponse: ...

    def detach_worker(self, lease_id: str) -> pb.DetachWorkerResponse: ...

    def onload_to_static(
        self, lease_id: str, layer: int, async_copy: bool = False, slot_free_event: bytes = b""
    ) -> pb.OnloadToStaticResponse: ...

    def attach(
        self, model: str, worker_name: str = "", ttl: float = 0.0, end_with_fast_path: bool = False
    ) -> Lease: ...


class Lease:
    """A lease on a model (see :meth:`offloadd.Client.attach`).

    It renews itself on a background thread every ttl/3 and detaches on :meth:`close`, on
    leaving a ``with`` block, and at interpreter exit. Once the daemon no longer knows it (the
    ttl passed, the daemon restarted, someone detached it), every use raises
    :class:`~offloadd.LeaseLost` instead of reading memory the daemon may have reused.
    """

    def __init__(self, client: LeaseService, raw: pb.Lease, end_with_fast_path: bool = False) -> None:
        self.client = client
        self.raw = raw
        self.id: str = raw.lease_id
        self.model: str = raw.model
        self.ttl: float = raw.ttl_ms / 1000.0
        #: The shared pin decision: when False, nothing in this process pins or registers.
        self.pinned: bool = raw.pinned
        self.pin_reason: str = raw.pin_reason
        self.uva_mode: int = raw.uva_mode
        self.offloaded_layers: list[int] = list(raw.offloaded_layers)
        #: After offloaded layer k runs, onload model layer ``prefetch_next[k]``; offloaded layer
        #: k always occupies static slot ``k % prefetch_step``.
        self.prefetch_next: list[int] = list(raw.prefetch_next)
        self.prefetch_step: int = raw.prefetch_slots
        #: cuda: IPC handles of the daemon's per-slot "copy done" events (async onloads).
        self.copy_done_events: list[bytes] = list(raw.copy_done_events)
        self.tensors: dict[str, Tensor] = {t.name: Tensor(t) for t in raw.tensors}
        self._maps: dict[int, mmap.mmap] = {}
        #: (st_dev, st_ino) of each mapped file, to tell whether a path still names it.
        self._map_ids: dict[int, tuple[int, int]] = {}
        # Torch tensors over whole segments: static ones by segment index, uva device views by
        # ("uva", segment index) (cuda.py).
        self.torch_bases: dict[int | tuple[str, int], Any] = {}
        self._fast: FastPath | None = None
        if end_with_fast_path and client.uds_path is not None:
            # Connected now, not at the first onload: a process that never onloads (an engine
            # that offloads nothing) still lets go of the lease the moment it dies.
            self._fast = FastPath(client.uds_path, self.id)
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._closed = False
        self._stop = threading.Event()
        self._renewed = time.monotonic()
        self._thread = threading.Thread(
            target=_renew, args=(weakref.ref(self), self._stop), name=f"offloadd-lease-{self.id[:8]}",
            daemon=True,
        )
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # lifecycle
    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops renewing and detaches. Views already taken stay mapped (the memory is not freed
        under them), but the daemon no longer serves this lease."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._fast is not None:
            self._fast.close()
        if self._lost is None:
            try:
                self.client.detach_worker(self.id)
            except (NotFound, Unavailable):
                pass  # already gone, or the daemon is: either way the lease has ended

    @property
    def alive(self) -> bool:
        return not self._closed and self._lost is None

    def check(self) -> None:
        """Raises :class:`LeaseLost` if the lease has ended."""
        if self._closed:
            raise LeaseLost(f"lease {self.id} on {self.model!r} was closed; attach again")
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def renew(self) -> None:
        """Renews the lease now (the background thread does so every ttl/3). Raises
        :class:`LeaseLost` if it has ended, or if its model was taken out of service (the
        daemon's scrubber found bytes that no longer match their checksum): the weights it maps
        are wrong, so the lease is detached and every later use raises too."""
        self.check()
        try:
            r = self.client.keep_alive(self.id)
        except NotFound as e:
            raise self._mark_lost(e.message) from None
        self._renewed = time.monotonic()
        if r.model_out_of_service:
            lost = self._mark_lost(f"its model is out of service: {r.model_out_of_service}")
            try:
                self.client.detach_worker(self.id)
            except OffloaddError:
                pass  # gone already, or the daemon is: the lease has ended either way
            raise lost

    def _mark_lost(self, why: str) -> LeaseLost:
        """Records that the lease ended and returns the error every later use raises."""
        self._lost = f"lease {self.id} on {self.model!r} is lost: {why}; attach again"
        self._stop.set()
        return LeaseLost(self._lost)

    # table
    def tensor(self, name: str) -> Tensor:
        """The table row of ``name``; :class:`UnknownTensor` (a KeyError) names the closest."""
        try:
            return self.tensors[name]
        except KeyError:
            raise UnknownTensor(name, self.tensors) from None

    def layer_tensors(self, layer: int) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.layer == layer]

    # memory
    def segment(self, index: int) -> mmap.mmap:
        """The read-only mapping of a host segment (the pool, or cpu static buffers)."""
        self.check()
        with self._lock:
            m = self._maps.get(index)
            if m is None:
                seg = self.raw.segments[index]
                if not seg.path:
                    raise FailedPrecondition(
                        f"segment {index} of lease {self.id} is device memory ({seg.device}); "
                        "use Lease.static() on a CUDA build"
                    )
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    m = mmap.mmap(fd, seg.size_bytes, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
                finally:
                    os.close(fd)
                self._maps[index] = m
                self._map_ids[index] = (st.st_dev, st.st_ino)
            return m

    def keep_pool_mapping(self, old: Lease) -> bool:
        """Takes over ``old``'s mapping of the pool when this lease names the very same file
        (same path, device, inode and size: the restarted daemon adopted the pool), instead of
        mapping it again. Returns whether it did. Static buffers are never taken over: they are
        new with every lease."""
        for index, seg in enumerate(self.raw.segments):
            if seg.kind != pb.SEGMENT_KIND_POOL or not seg.path:
                continue
            for old_index, m in old._maps.items():
                old_seg = old.raw.segments[old_index]
                if old_seg.path != seg.path or len(m) != seg.size_bytes:
                    continue
                try:
                    st = os.stat(seg.path)
                except OSError:
                    continue
                if old._map_ids.get(old_index) == (st.st_dev, st.st_ino):
                    with self._lock:
                        self._maps[index] = m
                        self._map_ids[index] = (st.st_dev, st.st_ino)
                    return True
        return False

    def segment_range(self, index: int) -> tuple[int, int]:
        """(address, length) of a mapped segment in this process, e.g. to check zero-copy."""
        m = self.segment(index)
        return np.frombuffer(m, dtype=np.uint8).ctypes.data, len(m)

    def numpy(self, name: str) -> np.ndarray:
        """A read-only numpy view of the tensor's host copy in the pool (no copy)."""
        t = self.tensor(name)
        if t.dtype not in NUMPY_DTYPES:
            raise TypeError(f"{name} is {t.dtype}, which numpy lacks; use Lease.torch()")
        dtype = np.dtype(NUMPY_DTYPES[t.dtype])
        count = t.length // dtype.itemsize
        return np.frombuffer(self.segment(t.segment), dtype, count, t.offset).reshape(t.shape)

    def torch(self, name: str) -> torch.Tensor:
        """A torch view of the tensor's host copy in the pool (no copy; never write to it)."""
        t = self.tensor(name)
        return self._torch_view(t.segment, t.offset, t)

    def static(self, name: str) -> TorchTensor:
        """The tensor's static slot (prefetch tensors): a view of the lease's static buffers,
        valid once its layer was onloaded. On cpu a view of the shared-memory file; on cuda a
        device tensor over the daemon's buffer, opened by its CUDA IPC handle."""
        t = self.tensor(name)
        if t.static_segment is None:
            raise FailedPrecondition(f"{name} is placed {t.placement}; only prefetch tensors have a static slot")
        seg = self.raw.segments[t.static_segment]
        if seg.ipc_handle:
            from . import cuda

            self.check()
            base = self.torch_bases.get(t.static_segment)
            if base is None:
                base = cuda.open_ipc_tensor(seg.ipc_handle, seg.size_bytes, seg.device)
                self.torch_bases[t.static_segment] = base
            return typed_view(base, t.static_offset, t)
        return self._torch_view(t.static_segment, t.static_offset, t)

    def _torch_view(self, index: int, offset: int, t: Tensor) -> TorchTensor:
        import torch

        base = self.torch_bases.get(index)
        if base is None:
            m = self.segment(index)
            with warnings.catch_warnings():
                # The mapping is read-only on purpose; the class docstring says so.
                warnings.filterwarnings("ignore", message=".*not writable.*")
                base = torch.frombuffer(m, dtype=torch.uint8)
            self.torch_bases[index] = base
        return typed_view(base, offset, t)

    # onload
    def onload(self, layer: int, async_copy: bool = False, slot_free_event: bytes = b"") -> Onloaded:
        """Copies a model layer into its static slot and returns once the copy is complete: over
        the daemon's Unix socket (the fast path) when connected that way, else the RPC.

        With ``async_copy`` (cuda) it returns once the copy is enqueued: the daemon's copy
        first waits on ``slot_free_event`` (the IPC handle of an event this worker recorded
        after its last read of the slot), and the worker's stream must wait on
        ``copy_done_events[slot]`` before reading the slot (see :mod:`offloadd.cuda`)."""
        self.check()
        if self.client.uds_path is None:
            r = self._rpc_onload(layer, async_copy, slot_free_event)
            return Onloaded(r.slot, r.bytes)
        try:
            if self._fast is None:
                self._fast = FastPath(self.client.uds_path, self.id)
            return self._fast.onload(layer, async_copy, slot_free_event)
        except Unavailable:
            self._fast = None
            self._confirm_alive()
            raise
        except NotFound as e:
            raise self._mark_lost(e.message) from None

    def _rpc_onload(self, layer: int, async_copy: bool, slot_free_event: bytes) -> pb.OnloadToStaticResponse:
        try:
            return self.client.onload_to_static(self.id, layer, async_copy, slot_free_event)
        except NotFound as e:
            raise self._mark_lost(e.message) from None

    def _confirm_alive(self) -> None:
        """After a broken onload connection: a lease the daemon no longer knows is lost. The
        daemon may be restarting, and the channel may still be waiting to reconnect after seeing
        it down: the question waits briefly for an answer rather than taking that for one."""
        try:
            self.client.keep_alive(self.id, wait_for_ready=True, timeout=CONFIRM_TIMEOUT)
        except NotFound as e:
            raise self._mark_lost(e.message) from None
        except OffloaddError:
            pass


def _renew(ref: weakref.ref[Lease], stop: threading.Event) -> None:
    """Keeps the lease alive at ttl/3 until it is closed, collected or lost."""
    while True:
        lease = ref()
        if lease is None:
            return
        interval = max(lease.ttl / 3, 0.01)
        del lease  # hold no reference while waiting, so an abandoned lease can be collected
        if stop.wait(interval):
            return
        lease = ref()
        if lease is None:
            return
        if lease._closed:
            return
        try:
            lease.renew()
        except LeaseLost as e:
            _log.warning("%s", e)
            return
        except OffloaddError as e:
            if time.monotonic() - lease._renewed > lease.ttl:
                lease._mark_lost(f"not renewed within its ttl of {lease.ttl:.1f} s ({e})")
                return
        del lease


def _close_at_exit(ref: weakref.ref[Lease]) -> None:
    lease = ref()
    if lease is not None:
        try:
            lease.close()
        except OffloaddError:
            pass  # the daemon may be gone at exit; its reaper ends the lease after the ttl
