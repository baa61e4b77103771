"""CUDA without torch internals: IPC memory handles and host registration through the CUDA
runtime that torch already loaded (ctypes), wrapped as torch tensors through
``__cuda_array_interface__``; inter-process events through torch's public
``torch.cuda.Event(interprocess=True)`` and ``Event.from_ipc_handle``.

torch's own ``rebuild_cuda_tensor`` is not used: it expects torch's private ref-counter file
and event handle, which the daemon does not (and should not) fake.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .errors import FailedPrecondition, Unavailable
from .tensor import Tensor, typed_view
from .v1 import offloadd_pb2 as pb


class CudaLease(Protocol):
    """What this module needs of a :class:`offloadd.Lease`; a protocol, so that it does not
    import the lease module, which imports it."""

    @property
    def id(self) -> str: ...

    @property
    def pinned(self) -> bool: ...

    @property
    def uva_mode(self) -> int: ...

    @property
    def copy_done_events(self) -> list[bytes]: ...

    @property
    def torch_bases(self) -> dict[int | tuple[str, int], Any]:
        """Torch tensors over whole segments, cached per lease."""
        ...

    def segment(self, index: int) -> mmap.mmap: ...

_IPC_LAZY_ENABLE_PEER_ACCESS = 1
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED, _HOST_REGISTER_READ_ONLY = 1, 2, 8


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


@functools.cache
def _cudart() -> ctypes.CDLL:
    """The libcudart torch loaded (found in /proc/self/maps, as vLLM's CudaRTLibrary does)."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libcudart" in path:
                return ctypes.CDLL(path)
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise Unavailable("no CUDA runtime library (libcudart) is loaded or loadable")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = _cudart()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        raise Unavailable(f"{what} failed: {lib.cudaGetErrorString(rc).decode()} ({rc})")


class _DeviceBuffer:
    """Device-accessible memory described for ``torch.as_tensor`` (no copy). torch holds this
    object until the last tensor over it is freed; then ``release`` undoes the mapping, before
    ``owner`` (the host mapping behind a registration) goes. Undoing it matters: a registration
    that outlived its mmap would let a later mapping at the same address be read through the
    old, still pinned pages, and an IPC mapping left open keeps the daemon's buffer allocated
    after the daemon freed it."""

    def __init__(
        self,
        ptr: int,
        size: int,
        device: torch.device,
        release: Callable[[], int] | None = None,
        owner: object = None,
    ) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
            "strides": None, "stream": None,
        }
        self._device = device
        self._release = release
        self._owner = owner  # keeps the mapping that backs the pointer alive

    def __del__(self) -> None:
        if self._release is None:
            return
        try:
            with torch.cuda.device(self._device):
                self._release()
        except (AttributeError, RuntimeError, TypeError):
            pass  # interpreter teardown: torch is half gone, and the process with its mappings


def _as_tensor(
    ptr: int,
    size: int,
    device: torch.device,
    release: Callable[[], int] | None = None,
    owner: object = None,
) -> torch.Tensor:
    return torch.as_tensor(_DeviceBuffer(ptr, size, device, release, owner), device=device)


def open_ipc_tensor(handle: bytes, size: int, device: str) -> torch.Tensor:
    """A uint8 device tensor over a buffer another process exported with cuIpcGetMemHandle;
    the handle is closed when the last tensor over it is freed."""
    dev = torch.device(device)
    lib = _cudart()
    with torch.cuda.device(dev):
        ptr = ctypes.c_void_p()
        h = _IpcMemHandle.from_buffer_copy(handle)
        _check(lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, _IPC_LAZY_ENABLE_PEER_ACCESS),
               "cudaIpcOpenMemHandle")
    opened = ctypes.c_void_p(ptr.value)
    return _as_tensor(ptr.value or 0, size, dev, release=lambda: lib.cudaIpcCloseMemHandle(opened))


def uva_view(lease: CudaLease, t: Tensor, device: torch.device) -> torch.Tensor:
    """A device view of a uva tensor in the pool: through this process's own registration of
    its mapping (uva mode REGISTERED, only when the lease says ``pinned``), or directly on a
    coherent platform (PAGEABLE)."""
    seg_index = t.segment
    key = ("uva", seg_index)
    base = lease.torch_bases.get(key)
    if base is None:
        m = lease.segment(seg_index)
        host = np.frombuffer(m, dtype=np.uint8)
        addr = host.ctypes.data
        if lease.uva_mode == pb.UVA_MODE_REGISTERED:
            if not lease.pinned:
                raise FailedPrecondition(
                    f"lease {lease.id} says REGISTERED but not pinned; refusing to register "
                    "memory the pin policy did not allow"
                )
            lib = _cudart()
            flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED | _HOST_REGISTER_READ_ONLY
            _check(lib.cudaHostRegister(ctypes.c_void_p(addr), ctypes.c_size_t(len(m)), flags),
                   "cudaHostRegister")
            dptr = ctypes.c_void_p()
            _check(lib.cudaHostGetDevicePointer(ctypes.byref(dptr), ctypes.c_void_p(addr), 0),
                   "cudaHostGetDevicePointer")
            registered = ctypes.c_void_p(addr)
            release: Callable[[], int] | None = lambda: lib.cudaHostUnregister(registered)
            addr = dptr.value or 0
        elif lease.uva_mode == pb.UVA_MODE_PAGEABLE:
            release = None
        else:
            raise FailedPrecondition(f"uva mode {lease.uva_mode} has no in-place device access")
        base = _as_tensor(addr, len(m), device, release=release, owner=host)
        lease.torch_bases[key] = base
    return typed_view(base, t.offset, t)


class SlotEvents:
    """The events of vLLM's fork/join, across processes: per static slot, the daemon's "copy
    done" (opened from the lease's handles) and this worker's "slot free" (exported to the
    daemon). Before a layer reads its slot the stream waits on "copy done"; before the next
    copy into that slot the worker records "slot free" and sends its handle with the onload,
    and the daemon's copy waits on it. No call ever blocks the CPU on the GPU."""

    def __init__(self, lease: CudaLease, device: torch.device) -> None:
        if not lease.copy_done_events:
            raise FailedPrecondition(
                f"lease {lease.id} has no copy-done events: async onload needs a cuda pool"
            )
        self.device = device
        self.done = [torch.cuda.Event.from_ipc_handle(device, h) for h in lease.copy_done_events]
        self.free = [
            torch.cuda.Event(interprocess=True) for _ in lease.copy_done_events
        ]
        stream = torch.cuda.current_stream(device)
        for ev in self.free:
            ev.record(stream)  # every slot starts free; creates the event on our device
        self.free_handles = [bytes(ev.ipc_handle()) for ev in self.free]

    def slot_free(self, slot: int) -> bytes:
        """Marks ``slot`` free once the current stream's work so far is done; returns the
        handle to send with the onload that overwrites it."""
        self.free[slot].record(torch.cuda.current_stream(self.device))
        return self.free_handles[slot]

    def wait_copied(self, slot: int) -> None:
        """Makes the current stream wait until the daemon's last copy into ``slot`` is done."""
        torch.cuda.current_stream(self.device).wait_event(self.done[slot])
