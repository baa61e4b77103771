"""Two worker processes on one model share one host copy of its weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import offloadd
from conftest import PROMPTS
from daemon import Daemon
from measure import pss_of_files_under, shmem_kb

HERE = Path(__file__).resolve().parent


def test_two_workers_share_one_host_copy(smol_dir, reference):
    shmem_before = shmem_kb()
    d = Daemon([str(smol_dir)])
    workers: list[subprocess.Popen] = []
    try:
        with offloadd.connect(d.uds) as c:
            c.create_pool("p", size_bytes=(smol_dir / "model.safetensors").stat().st_size + (1 << 20))
            model_bytes = c.register_model("smol", pool="p", path=str(smol_dir),
                                           backend=offloadd.prefetch(4, 1, 2)).bytes
        for _ in range(2):
            workers.append(subprocess.Popen(
                [sys.executable, str(HERE / "worker_proc.py"), d.uds, "smol", str(smol_dir), PROMPTS[0], "8"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        reports = [json.loads(w.stdout.readline()) for w in workers]
        shmem_kb_used = shmem_kb() - shmem_before
        pool_pss_kb = [pss_of_files_under(w.pid, d.pools.name) for w in workers]
        with offloadd.connect(d.uds) as c:
            assert c.get_model("smol").attached_workers == 2
    finally:
        for w in workers:
            w.stdin.close()
            assert w.wait(timeout=60) == 0
        assert d.stop() == 0
    want = reference.outputs[PROMPTS[0]][0][:8].tolist()
    assert [r["tokens"] for r in reports] == [want, want]
    bound_kb = (model_bytes + sum(r["static_bytes"] for r in reports)) / 1024
    print(f"\nshared memory {shmem_kb_used} kB, Pss of pool+static mappings {pool_pss_kb} kB, "
          f"anonymous growth {[r['anon_after_kb'] - r['anon_before_kb'] for r in reports]} kB, "
          f"model + statics {bound_kb:.0f} kB")
    assert shmem_kb_used <= 1.05 * bound_kb, "one host copy plus the static slots, not two"
    assert sum(pool_pss_kb) <= 1.05 * bound_kb, "both workers map the same pages"
    for r in reports:
        grown = r["anon_after_kb"] - r["anon_before_kb"]
        assert grown < 0.10 * model_bytes / 1024, f"a worker made a private copy ({grown} kB)"
