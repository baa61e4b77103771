"""A checkpoint of two shards (2.2 GB by default) on a local S3 server (s3s-fs), loaded four
ways in the same run, alternated round by round so drift on the host hits each alike:

- the bound: the server's own raw throughput, ranged GETs of the same objects by curl (8 MiB
  parts, 16 at a time, as the daemon's defaults), written nowhere;
- offloadd: RegisterModel of ``s3://bucket/prefix/`` (wait) into a pool, then UnregisterModel;
- runai-model-streamer's S3 streamer into CPU memory (every tensor handed out), the peer;
- offloadd from the same files on local disk (page cache), for scale.

Run with the test venv's python (tests/run.sh builds it, and s3s-fs into $S3S_FS_BIN):

    python python/benches/remote_load.py [--mib 2200] [--rounds 3]

It prints per round and then min / median / max of each ratio, the CPU seconds each side spent
(the client's, and the server's, which the bound pays too), and the largest growth of the
daemon's anonymous memory during a remote load, against ``fetch_concurrency x fetch_part_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import offloadd  # noqa: E402
from daemon import REPO  # noqa: E402
from s3server import ACCESS, REGION, SECRET, S3Server, remote_daemon  # noqa: E402

BUCKET, PREFIX = "models", "llama/"
PART, CONCURRENCY = 8 << 20, 16  # the daemon's default fetch_part_bytes and fetch_concurrency

RUNAI = """
import json, resource, sys, time
from runai_model_streamer import SafetensorsStreamer
urls = sys.argv[1:]
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
n = 0
with SafetensorsStreamer() as s:
    s.stream_files(urls)
    for _, t in s.get_tensors():
        n += t.numel() * t.element_size()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n,
                  "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime}))
