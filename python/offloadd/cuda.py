"""CUDA without torch internals: IPC memory handles and host registration through the CUDA
runtime that torch already loaded (ctypes), wrapped as torch tensors through
``__cuda_array_interface__``.

torch's own ``rebuild_cuda_tensor`` is not used: it expects torch's private ref-counter file
and event handle, which the daemon does not (and should not) fake.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import FailedPrecondition, Unavailable
from .v1 import offloadd_pb2 as pb

if TYPE_CHECKING:
    from .lease import Lease, Tensor

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
    """Raw device memory described for ``torch.as_tensor`` (no copy)."""

    def __init__(self, ptr: int, size: int, owner: object = None) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
            "strides": None, "stream": None,
        }
        self._owner = owner  # keeps the mapping that backs the pointer alive


def _as_tensor(ptr: int, size: int, device: torch.device, owner: object = None) -> torch.Tensor:
    return torch.as_tensor(_DeviceBuffer(ptr, size, owner), device=device)


def open_ipc_tensor(handle: bytes, size: int, device: str) -> torch.Tensor:
    """A uint8 device tensor over a buffer another process exported with cuIpcGetMemHandle."""
    dev = torch.device(device)
    lib = _cudart()
    with torch.cuda.device(dev):
        ptr = ctypes.c_void_p()
        h = _IpcMemHandle.from_buffer_copy(handle)
        _check(lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, _IPC_LAZY_ENABLE_PEER_ACCESS),
               "cudaIpcOpenMemHandle")
    return _as_tensor(ptr.value or 0, size, dev)


def uva_view(lease: Lease, t: Tensor, device: torch.device) -> torch.Tensor:
    """A device view of a uva tensor in the pool: through this process's own registration of
    its mapping (uva mode REGISTERED, only when the lease says ``pinned``), or directly on a
    coherent platform (PAGEABLE)."""
    seg_index = t.segment
    key = ("uva", seg_index)
    base = lease._torch_bases.get(key)
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
            addr = dptr.value or 0
        elif lease.uva_mode != pb.UVA_MODE_PAGEABLE:
            raise FailedPrecondition(f"uva mode {lease.uva_mode} has no in-place device access")
        base = _as_tensor(addr, len(m), device, owner=host)
        lease._torch_bases[key] = base
    from .lease import _typed

    return _typed(base, t.offset, t)
