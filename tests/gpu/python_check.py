#!/usr/bin/env python3
"""GPU check of the Python client (tests/gpu/check.sh runs it after check.py).

A seeded, randomly initialised Llama (8 layers, about 320 MB in bf16; the GPU machine has no
network, and a trained checkpoint is too big to carry) is written as safetensors and served by
the real daemon on cuda:0. Through ``offloadd.hf.from_daemon`` it must generate the same greedy
tokens as the same checkpoint loaded all on the GPU, with:

  * prefetch, synchronous onloads over the fast path;
  * prefetch, asynchronous onloads with the inter-process events (fast path, and the RPC over
    TCP), including a wrapping next-prefetch table and a half-offloaded stack;
  * uva REGISTERED (the pool registered by this process, only because the lease says pinned),
    with a budget that leaves one layer half placed;
  * with VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1 on the daemon: nothing pinned or
    registered here, uva copy-on-use and prefetch through the daemon's staging.

Then decode tokens/s of offloadd prefetch against an in-process baseline in the same run: the
same static slot layout in this process's own device buffer, filled from pinned CPU tensors on a
side stream with events, as vLLM's prefetch offloader does. ``--device cpu`` runs what needs no
GPU (a dry run of the script itself).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "python" / "tests"))

import offloadd  # noqa: E402
import placement  # noqa: E402
from offloadd import hf as ohf  # noqa: E402
from offloadd.v1 import offloadd_pb2 as pb  # noqa: E402

FAILURES: list[str] = []
#: The logits' tolerance: how far the reference's own logits move with its weights elsewhere in
#: device memory (python/tests/placement.py), measured in main().
TOLERANCE = placement.Tolerance(0.0, {})
PROMPTS = [[1, 450, 7483, 310, 3444, 338], [1, 822, 18755, 29898, 29876, 1125, 13, 1678]]
NEW_TOKENS = 32


def expect(cond: bool, msg: str) -> bool:
    if not cond:
        FAILURES.append(msg)
        print(f"FAIL: {msg}", flush=True)
    return cond


def write_model(out: Path, small: bool) -> transformers.LlamaConfig:
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=256 if small else 1024, intermediate_size=512 if small else 2816,
        num_hidden_layers=8, num_attention_heads=8 if small else 16, num_key_value_heads=4 if small else 8,
        max_position_embeddings=1024, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return cfg


def generate(model: torch.nn.Module, device: torch.device, new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], torch.Tensor]]:
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            r = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        out.append((r.sequences[0].tolist(), torch.stack(r.logits).float().cpu()))
    return out


def compare(label: str, got: list, want: list) -> None:
    same_tokens = all(g[0] == w[0] for g, w in zip(got, want, strict=True))
    diff = max(float((g[1] - w[1]).abs().max()) for g, w in zip(got, want, strict=True))
    expect(same_tokens, f"{label}: tokens differ from the all-on-GPU model: {got[0][0][-8:]} vs {want[0][0][-8:]}")
    expect(diff <= TOLERANCE.bound, f"{label}: logits differ by {diff:.3g}, beyond the {TOLERANCE.describe()}")
    print(f"  {label}: tokens {'identical' if same_tokens else 'DIFFER'} over {len(PROMPTS)} prompts x {NEW_TOKENS}; "
          f"logits max |diff| {diff:.3g}{' (bit-identical)' if diff == 0 else ''}", flush=True)


def decode_tps(model: torch.nn.Module, device: torch.device, reps: int = 3, n: int = 64) -> float:
    """Decode tokens/s: (time for 1 + n new tokens - time for 1) / n, best of ``reps``."""
    ids = torch.tensor([PROMPTS[0]], device=device)

    def run(k: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(4)  # warm up kernels, allocator and hooks
    best = 0.0
    for _ in range(reps):
        best = max(best, n / max(run(1 + n) - run(1), 1e-9))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InProcessPrefetch:
    """The baseline: vLLM's prefetch offloader in this process. Offloaded weights are pinned
    CPU tensors copied on a side stream into this process's own static buffer, laid out as the
    lease lays out the daemon's; the compute stream waits on "copy done", the side stream on
    "slot free"."""

    def __init__(self, model: torch.nn.Module, lease: offloadd.Lease, weights: dict[str, torch.Tensor], device: torch.device) -> None:
        self.lease, self.device = lease, device
        static_size = max(lease.raw.segments[t.static_segment].size_bytes for t in lease.tensors.values() if t.static_segment is not None)
        self.buffer = torch.empty(static_size, dtype=torch.uint8, device=device)
        self.pinned: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, p in list(model.named_parameters()):
            t = lease.tensors[name]
            if t.placement == "prefetch":
                slot = self.buffer[t.static_offset : t.static_offset + t.length].view(p.dtype).view(p.shape)
                src = weights[name].pin_memory() if device.type == "cuda" else weights[name]
                self.pinned.setdefault(t.layer, []).append((slot, src))
                p.data = slot
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        slots = lease.prefetch_step
        self.done = [torch.cuda.Event() for _ in range(slots)] if self.stream else []
        self.free = [torch.cuda.Event() for _ in range(slots)] if self.stream else []
        self.k_of = {layer: k for k, layer in enumerate(lease.offloaded_layers)}
        layers = model.model.layers
        self.primed = False
        layers[0].register_forward_pre_hook(lambda _m, _a: self.prime())
        for k, layer in enumerate(lease.offloaded_layers):
            layers[layer].register_forward_pre_hook(lambda _m, _a, k=k: self.before(k))
            layers[layer].register_forward_hook(lambda _m, _a, _o, k=k: self.after(k))

    def onload(self, layer: int) -> None:
        slot = self.k_of[layer] % self.lease.prefetch_step
        if self.stream is None:
            for dst, src in self.pinned[layer]:
                dst.copy_(src)
            return
        self.stream.wait_event(self.free[slot])
        with torch.cuda.stream(self.stream):
            for dst, src in self.pinned[layer]:
                dst.copy_(src, non_blocking=True)
            self.done[slot].record(self.stream)

    def prime(self) -> None:
        if not self.primed:
            for layer in self.lease.offloaded_layers[: self.lease.prefetch_step]:
                self.onload(layer)
            self.primed = True

    def before(self, k: int) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done[k % self.lease.prefetch_step])

    def after(self, k: int) -> None:
        if self.stream is not None:
            self.free[k % self.lease.prefetch_step].record(torch.cuda.current_stream(self.device))
        self.onload(self.lease.prefetch_next[k])


def prefetch(group: int, num: int, step: int) -> pb.Backend:
    return pb.Backend(prefetch=pb.PrefetchConfig(group_size=group, num_in_group=num, prefetch_step=step))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offloadd", default=str(REPO / ".gpu-carry" / "offloadd"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a small model (CPU dry runs)")
    args = ap.parse_args()
    os.environ["OFFLOADD_BIN"] = args.offloadd
    from daemon import Daemon  # python/tests/daemon.py: the real binary on a Unix socket (+TCP)

    cuda = args.device == "cuda"
    device = torch.device("cuda:0" if cuda else "cpu")
    pool_device = "cuda:0" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="offloadd-pygpu-"))
    ckpt = work / "llama"
    t0 = time.perf_counter()
    write_model(ckpt, args.small)
    files = sorted(ckpt.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"random Llama: 8 layers, {size / 1e6:.0f} MB bf16 in {len(files)} file(s), written in {time.perf_counter() - t0:.1f} s", flush=True)
    expect(args.small or size >= 200e6, f"model is {size} bytes, want >= 200 MB")

    ref_model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()

    def outputs(m: torch.nn.Module) -> tuple[list[list[int]], list[torch.Tensor]]:
        got = generate(m, device)
        return [ids for ids, _ in got], [logits for _, logits in got]

    global TOLERANCE
    ids, logits, TOLERANCE = placement.measure(ref_model, outputs)
    want = list(zip(ids, logits, strict=True))
    print(f"reference: {TOLERANCE.describe()}", flush=True)
    tps = {"all on GPU (from_pretrained)": decode_tps(ref_model, device)}
    del ref_model
    from safetensors import safe_open

    layer_bytes = 0
    for f in files:
        with safe_open(f, "pt") as sf:
            layer_bytes += sum(2 * math.prod(sf.get_slice(k).get_shape()) for k in sf.keys() if ".layers.0." in k)

    d = Daemon([str(work)], tcp=True, env={"OFFLOADD_LOG": "info"})
    try:
        c = offloadd.connect(d.uds)
        pool = c.create_pool("gpu", size_bytes=size * 4 + (64 << 20), device=pool_device)
        print(f"pinned pool: {pool.pinned} ({pool.pin_reason})", flush=True)
        expect(not cuda or pool.pinned, f"the pool on a GPU machine is pinned: {pool.pin_reason}")

        def run(label: str, model_name: str, backend: pb.Backend, async_copy: bool | None, target: str | None = None, measure: bool = False) -> None:
            if model_name not in {m.name for m in c.list_models()}:
                c.register_model(model_name, pool="gpu", path=str(ckpt), backend=backend)
            cl = offloadd.connect(target or d.uds)
            m = ohf.from_daemon(cl, model_name, str(ckpt), device=device, dtype=torch.bfloat16,
                                worker_name=label, async_copy=async_copy if cuda else False)
            lease, binding = m.offloadd_lease, m.offloadd_binding
            print(f"  {label}: offloaded layers {lease.offloaded_layers}, next {lease.prefetch_next}, "
                  f"slots {lease.prefetch_step}, uva_mode {pb.UvaMode.Name(lease.uva_mode)}, "
                  f"async {binding.async_copy}, pinned {lease.pinned}", flush=True)
            compare(label, generate(m, device), want)
            expect(binding.onloads > 0 or not lease.offloaded_layers, f"{label}: hooks onloaded nothing")
            if measure:
                tps[label] = decode_tps(m, device)
            if lease.tensors and any(t.placement == "prefetch" for t in lease.tensors.values()):
                t = next(t for t in lease.tensors.values() if t.placement == "prefetch")
                expect(lease.static(t.name).device == device, f"{label}: static slot on {device}")
            binding.remove()
            lease.close()
            del m, lease, binding
            # Unmaps what the model held, so the next lease's mappings may land on the same
            # addresses: a registration or IPC mapping that outlived its memory would show here.
            gc.collect()

        run("prefetch (1,1,1) sync fast path", "pf111", prefetch(1, 1, 1), False, measure=True)
        run("prefetch (1,1,1) async events, fast path", "pf111", prefetch(1, 1, 1), True, measure=True)
        run("prefetch (1,1,1) async events, RPC over TCP", "pf111", prefetch(1, 1, 1), True, target=d.tcp, measure=True)
        run("prefetch (1,1,3) async, wrapping table", "pf113", prefetch(1, 1, 3), True)
        run("prefetch (2,1,2) async, half offloaded", "pf212", prefetch(2, 1, 2), True)

        # Baseline on the (1,1,1) layout: the same slots, filled in-process.
        lease = c.attach("pf111", worker_name="baseline-layout")
        from safetensors.torch import load_file
        weights = {}
        for f in files:
            weights.update(load_file(f))
        base = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
        InProcessPrefetch(base, lease, weights, device)
        compare("in-process prefetch baseline (1,1,1)", generate(base, device), want)
        tps["in-process prefetch baseline (1,1,1)"] = decode_tps(base, device)
        lease.close()
        del base, weights

        # uva with a budget that leaves one layer half placed.
        c.register_model("uva", pool="gpu", path=str(ckpt), backend=pb.Backend(uva=pb.UvaConfig(cpu_offload_bytes=int(layer_bytes * 2.5))))
        lt = c.attach("uva", worker_name="uva-table")
        by_layer: dict[int, set[str]] = {}
        for t in lt.tensors.values():
            if t.layer is not None:
                by_layer.setdefault(t.layer, set()).add(t.placement)
        half = [layer for layer, ps in by_layer.items() if ps == {"uva", "device"}]
        expect(len(half) == 1, f"uva: one layer half placed, got {half} ({by_layer})")
        want_mode = pb.UVA_MODE_REGISTERED if cuda else pb.UVA_MODE_PAGEABLE
        expect(not cuda or lt.uva_mode == want_mode, f"uva mode {pb.UvaMode.Name(lt.uva_mode)}")
        lt.close()
        run("uva REGISTERED, one layer half placed", "uva", pb.Backend(), None)
        for m in c.list_models():
            c.unregister_model(m.name)
        c.delete_pool("gpu")
        c.close()
    finally:
        code = d.stop()
        expect(code == 0, f"daemon exited {code}")

    gc.collect()
    if cuda:
        # The pin policy off: nothing pinned by the daemon, nothing registered here.
        d = Daemon([str(work)], env={"OFFLOADD_LOG": "info", "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY": "1"})
        try:
            c = offloadd.connect(d.uds)
            pool = c.create_pool("gpu", size_bytes=size * 2 + (64 << 20), device=pool_device)
            expect(not pool.pinned, f"pin policy off: pool pinned {pool.pinned}")
            c.register_model("uva", pool="gpu", path=str(ckpt), backend=pb.Backend(uva=pb.UvaConfig(cpu_offload_bytes=int(layer_bytes * 2.5))))
            c.register_model("pf", pool="gpu", path=str(ckpt), backend=prefetch(1, 1, 2))
            lt = c.attach("uva", worker_name="copy-on-use-table")
            expect(lt.uva_mode == pb.UVA_MODE_COPY_ON_USE and not lt.pinned, f"pin off: uva mode {pb.UvaMode.Name(lt.uva_mode)}, pinned {lt.pinned}")
            lt.close()
            for label, name in [("pin off: uva copy-on-use", "uva"), ("pin off: prefetch (1,1,2) async, staged", "pf")]:
                m = ohf.from_daemon(c, name, str(ckpt), device=device, dtype=torch.bfloat16, worker_name=label)
                compare(label, generate(m, device), want)
                m.offloadd_binding.remove()
                m.offloadd_lease.close()
                del m
                gc.collect()
            c.close()
        finally:
            code = d.stop()
            expect(code == 0, f"daemon (pin off) exited {code}")

    shutil.rmtree(work, ignore_errors=True)
    base_tps = tps.get("in-process prefetch baseline (1,1,1)", 0.0)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\n{name}, decode tokens/s (best of 3, 64 tokens, batch 1)\n\n| model | tokens/s | vs in-process baseline |\n| --- | --- | --- |")
    for label, v in tps.items():
        print(f"| {label} | {v:.1f} | {v / base_tps:.2f} |" if base_tps else f"| {label} | {v:.1f} | - |")
    print(json.dumps({"tokens_per_s": tps}))
    print(f"\n{len(FAILURES)} failed checks" if FAILURES else "\nall Python GPU checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
