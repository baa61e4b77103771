#!/usr/bin/env python3
"""The onload fast path from Python, standard library only: what a vLLM worker needs to onload a
layer without gRPC on its hot path. The frames are in docs/design.md ("Onload fast path").

    python3 tests/fast_client.py --uds /tmp/offloadd/offloadd.sock --lease LEASE_ID 0 1 2

Attach first (AttachWorker over gRPC) to get the lease id. Prints one JSON line per layer:
{"layer": 0, "code": 0, "slot": 0, "bytes": 4096, "message": ""}; code is the gRPC status code.
"""
import argparse
import json
import socket
import struct


class FastPath:
    """One connection bound to one lease; one request at a time."""

    def __init__(self, uds: str, lease_id: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(uds)
        lid = lease_id.encode()
        self.sock.sendall(b"OFLD" + struct.pack("<HH", 1, len(lid)) + lid)
        code, _, _, message = self._reply()
        if code != 0:
            raise RuntimeError(f"offloadd refused the lease (gRPC code {code}): {message}")

    def onload(self, layer: int):
        """Copies a model layer into its static slot; returns (code, slot, bytes, message)."""
        self.sock.sendall(struct.pack("<I", layer))
        return self._reply()

    def _reply(self):
        code, slot, nbytes, length = struct.unpack("<IIQI", self._exact(20))
        return code, slot, nbytes, self._exact(length).decode()

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("offloadd closed the connection (did the lease end?)")
            buf += chunk
        return bytes(buf)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uds", default="/tmp/offloadd/offloadd.sock")
    ap.add_argument("--lease", required=True)
    ap.add_argument("layers", type=int, nargs="+")
    args = ap.parse_args()
    fast = FastPath(args.uds, args.lease)
    for layer in args.layers:
        code, slot, nbytes, message = fast.onload(layer)
        print(json.dumps({"layer": layer, "code": code, "slot": slot, "bytes": nbytes, "message": message}))


if __name__ == "__main__":
    main()
