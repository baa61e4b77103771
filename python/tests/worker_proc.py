"""A worker process for the tests and benchmarks: attach, build SmolLM2 over the daemon's
weights, generate, report, then hold the lease until stdin closes.

    python worker_proc.py UDS MODEL CONFIG_DIR PROMPT NEW_TOKENS

Prints one JSON line: tokens, the anonymous memory before and after, the lease's static bytes,
seconds from interpreter start to the first generated token, and seconds to build and bind
the model (from_daemon).
"""

from __future__ import annotations

import json
import os
import sys
import time


def since_process_start() -> float:
    """Seconds since this process was started (by the kernel's clock, so interpreter start-up
    and imports count), to 10 ms."""
    stat = open("/proc/self/stat").read()
    started = int(stat[stat.rindex(")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(open("/proc/uptime").read().split()[0]) - started


def anon_kb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous line in smaps_rollup")


def main() -> None:
    uds, model_name, config_dir, prompt, new_tokens = sys.argv[1:6]
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import offloadd
    import offloadd.hf

    # Imports and the tokenizer first, so the growth measured below is what binding and
    # generating cost: a private copy of the weights would show there.
    tok = AutoTokenizer.from_pretrained(config_dir)
    offloadd.hf.model_class(AutoConfig.from_pretrained(config_dir))
    before = anon_kb()
    started = time.perf_counter()
    client = offloadd.connect(uds)
    model = offloadd.hf.from_daemon(client, model_name, config_dir, worker_name=f"worker-{model_name}")
    load_s = time.perf_counter() - started
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
        first_token_s = since_process_start()
        out = model.generate(ids, max_new_tokens=int(new_tokens), do_sample=False, pad_token_id=tok.eos_token_id)
    lease = model.offloadd_lease
    statics = sum(s.size_bytes for s in lease.raw.segments[1:])
    print(json.dumps({
        "tokens": out[0, ids.shape[1]:].tolist(), "first": first[0, -1].item(),
        "anon_before_kb": before, "anon_after_kb": anon_kb(), "static_bytes": statics,
        "first_token_s": first_token_s, "load_s": load_s,
    }), flush=True)
    sys.stdin.read()
    lease.close()


if __name__ == "__main__":
    main()
