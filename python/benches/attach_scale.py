"""Python attach at mixture-of-experts scale: ``Client.attach`` of a model of N tiny tensors
(the whole table read page by page and turned into a ``Lease``), against the bound of the same
run: the same calls (AttachWorker, every GetLeaseTensors page, DetachWorker) with the rows left
as protobuf messages. The difference is what the client spends building its table.

    python python/benches/attach_scale.py [--tensors 200000] [--rounds 5]

Needs the release binary (cargo build --release --bins) or OFFLOADD_BIN.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import offloadd  # noqa: E402
from daemon import REPO, Daemon  # noqa: E402


def transport(c: offloadd.Client) -> int:
    """The attach's calls alone; returns the rows received."""
    raw = c.attach_worker("moe", "bench-transport")
    rows = len(raw.tensors)
    token = raw.next_page_token
    while token:
        page = c.get_lease_tensors(raw.lease_id, token)
        rows += len(page.tensors)
        token = page.next_page_token
    c.detach_worker(raw.lease_id)
    return rows


def attach(c: offloadd.Client) -> int:
    with c.attach("moe", worker_name="bench-python") as lease:
        return len(lease.tensors)


def best(f: Callable[[offloadd.Client], int], c: offloadd.Client, rounds: int, n: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        assert f(c) == n
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.tensors
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    with tempfile.TemporaryDirectory() as root:
        save_file(
            {f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w": np.full(4, i % 251, np.uint8) for i in range(n)},
            f"{root}/moe.safetensors",
        )
        d = Daemon([root])
        try:
            with offloadd.connect(d.uds) as c:
                c.create_pool("p", size_bytes=n * 256 + (1 << 20))
                c.register_model("moe", pool="p", path=f"{root}/moe.safetensors")
                attach(c)  # the daemon encodes the lease table once, on the first attach
                bound = best(transport, c, args.rounds, n)
                full = best(attach, c, args.rounds, n)
        finally:
            d.stop()
    print(f"Python attach of {n} tensors, best of {args.rounds}:")
    print(f"  calls alone (the bound)  {bound:.3f} s   {bound / n * 1e6:5.2f} us/tensor")
    print(f"  Client.attach -> Lease   {full:.3f} s   {full / n * 1e6:5.2f} us/tensor   = {full / bound:.2f}x the bound")


if __name__ == "__main__":
    main()
