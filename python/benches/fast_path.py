"""Onload fast-path round trip from Python against the Rust reference worker, same daemon, same
run: a prefetch model of 4 KiB layers, each client timing N onloads.

    python python/benches/fast_path.py [--calls 20000]

Needs the release binaries (cargo build --release --bins) or OFFLOADD_BIN / OFFLOADD_WORKER_BIN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import offloadd  # noqa: E402
from daemon import REPO, Daemon  # noqa: E402


def percentiles(micros: list[float]) -> tuple[float, float]:
    s = sorted(micros)
    return s[(len(s) - 1) // 2], s[int((len(s) - 1) * 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    worker_bin = os.environ.get("OFFLOADD_WORKER_BIN", str(REPO / "target" / "release" / "offloadd-worker"))
    with tempfile.TemporaryDirectory() as root:
        layers = {f"model.layers.{i}.w": np.full(4096, i, np.uint8) for i in range(8)}
        save_file(layers, f"{root}/m.safetensors")
        d = Daemon([root])
        try:
            with offloadd.connect(d.uds) as c:
                c.create_pool("p", size_bytes=1 << 20)
                c.register_model("m", pool="p", path=f"{root}/m.safetensors", backend=offloadd.prefetch(1, 1, 2))
                with c.attach("m", worker_name="bench-python") as lease:
                    order = lease.offloaded_layers
                    for layer in order:  # connect and warm up
                        lease.onload(layer)
                    micros = []
                    for i in range(args.calls):
                        t = time.perf_counter()
                        lease.onload(order[i % len(order)])
                        micros.append((time.perf_counter() - t) * 1e6)
            py50, py99 = percentiles(micros)
            out = subprocess.run([worker_bin, "--uds", d.uds, "--model", "m", "--latency", str(args.calls)],
                                 check=True, capture_output=True, text=True).stdout
            rust = json.loads(out.strip().splitlines()[-1])
        finally:
            d.stop()
    print(f"fast-path onload, 4 KiB layer, {args.calls} calls, one worker:")
    print(f"  python offloadd.Lease.onload  p50 {py50:7.1f} us   p99 {py99:7.1f} us")
    print(f"  rust   offloadd-worker        p50 {rust['p50_us']:7.1f} us   p99 {rust['p99_us']:7.1f} us")
    print(f"  python / rust                 p50 {py50 / rust['p50_us']:.2f}x    p99 {py99 / rust['p99_us']:.2f}x")


if __name__ == "__main__":
    main()
