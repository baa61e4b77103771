"""One vLLM "engine start" on CPU: vLLM's real config, loader and model classes, as the model
runner drives them (set the offloader, load the model, post_init), minus the forward pass that
the CUDA-only PyPI wheel cannot run here.

    python engine.py SPEC_JSON

SPEC: {"ckpt", "dtype", "load_format", "extra": {...}, "offload": {"backend", ...},
"onload": bool, "loads": N}. Prints one JSON line per load: outcome, reason, a digest per
parameter (after onloading its layer, for prefetch), where each parameter lives, the seconds
load_model took, how often load_model opened the checkpoint file, and the process's anonymous
memory before and after.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path


class FileOpens:
    """Counts opens of a file by any process (inotify IN_OPEN): safetensors opens files from
    Rust, where Python's audit hooks cannot see."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0
        assert self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) >= 0

    def count(self) -> int:
        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            n += len(buf) // 16  # struct inotify_event with no name: 16 bytes each

    def close(self) -> None:
        os.close(self.fd)


def anon_kb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous in smaps_rollup")


def digest(t) -> str:
    import torch

    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()  # before the config classes are imported
    import vllm.plugins
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, OffloadConfig, VllmConfig, set_current_vllm_config
    from vllm.config.offload import PrefetchOffloadConfig, UVAOffloadConfig
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.offloader.base import NoopOffloader, get_offloader, set_offloader

    vllm.plugins.load_general_plugins()  # the real entry point registers --load-format offloadd
    off = spec.get("offload", {})
    offload = OffloadConfig(
        offload_backend=off.get("backend", "auto"),
        uva=UVAOffloadConfig(cpu_offload_gb=off.get("cpu_offload_gb", 0)),
        prefetch=PrefetchOffloadConfig(
            offload_group_size=off.get("group_size", 0),
            offload_num_in_group=off.get("num_in_group", 1),
            offload_prefetch_step=off.get("prefetch_step", 1),
        ),
    )
    mc = ModelConfig(model=spec["ckpt"], dtype=spec.get("dtype", "float32"), enforce_eager=True)
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), offload_config=offload,
                    load_config=LoadConfig(load_format=spec["load_format"], model_loader_extra_config=spec.get("extra", {})))
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{spec['port']}")
        ensure_model_parallel_initialized(1, 1)
        for _ in range(spec.get("loads", 1)):
            set_offloader(NoopOffloader())  # what the runner's create_offloader gives without offload
            loader = get_model_loader(vc.load_config)
            before = anon_kb()
            opens = FileOpens(Path(spec["ckpt"]) / "model.safetensors")
            started = time.perf_counter()
            try:
                model = loader.load_model(vllm_config=vc, model_config=mc)
            except Exception as e:  # reported to the test, which asserts on it
                print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
                continue
            seconds = time.perf_counter() - started
            checkpoint_opens = opens.count()
            opens.close()
            hijacked = []
            if spec.get("hijack"):
                # Another offloader takes the place of ours after loading, as when a vLLM
                # release moves where the runner installs it (vLLM #51396).
                ours = model.offloadd_offloader
                set_offloader(NoopOffloader())
                for check in (ours.post_init, ours.check_active):
                    try:
                        check()
                    except RuntimeError as e:
                        hijacked.append(str(e))
            get_offloader().post_init()  # as GPUModelRunner.load_model does
            print(json.dumps({**report(model, loader, spec, seconds, before), "checkpoint_opens": checkpoint_opens,
                              "hijacked": hijacked}), flush=True)
    if spec.get("hold"):
        sys.stdin.read()


def report(model, loader, spec, seconds, before) -> dict:
    lease = getattr(model, "offloadd_lease", None)
    offloader = getattr(model, "offloadd_offloader", None)
    where: dict[str, str] = {}
    digests: dict[str, str] = {}
    if lease is not None and spec.get("onload"):
        for layer in lease.offloaded_layers:
            lease.onload(layer)
            for name, p in model.named_parameters():
                if f".{layer}." in f".{name}" and lease.tensor(name).placement == "prefetch":
                    digests[name] = digest(p)
    ranges = {}
    if lease is not None:
        ranges = {"pool": lease.segment_range(0)}
        if len(lease.raw.segments) > 1:
            ranges["static"] = lease.segment_range(1)
    for name, p in model.named_parameters():
        digests.setdefault(name, digest(p))
        for label, (start, length) in ranges.items():
            if start <= p.data_ptr() < start + length:
                where[name] = label
    return {
        "outcome": getattr(loader, "outcome", "default"), "reason": getattr(loader, "reason", ""),
        "digests": digests, "where": where,
        "placements": {n: t.placement for n, t in lease.tensors.items()} if lease else {},
        "offloaded_layers": lease.offloaded_layers if lease else [],
        "pinned": lease.pinned if lease else None,
        "pin_mismatch": offloader.pin_mismatch if offloader else None,
        "offloader": type(__import__("vllm.model_executor.offloader.base", fromlist=["x"]).get_offloader()).__name__,
        "load_s": seconds, "anon_before_kb": before, "anon_after_kb": anon_kb(),
        "vm_lck_kb": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmLck")),
        "pid": os.getpid(),
    }


if __name__ == "__main__":
    main()
