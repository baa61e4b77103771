#!/usr/bin/env python3
"""GPU end-to-end check for offloadd's CUDA data plane (tests/gpu/check.sh runs this).

Starts the real daemon twice on cuda:0 (pinning allowed, then VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1),
and as a worker in another process (this script: grpcio + the daemon's descriptor set + libcuda
through ctypes) verifies:
  * the pin decision, and through the driver that exactly the pool was registered, or nothing;
  * prefetch: static buffers opened by CUDA IPC handle, every slot's bytes after OnloadToStatic,
    over several passes, with a wrapping next-prefetch table;
  * uva: REGISTERED (own mapping registered, read through its device pointer) or COPY_ON_USE;
  * the Rust reference worker verifying every tensor's checksum;
and prints the performance table: OnloadToStatic vs raw pinned cuMemcpyHtoD, unpinned-with-staging
vs pinned, pageable direct copy vs pinned, registered bytes vs pool size.
"""
import argparse
import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from safetensors.numpy import save_file

MIB = 1 << 20
FAILURES = []
ARGS = None


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL: {msg}", flush=True)


def expect(cond, msg):
    if not cond:
        fail(msg)
    return cond


# ---------------------------------------------------------------- protobuf without generated code
class Api:
    def __init__(self, descriptor, uds):
        fds = descriptor_pb2.FileDescriptorSet.FromString(open(descriptor, "rb").read())
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:
            pool.Add(f)
        self.pool = pool
        self.ch = grpc.insecure_channel("unix:" + uds, options=[("grpc.default_authority", "localhost")])

    def msg(self, name):
        d = self.pool.FindMessageTypeByName("offloadd.v1." + name)
        try:
            return message_factory.GetMessageClass(d)
        except AttributeError:
            return message_factory.MessageFactory(self.pool).GetPrototype(d)

    def call(self, method, req, resp, **fields):
        Req, Resp = self.msg(req), self.msg(resp)
        fn = self.ch.unary_unary(
            "/offloadd.v1.Offload/" + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=Resp.FromString,
        )
        return fn(Req(**fields), timeout=300)


# ---------------------------------------------------------------- libcuda through ctypes
c_u64, c_sz, c_vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
cuda = None


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class IpcEventHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


def load_cuda():
    global cuda
    cuda = ctypes.CDLL("libcuda.so.1")
    for name, args in {
        "cuMemcpyHtoD_v2": [c_u64, c_vp, c_sz],
        "cuMemcpyDtoH_v2": [c_vp, c_u64, c_sz],
        "cuMemHostRegister_v2": [c_vp, c_sz, ctypes.c_uint],
        "cuMemHostUnregister": [c_vp],
        "cuMemHostGetDevicePointer_v2": [ctypes.POINTER(c_u64), c_vp, ctypes.c_uint],
        "cuMemAllocHost_v2": [ctypes.POINTER(c_vp), c_sz],
        "cuMemAlloc_v2": [ctypes.POINTER(c_u64), c_sz],
        "cuMemFree_v2": [c_u64],
        "cuMemFreeHost": [c_vp],
    }.items():
        getattr(cuda, name).argtypes = args
    cuda.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(c_u64), IpcHandle, ctypes.c_uint]
    cuda.cuIpcOpenEventHandle.argtypes = [ctypes.POINTER(c_vp), IpcEventHandle]
    cuda.cuIpcGetEventHandle.argtypes = [ctypes.POINTER(IpcEventHandle), c_vp]
    cuda.cuEventCreate.argtypes = [ctypes.POINTER(c_vp), ctypes.c_uint]
    cuda.cuEventRecord.argtypes = [c_vp, c_vp]
    cuda.cuEventSynchronize.argtypes = [c_vp]
    cuda.cuStreamCreate.argtypes = [ctypes.POINTER(c_vp), ctypes.c_uint]
    cuda.cuStreamWaitEvent.argtypes = [c_vp, c_vp, ctypes.c_uint]
    cuda.cuStreamSynchronize.argtypes = [c_vp]


def ck(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what}: CUresult {rc}")


