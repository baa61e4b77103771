"""A worker restarted (SIGKILL, then started again): seconds from process start to its first
token on SmolLM2 weights that offloadd already holds, against ``from_pretrained`` of the same
checkpoint from the page cache, measured the same way in the same run.

    python python/benches/first_token.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import offloadd  # noqa: E402
from daemon import REPO, Daemon  # noqa: E402
from smollm2 import ensure  # noqa: E402

PROMPT = "The capital of France is"

BASELINE = r"""
import sys, time
from worker_proc import since_process_start
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
load_s = time.perf_counter() - t
ids = tok(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
print('{"first_token_s": %f, "load_s": %f}' % (since_process_start(), load_s), flush=True)
"""


def offloadd_worker(uds: str, ckpt: Path) -> dict[str, float]:
    """Starts a worker, reads its first-token time, kills it with SIGKILL (no detach)."""
    p = subprocess.Popen([sys.executable, str(TESTS / "worker_proc.py"), uds, "smol", str(ckpt), PROMPT, "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    report = json.loads(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    p.wait()
    return report


def baseline(ckpt: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", BASELINE, str(ckpt), PROMPT], check=True,
                         capture_output=True, text=True, cwd=TESTS).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", default="prefetch", choices=["prefetch", "uva", "device"])
    args = ap.parse_args()
    os.environ.setdefault("OFFLOADD_BIN", str(REPO / "target" / "release" / "offloadd"))
    ckpt = ensure()
    backend = {"prefetch": offloadd.prefetch(4, 1, 2), "uva": offloadd.uva(1 << 40), "device": None}[args.backend]
    d = Daemon([str(ckpt)])
    try:
        with offloadd.connect(d.uds) as c:
            c.create_pool("p", size_bytes=(ckpt / "model.safetensors").stat().st_size + (1 << 20))
            c.register_model("smol", pool="p", path=str(ckpt), backend=backend)
        baseline(ckpt)  # warm the page cache and the interpreter's own files
        offloadd_worker(d.uds, ckpt)
        ours = [offloadd_worker(d.uds, ckpt) for _ in range(args.runs)]
        theirs = [baseline(ckpt) for _ in range(args.runs)]
    finally:
        d.stop()
    print(f"SmolLM2-135M f32, median of {args.runs} ({args.backend}); offloadd.hf.from_daemon in a worker "
          "restarted after SIGKILL vs from_pretrained from the page cache:")
    for key, what in (("first_token_s", "process start -> first token"), ("load_s", "model build + weights")):
        o = statistics.median(r[key] for r in ours)
        t = statistics.median(r[key] for r in theirs)
        print(f"  {what:30s} offloadd {o:6.3f} s   from_pretrained {t:6.3f} s   ratio {t / o:5.2f}x")


if __name__ == "__main__":
    main()