"""


def checkpoint(directory: Path, total_mib: int) -> list[Path]:
    """Two Llama-shaped shards of F16 tensors (64 MiB projections, a few small norms), and
    the ``model.safetensors.index.json`` that names them, as Hugging Face writes it."""
    rng = np.random.default_rng(7)
    shards, per_shard, weight_map = [], total_mib // 2, {}
    for s in range(2):
        tensors: dict[str, np.ndarray] = {}
        for layer in range(per_shard // 64):
            name = f"model.layers.{s * 1000 + layer}"
            tensors[f"{name}.mlp.up_proj.weight"] = rng.integers(0, 1 << 16, (4096, 8192), dtype=np.uint16).view(
                np.float16)
            tensors[f"{name}.input_layernorm.weight"] = np.ones(4096, dtype=np.float16)
        path = directory / f"model-0000{s + 1}-of-00002.safetensors"
        save_file(tensors, str(path))
        shards.append(path)
        weight_map.update({name: path.name for name in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def cpu_of(pid: int) -> float:
    """User + system seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class AnonPeak:
    """The largest RssAnon of a process, sampled every 5 ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def sample(self) -> int:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, self.sample())

    def __enter__(self) -> AnonPeak:
        self.before_kb = self.sample()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def curl_bound(endpoint: str, keys: list[tuple[str, int]], scratch: Path) -> None:
    """Every byte of the objects as ranged GETs (SigV4), 16 at a time, into /dev/null."""
    lines = []
    for key, size in keys:
        for start in range(0, size, PART):
            end = min(start + PART, size) - 1
            lines += [f'url = "{endpoint}/{BUCKET}/{key}"', f'range = "{start}-{end}"', 'output = "/dev/null"',
                      f'user = "{ACCESS}:{SECRET}"', f'aws-sigv4 = "aws:amz:{REGION}:s3"',
                      # S3 requires the payload's hash on every request; SDKs send this on a GET.
                      'header = "x-amz-content-sha256: UNSIGNED-PAYLOAD"', "fail", "next"]
    config = scratch / "curl.cfg"
    config.write_text("\n".join(lines[:-1]) + "\n")
    done = subprocess.run(["curl", "--no-progress-meter", "--parallel", "--parallel-max", str(CONCURRENCY),
                           "-K", str(config)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr[-2000:]}")


def summary(name: str, values: list[float]) -> str:
    return f"{name}: min {min(values):.2f} / median {statistics.median(values):.2f} / max {max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=2200, help="checkpoint size in MiB (two shards)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    with tempfile.TemporaryDirectory(prefix="offloadd-remote-bench-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        local = scratch / "local"
        local.mkdir()
        shards = checkpoint(local, args.mib)
        total = sum(p.stat().st_size for p in shards)
        server = S3Server(scratch / "s3", [BUCKET])
        d = None
        try:
            s3 = server.client()
            keys = []
            s3.upload_file(str(local / "model.safetensors.index.json"), BUCKET, PREFIX + "model.safetensors.index.json")
            for p in shards:
                s3.upload_file(str(p), BUCKET, PREFIX + p.name)
                keys.append((PREFIX + p.name, p.stat().st_size))
            d = remote_daemon(server, BUCKET, [str(local)], scratch)
            urls = [f"s3://{BUCKET}/{k}" for k, _ in keys]
            runai_env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                         "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                         "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
            print(f"checkpoint {total / 1e9:.2f} GB in {len(shards)} shards; "
                  f"rounds of: bound (curl), offloadd s3://, runai s3://, offloadd local files", flush=True)
            rows: dict[str, list[float]] = {"vs bound": [], "vs runai": [], "local vs bound": []}
            anon_growth_kb = 0
            with offloadd.connect(d.uds) as c:
                c.create_pool("bench", size_bytes=total + (64 << 20))
                for r in range(args.rounds):
                    srv0, ch0 = cpu_of(server.proc.pid), children_cpu()
                    t0 = time.perf_counter()
                    curl_bound(server.endpoint, keys, scratch)
                    bound_s = time.perf_counter() - t0
                    bound_cpu, bound_srv = children_cpu() - ch0, cpu_of(server.proc.pid) - srv0

                    srv0, dm0 = cpu_of(server.proc.pid), cpu_of(d.pid)
                    with AnonPeak(d.pid) as peak:
                        t0 = time.perf_counter()
                        m = c.register_model("remote", pool="bench", path=f"s3://{BUCKET}/{PREFIX}")
                        ours_s = time.perf_counter() - t0
                    ours_cpu, ours_srv = cpu_of(d.pid) - dm0, cpu_of(server.proc.pid) - srv0
                    assert m.loaded_bytes == m.bytes >= total - (1 << 20) and len(m.source_objects) == len(shards), m
                    anon_growth_kb = max(anon_growth_kb, peak.peak_kb - peak.before_kb)
                    c.unregister_model("remote")

                    srv0 = cpu_of(server.proc.pid)
                    out = subprocess.run([sys.executable, "-c", RUNAI, *urls], env=runai_env, check=True,
                                         capture_output=True, text=True).stdout
                    runai = json.loads(out.strip().splitlines()[-1])
                    runai_srv = cpu_of(server.proc.pid) - srv0
                    assert runai["bytes"] >= total - (1 << 20), runai

                    dm0 = cpu_of(d.pid)
                    t0 = time.perf_counter()
                    c.register_model("local", pool="bench", path=str(local))
                    local_s = time.perf_counter() - t0
                    local_cpu = cpu_of(d.pid) - dm0
                    c.unregister_model("local")

                    gbs = total / 1e9
                    print(f"round {r + 1}: bound {gbs / bound_s:.2f} GB/s (curl {bound_cpu:.2f} + server "
                          f"{bound_srv:.2f} CPU-s); offloadd s3 {gbs / ours_s:.2f} GB/s (daemon {ours_cpu:.2f} + "
                          f"server {ours_srv:.2f} CPU-s); runai {gbs / runai['seconds']:.2f} GB/s "
                          f"({runai['cpu']:.2f} + server {runai_srv:.2f} CPU-s); offloadd local "
                          f"{gbs / local_s:.2f} GB/s ({local_cpu:.2f} CPU-s)", flush=True)
                    rows["vs bound"].append(bound_s / ours_s)
                    rows["vs runai"].append(runai["seconds"] / ours_s)
                    rows["local vs bound"].append(bound_s / local_s)
            for name, values in rows.items():
                print(summary(f"offloadd s3 {name}" if name != "local vs bound" else "offloadd local files vs bound",
                              values))
            print(f"daemon anonymous memory, largest growth during an s3 load: {anon_growth_kb / 1024:.1f} MiB "
                  f"(fetch_concurrency x fetch_part_bytes = {CONCURRENCY * PART >> 20} MiB)")
        finally:
            if d is not None:
                d.stop()
            server.stop()


if __name__ == "__main__":
    main()
