"""--load-format offloadd and offloadd's offloader, against vLLM 0.33's real code on CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import offloadd
from conftest import engine_cmd, run_engine
from daemon import Daemon
from measure import pss_of_files_under, shmem_kb


def spec(ckpt: Path, socket: str, **kw) -> dict:
    extra = {"socket": socket, **kw.pop("extra", {})}
    return {"ckpt": str(ckpt), "load_format": "offloadd", "extra": extra, **kw}


PREFETCH = {"backend": "prefetch", "group_size": 2, "num_in_group": 1, "prefetch_step": 2}
UVA = {"backend": "uva", "cpu_offload_gb": 0.1}  # about 7 of 30 layers, the last one half placed


def test_first_start_publishes_and_the_second_attaches_without_reading_the_checkpoint(ckpt, daemon, default_digests):
    first = run_engine(spec(ckpt, daemon.uds))
    assert first["outcome"] == "published", first["reason"]
    assert first["digests"] == default_digests
    assert first["checkpoint_opens"] > 0, "the first start reads the checkpoint (and the watch works)"
    second = run_engine(spec(ckpt, daemon.uds))
    assert second["outcome"] == "attached", second["reason"]
    assert second["digests"] == default_digests, "bit-identical to DefaultModelLoader"
    assert second["checkpoint_opens"] == 0, "loading opened no checkpoint file"
    assert set(second["where"].values()) == {"pool"}, "every parameter is a view of the pool"


UVA_ALL = {"backend": "uva", "cpu_offload_gb": 1.0}  # more than every layer: all offloaded


@pytest.mark.parametrize("offload", [PREFETCH, {**PREFETCH, "group_size": 4, "prefetch_step": 3}, UVA, UVA_ALL],
                         ids=["prefetch-2-1-2", "prefetch-4-1-3", "uva-0.1GB", "uva-1GB"])
def test_offloaded_parameters_live_in_the_pool_and_slots_hold_vllms_weights(ckpt, daemon, default_digests, offload):
    require_publication(daemon)
    r = run_engine(spec(ckpt, daemon.uds, offload=offload, onload=True))
    assert r["outcome"] == "attached", r["reason"]
    assert r["offloader"] == "OffloaddOffloader", "ours is the active offloader"
    kinds = set(r["placements"].values())
    if offload["backend"] == "prefetch":
        g, n = offload["group_size"], offload["num_in_group"]
        assert r["offloaded_layers"] == [i for i in range(30) if i % g >= g - n], "vLLM's selection"
        prefetched = [k for k, v in r["placements"].items() if v == "prefetch"]
        assert prefetched and all(r["where"][k] == "static" for k in prefetched)
    else:
        uva = [k for k, v in r["placements"].items() if v == "uva"]
        assert uva and all(r["where"][k] == "pool" for k in uva)
        layer_params = [k for k in r["placements"] if ".layers." in k]
        if offload is UVA:
            assert "device" in kinds, "the budget leaves later layers on the device"
        else:
            assert set(uva) == set(layer_params), "a budget above the model offloads every layer"
    # Every slot was compared right after its layer's onload; the rest in place.
    assert r["digests"] == default_digests


def require_publication(daemon):
    """The publication exists (the first-start test made it, or this does)."""
    with offloadd.connect(daemon.uds) as c:
        if not [m for m in c.list_models() if m.name.startswith("vllm-")]:
            pytest.fail("no publication: test_first_start_publishes... runs first, in file order")


def test_two_engines_share_one_host_copy(ckpt, daemon, default_digests):
    require_publication(daemon)
    with offloadd.connect(daemon.uds) as c:
        model_bytes = next(m for m in c.list_models() if m.name.startswith("vllm-")).bytes
    shmem_before = shmem_kb()
    procs = [subprocess.Popen(engine_cmd(spec(ckpt, daemon.uds, offload=PREFETCH, hold=True)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
        shmem_used = shmem_kb() - shmem_before
        pss = [pss_of_files_under(p.pid, daemon.pools.name) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=120)
    assert all(r["outcome"] == "attached" for r in reports)
    statics_kb = shmem_used  # all new shared memory is the two leases' static slots
    growth = [r["anon_after_kb"] - r["anon_before_kb"] for r in reports]
    print(f"\nnew shared memory (static slots) {shmem_used} kB, pool Pss {pss} kB, "
          f"anonymous growth {growth} kB, model {model_bytes // 1024} kB")
    # The pool existed before; two engines added only their static slots, and map the pool's
    # pages shared rather than copying them.
    assert sum(pss) <= 1.05 * (model_bytes / 1024 + statics_kb)
    assert statics_kb < 0.25 * model_bytes / 1024, "two engines added no second host copy"
    for g in growth:
        assert g < 0.25 * model_bytes / 1024, f"an engine made a private copy ({g} kB)"


def test_another_offloader_in_our_place_fails_loudly(ckpt, daemon):
    require_publication(daemon)
    r = run_engine(spec(ckpt, daemon.uds, offload=PREFETCH, hijack=True))
    assert r["outcome"] == "attached"
    post_init, before_forward = r["hijacked"]
    assert "not the one vLLM uses (NoopOffloader is)" in post_init
    assert "vLLM runs another one (NoopOffloader)" in before_forward


def test_another_dtype_never_binds(ckpt, daemon):
    require_publication(daemon)
    r = run_engine(spec(ckpt, daemon.uds, dtype="bfloat16"))
    assert r["outcome"] == "disk"
    assert "dtype: 'torch.bfloat16' != 'torch.float32'" in r["reason"], r["reason"]
    r = run_engine(spec(ckpt, daemon.uds, dtype="bfloat16", extra={"fallback": False}))
    assert r["error"] == "OffloaddLoadError" and "dtype" in r["message"], r


def test_a_daemon_that_is_down(ckpt, tmp_path, default_digests):
    gone = str(tmp_path / "none.sock")
    r = run_engine(spec(ckpt, gone))
    assert r["outcome"] == "disk" and "unreachable" in r["reason"]
    assert "loading from disk" in r["stderr"], "the fallback is logged as a warning"
    assert r["digests"] == default_digests
    r = run_engine(spec(ckpt, gone, extra={"fallback": False}))
    assert r["error"] == "OffloaddLoadError" and "unreachable" in r["message"], r


@pytest.mark.parametrize("engine_env,agree", [("1", True), ("0", False)])
def test_the_pin_decision_is_shared(ckpt, engine_env, agree):
    """The daemon runs with VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY=1. With the same setting in
    the engine nothing is pinned anywhere; on this CPU platform vLLM never pins, so an engine
    without it still agrees. A daemon that pins while vLLM does not is reported."""
    d = Daemon([str(ckpt)], env={"VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY": "1"} if agree else {})
    try:
        run_engine(spec(ckpt, d.uds))  # publish into this daemon
        r = run_engine(spec(ckpt, d.uds, offload=PREFETCH), env={"VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY": engine_env})
        with offloadd.connect(d.uds) as c:
            pool_pinned = c.get_pool("vllm").pinned
    finally:
        assert d.stop() == 0
    assert r["outcome"] == "attached"
    assert r["vm_lck_kb"] == 0, "the engine locks nothing"
    if agree:
        assert r["pinned"] is False and not pool_pinned and r["pin_mismatch"] is None
    else:
        assert r["pinned"] is True and pool_pinned
        assert "should_pin_memory() is False" in r["pin_mismatch"]
        assert "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY" in r["stderr"]


def test_the_plugin_warns_under_an_untested_vllm():
    from offloadd.vllm import TESTED_VLLM_VERSIONS, version_warning

    assert version_warning(TESTED_VLLM_VERSIONS[0]) is None
    assert "tested with vLLM 0.32.0, 0.33.0" in version_warning("0.99.0")
