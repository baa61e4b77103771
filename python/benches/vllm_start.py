"""vLLM start to model ready: ``--load-format offloadd`` attaching to a published SmolLM2 (a
second start) against vLLM's DefaultModelLoader from the page cache, both timed around
``load_model`` in the same run. Run with the vLLM venv's python:

    python python/benches/vllm_start.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests_vllm"), str(ROOT / "tests")]
from conftest import run_engine  # noqa: E402
from daemon import REPO, Daemon  # noqa: E402
from smollm2 import ensure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    ckpt = str(ensure())
    d = Daemon([ckpt])
    try:
        ours = {"ckpt": ckpt, "load_format": "offloadd", "extra": {"socket": d.uds}}
        assert run_engine(ours)["outcome"] == "published"
        default = [run_engine({"ckpt": ckpt, "load_format": "auto"})["load_s"] for _ in range(args.runs)]
        attached = []
        for _ in range(args.runs):
            r = run_engine(ours)
            assert r["outcome"] == "attached", r["reason"]
            attached.append(r["load_s"])
    finally:
        d.stop()
    o, t = statistics.median(attached), statistics.median(default)
    print(f"vLLM load_model, SmolLM2-135M f32 on CPU, median of {args.runs}:")
    print(f"  --load-format offloadd (second start, attach)  {o:.3f} s  {sorted(round(x, 3) for x in attached)}")
    print(f"  DefaultModelLoader from the page cache         {t:.3f} s  {sorted(round(x, 3) for x in default)}")
    print(f"  ratio                                          {t / o:.2f}x")


if __name__ == "__main__":
    main()