def cuda_init():
    load_cuda()
    ck(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ck(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = c_vp()
    ck(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ck(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def dtoh(dptr, n):
    out = np.empty(n, dtype=np.uint8)
    ck(cuda.cuMemcpyDtoH_v2(out.ctypes.data, dptr, n), "cuMemcpyDtoH")
    return out


def sync():
    ck(cuda.cuCtxSynchronize(), "cuCtxSynchronize")


# ---------------------------------------------------------------- daemon
class Daemon:
    """The real daemon in its own pools dir (`pools_dir`: a second start there adopts what the
    first left), with `env_extra` in its environment and `sets` as extra `--set` overrides."""

    def __init__(self, args, work, tag, env_extra=None, sets=(), pools_dir=None):
        self.tag = tag
        self.uds = os.path.join(work, f"{tag}.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOADD_", "VLLM_"))}
        env.update(env_extra or {})
        env["OFFLOADD_LOG"] = "info"
        cmd = [args.offloadd, "serve", "--uds-path", self.uds, "--pools-dir", pools_dir or f"/dev/shm/offloadd-gpu-{tag}",
               "--set", f"models.roots={work}", "--set", "pools.keep_on_exit=false"]
        for kv in sets:
            cmd += ["--set", kv]
        # Appended: a restarted daemon with the same tag keeps the first one's log.
        self.log = open(os.path.join(work, f"{tag}.log"), "a")
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            raise RuntimeError(f"daemon ({tag}) exited: see {self.log.name}:\n" + open(self.log.name).read()[-3000:])
        self.ready = json.loads(line)
        self.api = Api(args.descriptor, self.uds)

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=60)

    def stop(self):
        self.p.terminate()
        rc = self.p.wait(timeout=60)
        expect(rc == 0, f"{self.tag}: daemon exited {rc} after SIGTERM")


def parse_args():
    """The binaries and descriptor set that tests/gpu/check.sh passes to each check."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--offloadd", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--descriptor", required=True)
    return ap.parse_args()


def write_models(work):
    rng = np.random.default_rng(7)
    small = {}
    for l in range(5):
        small[f"model.layers.{l}.self_attn.qkv.weight"] = rng.integers(0, 255, (3 * 256, 256), dtype=np.uint8).view(np.float16)
        small[f"model.layers.{l}.mlp.up.weight"] = rng.integers(0, 255, (512, 256), dtype=np.uint8)
        small[f"model.layers.{l}.norm.weight"] = rng.standard_normal(256).astype(np.float32)
    small["model.embed_tokens.weight"] = rng.standard_normal((64, 256)).astype(np.float16)
    save_file(small, os.path.join(work, "small.safetensors"))
    big = {f"model.layers.{l}.mlp.w": np.full(256 * MIB, l, dtype=np.uint8) for l in range(6)}
    save_file(big, os.path.join(work, "big.safetensors"))


def verify_prefetch(d, pool_map, label, passes=3):
    api = d.api
    P, B = api.msg("PrefetchConfig"), api.msg("Backend")
    api.call("RegisterModel", "RegisterModelRequest", "Model", name="pf", pool="gpu", path=d.small, wait=True,
             backend=B(prefetch=P(group_size=1, num_in_group=1, prefetch_step=2)))
    lease = api.call("AttachWorker", "AttachWorkerRequest", "Lease", model="pf", worker_name="py-" + label, ttl_ms=60000)
    expect(list(lease.prefetch_next) == [2, 3, 4, 1, 0], f"{label}: prefetch_next {list(lease.prefetch_next)}")
    static = lease.segments[1]
    expect(len(static.ipc_handle) == 64 and static.path == "", f"{label}: static segment is a CUDA IPC handle")
    base = c_u64()
    ck(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(base), IpcHandle.from_buffer_copy(static.ipc_handle), 1), "cuIpcOpenMemHandle")
    PREFETCH = 3
    by_layer = {}
    for t in lease.tensors:
        if t.placement == PREFETCH:
            by_layer.setdefault(t.layer, []).append(t)
    onl = lambda layer: api.call("OnloadToStatic", "OnloadToStaticRequest", "OnloadToStaticResponse", lease_id=lease.lease_id, layer=layer)
    checked = 0
    for layer in list(lease.offloaded_layers)[: lease.prefetch_slots]:
        onl(layer)
    for _ in range(passes):
        for k, layer in enumerate(lease.offloaded_layers):
            for t in by_layer[layer]:
                got = dtoh(base.value + t.static_offset, t.length)
                want = np.frombuffer(pool_map, dtype=np.uint8, count=t.length, offset=t.offset)
                checked += expect(np.array_equal(got, want), f"{label}: slot bytes of {t.name}")
            onl(lease.prefetch_next[k])
    ck(cuda.cuIpcCloseMemHandle(base), "cuIpcCloseMemHandle")
    api.call("DetachWorker", "DetachWorkerRequest", "DetachWorkerResponse", lease_id=lease.lease_id)
    print(f"  {label}: prefetch verified {checked} static-slot reads over {passes} passes", flush=True)


def verify_async(d, pool_map, label, passes=3):
    """vLLM's fork/join across processes: the daemon's copy waits on our "slot free" event and
    records its "copy done" event, which our stream waits on; no RPC reply is awaited before use."""
    api = d.api
    lease = api.call("AttachWorker", "AttachWorkerRequest", "Lease", model="pf", worker_name="py-async-" + label, ttl_ms=60000)
    slots = lease.prefetch_slots
    expect(len(lease.copy_done_events) == slots, f"{label}: one copy-done event per slot")
    base = c_u64()
    ck(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(base), IpcHandle.from_buffer_copy(lease.segments[1].ipc_handle), 1), "cuIpcOpenMemHandle")
    done = []
    for h in lease.copy_done_events:
        ev = c_vp()
        ck(cuda.cuIpcOpenEventHandle(ctypes.byref(ev), IpcEventHandle.from_buffer_copy(h)), "cuIpcOpenEventHandle")
        done.append(ev)
    stream = c_vp()
    ck(cuda.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")
    free, free_h = [], []
    for _ in range(slots):
        ev, h = c_vp(), IpcEventHandle()
        ck(cuda.cuEventCreate(ctypes.byref(ev), 6), "cuEventCreate(interprocess)")
        ck(cuda.cuIpcGetEventHandle(ctypes.byref(h), ev), "cuIpcGetEventHandle")
        free.append(ev)
        free_h.append(bytes(h))
    PREFETCH = 3
    by_layer = {}
    for t in lease.tensors:
        if t.placement == PREFETCH:
            by_layer.setdefault(t.layer, []).append(t)
    onl = lambda layer, free_handle=b"": api.call("OnloadToStatic", "OnloadToStaticRequest", "OnloadToStaticResponse",
                                                  lease_id=lease.lease_id, layer=layer, async_copy=True, slot_free_event=free_handle)
    for layer in list(lease.offloaded_layers)[:slots]:
        onl(layer)
    checked = 0
    for _ in range(passes):
        for k, layer in enumerate(lease.offloaded_layers):
            slot = k % slots
            ck(cuda.cuStreamWaitEvent(stream, done[slot], 0), "cuStreamWaitEvent(copy done)")
            ck(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
            for t in by_layer[layer]:
                got = dtoh(base.value + t.static_offset, t.length)
                checked += expect(np.array_equal(got, np.frombuffer(pool_map, np.uint8, t.length, t.offset)), f"{label}: async slot bytes of {t.name}")
            ck(cuda.cuEventRecord(free[slot], stream), "cuEventRecord(slot free)")
            onl(lease.prefetch_next[k], free_h[slot])
    ck(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
    ck(cuda.cuIpcCloseMemHandle(base), "cuIpcCloseMemHandle")
    api.call("DetachWorker", "DetachWorkerRequest", "DetachWorkerResponse", lease_id=lease.lease_id)
    print(f"  {label}: async (IPC events) verified {checked} static-slot reads over {passes} passes", flush=True)


def async_gbps(d, label):
    """Every layer of the big model enqueued back to back; time until the last copy-done event."""
    api = d.api
    lease = api.call("AttachWorker", "AttachWorkerRequest", "Lease", model="big", worker_name="abw-" + label, ttl_ms=120000)
    ev = c_vp()
    ck(cuda.cuIpcOpenEventHandle(ctypes.byref(ev), IpcEventHandle.from_buffer_copy(lease.copy_done_events[0])), "cuIpcOpenEventHandle")
    best = 0
    for _ in range(3):
        t = time.perf_counter()
        moved = 0
        for layer in lease.offloaded_layers:
            moved += api.call("OnloadToStatic", "OnloadToStaticRequest", "OnloadToStaticResponse", lease_id=lease.lease_id, layer=layer, async_copy=True).bytes
        ck(cuda.cuEventSynchronize(ev), "cuEventSynchronize")
        best = max(best, moved / (time.perf_counter() - t) / 1e9)
    api.call("DetachWorker", "DetachWorkerRequest", "DetachWorkerResponse", lease_id=lease.lease_id)
    print(f"  {label}: OnloadToStatic async, enqueued back to back: {best:.1f} GB/s", flush=True)
    return best


def verify_uva(d, pool_map, label, pinned):
    api = d.api
    U, B = api.msg("UvaConfig"), api.msg("Backend")
    api.call("RegisterModel", "RegisterModelRequest", "Model", name="uva", pool="gpu", path=d.small, wait=True,
             backend=B(uva=U(cpu_offload_bytes=400000)))
    lease = api.call("AttachWorker", "AttachWorkerRequest", "Lease", model="uva", worker_name="py-uva-" + label, ttl_ms=60000)
    REGISTERED, COPY_ON_USE = 2, 4
    want_mode = REGISTERED if pinned else COPY_ON_USE
    expect(lease.uva_mode == want_mode, f"{label}: uva_mode {lease.uva_mode}, want {want_mode}")
    expect(lease.pinned == pinned, f"{label}: lease.pinned {lease.pinned}")
    uva = [t for t in lease.tensors if t.placement == 2]
    expect(len(uva) > 0, f"{label}: some UVA tensors")
    pool_addr = ctypes.addressof(ctypes.c_char.from_buffer(pool_map))
    if lease.uva_mode == REGISTERED:
        # Register our own mapping (only because the shared decision says pin) and read through
        # the device pointer, as a kernel would.
        ck(cuda.cuMemHostRegister_v2(pool_addr, len(pool_map), 0x3), "cuMemHostRegister(worker)")
        dptr = c_u64()
        ck(cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), pool_addr, 0), "cuMemHostGetDevicePointer")
        for t in uva:
            got = dtoh(dptr.value + t.offset, t.length)
            expect(np.array_equal(got, np.frombuffer(pool_map, np.uint8, t.length, t.offset)), f"{label}: uva bytes of {t.name}")
        ck(cuda.cuMemHostUnregister(pool_addr), "cuMemHostUnregister(worker)")
    else:
        # Copy on use: H2D from the (pageable) mapping, then back.
        for t in uva:
            dev = c_u64()
            ck(cuda.cuMemAlloc_v2(ctypes.byref(dev), t.length), "cuMemAlloc")
            ck(cuda.cuMemcpyHtoD_v2(dev, pool_addr + t.offset, t.length), "cuMemcpyHtoD")
            got = dtoh(dev.value, t.length)
            ck(cuda.cuMemFree_v2(dev), "cuMemFree")
            expect(np.array_equal(got, np.frombuffer(pool_map, np.uint8, t.length, t.offset)), f"{label}: copy-on-use bytes of {t.name}")
    api.call("DetachWorker", "DetachWorkerRequest", "DetachWorkerResponse", lease_id=lease.lease_id)
    print(f"  {label}: uva verified {len(uva)} tensors (mode {'REGISTERED' if lease.uva_mode == REGISTERED else 'COPY_ON_USE'})", flush=True)


def onload_gbps(d, label):
    api = d.api
    P, B = api.msg("PrefetchConfig"), api.msg("Backend")
    api.call("RegisterModel", "RegisterModelRequest", "Model", name="big", pool="big", path=d.big, wait=True,
             backend=B(prefetch=P(group_size=1, num_in_group=1, prefetch_step=1)))
    lease = api.call("AttachWorker", "AttachWorkerRequest", "Lease", model="big", worker_name="bw-" + label, ttl_ms=120000)
    best, best_copy = 0, 0
    for _ in range(3):
        t = time.perf_counter()
        moved, copy_us = 0, 0
        for layer in lease.offloaded_layers:
            r = api.call("OnloadToStatic", "OnloadToStaticRequest", "OnloadToStaticResponse", lease_id=lease.lease_id, layer=layer)
            moved += r.bytes
            copy_us += r.copy_micros
        best = max(best, moved / (time.perf_counter() - t) / 1e9)
        best_copy = max(best_copy, moved / (copy_us * 1e-6) / 1e9)
    api.call("DetachWorker", "DetachWorkerRequest", "DetachWorkerResponse", lease_id=lease.lease_id)
    r = subprocess.run([ARGS.worker, "--uds", d.uds, "--model", "big", "--onload-bench", "3"], capture_output=True, text=True, timeout=120)
    rust = [json.loads(l) for l in r.stdout.splitlines() if "onload_bench" in l]
    rust_gbps = rust[0]["gbps"] if rust else 0.0
    expect(rust, f"{label}: Rust worker onload bench: {r.stdout[-300:]} {r.stderr[-300:]}")
    print(f"  {label}: OnloadToStatic end to end {best:.1f} GB/s (Python grpcio worker), {rust_gbps:.1f} GB/s (Rust reference worker); copy inside the daemon {best_copy:.1f} GB/s", flush=True)
    return max(best, rust_gbps)


def raw_copy_gbps(pinned, n=1024 * MIB, reps=5):
    dev = c_u64()
    ck(cuda.cuMemAlloc_v2(ctypes.byref(dev), n), "cuMemAlloc")
    if pinned:
        host = c_vp()
        ck(cuda.cuMemAllocHost_v2(ctypes.byref(host), n), "cuMemAllocHost")
        ctypes.memset(host, 1, n)
        ptr = host.value
    else:
        buf = np.ones(n, dtype=np.uint8)
        ptr = buf.ctypes.data
    best = 0
    for _ in range(reps):
        t = time.perf_counter()
        ck(cuda.cuMemcpyHtoD_v2(dev, ptr, n), "cuMemcpyHtoD")
        sync()
        best = max(best, n / (time.perf_counter() - t) / 1e9)
    if pinned:
        ck(cuda.cuMemFreeHost(host), "cuMemFreeHost")
    ck(cuda.cuMemFree_v2(dev), "cuMemFree")
    return best


def run_daemon(args, work, pinned):
    label = "pinned" if pinned else "unpinned"
    d = Daemon(args, work, label, {} if pinned else {"VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY": "1"})
    d.small, d.big = os.path.join(work, "small.safetensors"), os.path.join(work, "big.safetensors")
    api = d.api
    info = api.call("GetInfo", "GetInfoRequest", "GetInfoResponse")
    gpu = [x for x in info.devices if x.id == "cuda:0"]
    if not expect(gpu, f"{label}: GetInfo lists cuda:0 ({info.cuda_absent_reason})"):
        d.stop()
        return None
    print(f"  {label}: {gpu[0].name}, would pin: {gpu[0].pin_decision.pin} ({gpu[0].pin_decision.reason})", flush=True)
    size = 64 * MIB + 4096
    pool = api.call("CreatePool", "CreatePoolRequest", "Pool", name="gpu", device="cuda:0", size_bytes=size)
    expect(pool.pinned == pinned, f"{label}: pool.pinned {pool.pinned}: {pool.pin_reason}")
    reg = api.call("GetPool", "GetPoolRequest", "Pool", name="gpu").registered_bytes
    expect(reg == (size if pinned else 0), f"{label}: driver reports {reg} registered bytes for a {size}-byte pool")
    staging = [x for x in api.call("GetInfo", "GetInfoRequest", "GetInfoResponse").devices if x.id == "cuda:0"][0].staging
    expect(staging.allocated == (not pinned), f"{label}: the pinned staging ring exists only with an unpinned pool: {staging}")
    bigsize = 6 * 256 * MIB + 64 * MIB
    api.call("CreatePool", "CreatePoolRequest", "Pool", name="big", device="cuda:0", size_bytes=bigsize)
    big_reg = api.call("GetPool", "GetPoolRequest", "Pool", name="big").registered_bytes
    with open(pool.path, "r+b") as f:
        pool_map = mmap.mmap(f.fileno(), 0)
    verify_prefetch(d, pool_map, label)
    verify_async(d, pool_map, label)
    # The Rust reference worker on the prefetch model: opens the static buffers by IPC handle and
    # checks every slot's CRC over several passes, through the RPC and over the fast path.
    for extra in ([], ["--fast"]):
        r = subprocess.run([args.worker, "--uds", d.uds, "--model", "pf", "--passes", "3", *extra],
                           capture_output=True, text=True, timeout=120)
        done = [json.loads(l) for l in r.stdout.splitlines() if '"done"' in l]
        how = "fast path" if extra else "RPC"
        if expect(r.returncode == 0 and done, f"{label}: Rust worker prefetch ({how}): {r.stdout[-500:]} {r.stderr[-500:]}"):
            print(f"  {label}: Rust reference worker, prefetch via {how}: {done[0]['tensors_verified']} tensors verified, {done[0]['onloads']} onloads", flush=True)
    verify_uva(d, pool_map, label, pinned)
    # The Rust reference worker, in its own process, on the uva model.
    r = subprocess.run([args.worker, "--uds", d.uds, "--model", "uva", "--passes", "2", "--checkpoint", d.small],
                       capture_output=True, text=True, timeout=120)
    done = [json.loads(l) for l in r.stdout.splitlines() if '"done"' in l]
    expect(r.returncode == 0 and done, f"{label}: Rust reference worker: {r.stdout[-500:]} {r.stderr[-500:]}")
    if done:
        print(f"  {label}: Rust reference worker verified {done[0]['tensors_verified']} tensors, matched {done[0]['checkpoint_tensors_matched']} with the checkpoint", flush=True)
    gbps = onload_gbps(d, label)
    agbps = async_gbps(d, label)
    pool_map.close()
    d.stop()
    return {"async": agbps, "onload": gbps, "registered": reg, "size": size, "big_registered": big_reg, "big_size": bigsize}


def main():
    args = parse_args()
    global ARGS
    ARGS = args
    cuda_init()
    work = tempfile.mkdtemp(prefix="offloadd-gpu-")
    write_models(work)
    print("pinned run:", flush=True)
    pinned = run_daemon(args, work, True)
    print("unpinned run (VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1):", flush=True)
    unpinned = run_daemon(args, work, False)
    raw_pinned = raw_copy_gbps(True)
    raw_pageable = raw_copy_gbps(False)
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    if pinned and unpinned:
        rows = [
            ("OnloadToStatic GB/s (best worker) vs raw pinned cuMemcpyHtoD", f"{pinned['onload']:.1f} / {raw_pinned:.1f} = {pinned['onload'] / raw_pinned:.2f}", ">= 0.9", pinned["onload"] / raw_pinned >= 0.9),
            ("OnloadToStatic async (IPC events) vs raw pinned", f"{pinned['async']:.1f} / {raw_pinned:.1f} = {pinned['async'] / raw_pinned:.2f}", ">= 0.9", pinned["async"] / raw_pinned >= 0.9),
            ("unpinned-with-staging vs pinned (async)", f"{unpinned['async']:.1f} / {pinned['async']:.1f} = {unpinned['async'] / pinned['async']:.2f}", ">= 0.7", unpinned["async"] / pinned["async"] >= 0.7),
            ("unpinned-with-staging vs pinned (OnloadToStatic)", f"{unpinned['onload']:.1f} / {pinned['onload']:.1f} = {unpinned['onload'] / pinned['onload']:.2f}", ">= 0.7", unpinned["onload"] / pinned["onload"] >= 0.7),
            ("pageable direct cuMemcpyHtoD vs pinned", f"{raw_pageable:.1f} / {raw_pinned:.1f} = {raw_pageable / raw_pinned:.2f}", "recorded", True),
            ("registered bytes vs pool size (pinned; unpinned)", f"{pinned['big_registered'] / pinned['big_size']:.1f}; {unpinned['big_registered'] / unpinned['big_size']:.1f}", "exactly 1.0; 0", pinned["big_registered"] == pinned["big_size"] and unpinned["big_registered"] == 0),
        ]
        print(f"\n{name}\n\n| measure | result | target | met |\n| --- | --- | --- | --- |")
        for m, r, t, ok in rows:
            print(f"| {m} | {r} | {t} | {'yes' if ok else 'NO'} |")
    print(f"\n{len(FAILURES)} failed checks" if FAILURES else "\nall GPU checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
