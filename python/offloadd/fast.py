"""The onload fast path: the daemon's Unix socket, spoken without HTTP/2 on the hot loop.

A connection that starts with ``OFLD`` is bound to one lease and answers one onload at a time
with the same status codes and messages as the OnloadToStatic RPC (frames: docs/design.md, "Onload
fast path"). A round trip costs a few microseconds, against tens for gRPC.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from .errors import Unavailable, error_for

MAGIC = b"OFLD"
VERSION = 1
#: Request flags in the layer word: an async copy (cuda), and a slot-free event handle follows.
ASYNC, SLOT_FREE = 1 << 31, 1 << 30
EVENT_HANDLE = 64
_REPLY = struct.Struct("<IIQI")
_REQUEST = struct.Struct("<I")


class Onloaded(NamedTuple):
    """A completed onload: the slot the layer now occupies and the bytes copied."""

    slot: int
    bytes: int


class FastPath:
    """One connection bound to one lease. Not thread-safe: one per thread that onloads."""

    def __init__(self, uds_path: str, lease_id: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bounds a daemon that stopped answering; an onload is a copy, never a long wait.
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(uds_path)
        except OSError as e:
            self._sock.close()
            raise Unavailable(f"cannot reach offloadd at {uds_path}: {e}") from None
        lid = lease_id.encode()
        self._sock.sendall(MAGIC + struct.pack("<HH", VERSION, len(lid)) + lid)
        code, _, _, message = self._reply()
        if code != 0:
            self.close()
            raise error_for(code, message)

    def onload(self, layer: int, async_copy: bool = False, slot_free_event: bytes = b"") -> Onloaded:
        """Copies a model layer into its static slot; returns when the copy is complete, or,
        with ``async_copy`` (cuda), once it is enqueued behind ``slot_free_event``."""
        if layer & (ASYNC | SLOT_FREE) or layer < 0:
            raise ValueError(f"layer {layer} is beyond what the onload fast path addresses")
        word = layer | (ASYNC if async_copy else 0)
        frame = b""
        if slot_free_event:
            if len(slot_free_event) != EVENT_HANDLE:
                raise ValueError(
                    f"slot_free_event must be a {EVENT_HANDLE}-byte CUDA IPC event handle, "
                    f"got {len(slot_free_event)} bytes"
                )
            word |= SLOT_FREE
            frame = slot_free_event
        try:
            self._sock.sendall(_REQUEST.pack(word) + frame)
        except OSError as e:
            raise Unavailable(f"offloadd onload connection failed: {e} (the lease ended?)") from None
        code, slot, nbytes, message = self._reply()
        if code != 0:
            raise error_for(code, message)
        return Onloaded(slot, nbytes)

    def close(self) -> None:
        self._sock.close()

    def _reply(self) -> tuple[int, int, int, str]:
        # One request is in flight at a time, so whatever arrives belongs to this reply; it
        # nearly always comes in one piece, and one recv is most of a call's cost in Python.
        buf = self._recv()
        while len(buf) < _REPLY.size:
            buf += self._recv()
        code, slot, nbytes, length = _REPLY.unpack_from(buf)
        while len(buf) < _REPLY.size + length:
            buf += self._recv()
        return code, slot, nbytes, buf[_REPLY.size : _REPLY.size + length].decode()

    def _recv(self) -> bytes:
        try:
            chunk = self._sock.recv(4096)
        except OSError as e:
            raise Unavailable(f"offloadd onload connection failed: {e}") from None
        if not chunk:
            raise Unavailable("offloadd closed the onload connection (the lease ended?)")
        return chunk
