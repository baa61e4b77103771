"""SmolLM2-135M-Instruct, a real trained model, generating on weights the daemon serves.

Every backend must give token ids identical to ``from_pretrained`` of the same checkpoint, and
logits within what moving ``from_pretrained``'s own weights in memory changes (placement.py:
exact where this machine's kernels ignore addresses); a wrong next-prefetch table must fail by
orders of magnitude more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import offloadd
import offloadd.hf
import placement
from conftest import PROMPTS, Reference, generate
from daemon import Daemon

# (group_size, num_in_group, prefetch_step) -> offloaded layers of 30 and whether the
# next-prefetch table wraps around (n % step != 0).
PREFETCH = {
    "1-1-1": (1, 1, 1),   # every layer, one slot
    "1-1-4": (1, 1, 4),   # 30 layers, 4 slots: wraps (30 % 4 = 2)
    "4-1-2": (4, 1, 2),   # layers 3, 7, ..., 27: 7 layers, wraps
    "5-3-4": (5, 3, 4),   # 18 layers, wraps
}
LAYER_BYTES = 14_160_384  # one SmolLM2 decoder layer in float32


def backends() -> dict[str, object]:
    cases: dict[str, object] = {k: offloadd.prefetch(*v) for k, v in PREFETCH.items()}
    # Two and a half layers: layer 2 ends half placed, as vLLM's budget walk leaves it.
    cases["uva-half"] = offloadd.uva(LAYER_BYTES * 5 // 2)
    cases["uva-all"] = offloadd.uva(1 << 40)
    return cases


def run(client: offloadd.Client, smol_dir: Path, backend: object, lease_hook=None):
    client.set_backend("smol", backend)
    model = offloadd.hf.from_daemon(client, "smol", str(smol_dir), worker_name="pytest")
    try:
        if lease_hook:
            lease_hook(model.offloadd_lease)
        return model, {p: generate(model, smol_dir, p) for p in PROMPTS}
    finally:
        model.offloadd_lease.close()


@pytest.mark.parametrize("name", list(backends()))
def test_generation_matches_from_pretrained(name, smol_daemon: Daemon, smol_dir, reference: Reference):
    with offloadd.connect(smol_daemon.uds) as client:
        model, got = run(client, smol_dir, backends()[name])
    lease = model.offloadd_lease
    placements = {t.placement for t in lease.tensors.values()}
    if name in PREFETCH:
        assert "prefetch" in placements
        assert model.offloadd_binding.onloads >= len(lease.offloaded_layers) * 2
    if name == "uva-half":
        layer2 = {t.placement for t in lease.layer_tensors(2)}
        assert layer2 == {"uva", "device"}, f"layer 2 should be half placed: {layer2}"
        assert {t.placement for t in lease.layer_tensors(3)} == {"device"}
    diff = reference.check(name, got)
    print(f"{name}: tokens identical, logits max |diff| {diff:.3g} ({reference.tolerance.describe()})")
    text = AutoTokenizer.from_pretrained(smol_dir).decode(got[PROMPTS[0]][0])
    assert "Paris" in text, text


def test_everything_on_the_device(tmp_path, smol_dir, reference: Reference):
    """No backend at all: every tensor is placed on the device (a separate model, no SetBackend)."""
    d = Daemon([str(smol_dir)])
    try:
        with offloadd.connect(d.uds) as client:
            client.create_pool("p", size_bytes=(smol_dir / "model.safetensors").stat().st_size + (1 << 20))
            client.register_model("dev", pool="p", path=str(smol_dir))
            model = offloadd.hf.from_daemon(client, "dev", str(smol_dir))
            with model.offloadd_lease as lease:
                assert {t.placement for t in lease.tensors.values()} == {"device"}
                got = {PROMPTS[0]: generate(model, smol_dir, PROMPTS[0])}
        reference.check("device", got)
    finally:
        assert d.stop() == 0


def test_a_wrong_prefetch_table_changes_the_tokens(smol_daemon: Daemon, smol_dir, reference: Reference):
    """The control: with two slots, onload layer k+3 after layer k instead of k+2. It lands in
    the slot of layer k+1, which then runs on the wrong weights. The comparison above must
    catch that, by far more than the placement tolerance."""
    def corrupt(lease):
        n = len(lease.offloaded_layers)
        lease.prefetch_next = [lease.offloaded_layers[(k + 3) % n] for k in range(n)]

    with offloadd.connect(smol_daemon.uds) as client:
        _, got = run(client, smol_dir, offloadd.prefetch(1, 1, 2), corrupt)
    want_ids, want_logits = reference.outputs[PROMPTS[0]]
    ids, logits = got[PROMPTS[0]]
    assert not torch.equal(ids, want_ids), "a wrong table must change the generated tokens"
    first_step = placement.max_diff([logits[0]], [want_logits[0]])
    assert first_step > 1000 * reference.tolerance.bound, (
        f"a stale slot moves the first step's logits by {first_step:.3g}: not far enough beyond "
        f"the {reference.tolerance.describe()}")
    with pytest.raises(AssertionError, match="tokens differ"):
        reference.check("wrong table", got)


def test_the_tolerance_covers_placement_and_nothing_more(reference: Reference):
    """The tolerance was measured with weights at a few shifts from a page boundary. At shifts
    it never saw, from_pretrained's own weights still give the same tokens and logits within it.
    The tolerance stays far below what the controls change (a wrong layer moves logits by
    units), or it would hide them."""
    for shift in placement.HELD_OUT_SHIFTS:
        twin = placement.moved(reference.model, shift)
        ids, logits = reference.run(twin)
        got = dict(zip(PROMPTS, zip(ids, logits, strict=True), strict=True))
        diff = reference.check(f"weights moved by +{shift}", got)
        print(f"moved +{shift}: logits max |diff| {diff:.3g}")
    assert reference.tolerance.bound < 1e-3, f"a tolerance this wide hides real errors: {reference.tolerance.describe()}"


def test_parameters_are_views_of_the_mapping(smol_daemon: Daemon, smol_dir):
    """uva and device weights live inside the read-only pool mapping; prefetch weights inside the
    static segment; nothing was copied."""
    with offloadd.connect(smol_daemon.uds) as client:
        client.set_backend("smol", offloadd.prefetch(2, 1, 2))
        model = offloadd.hf.from_daemon(client, "smol", str(smol_dir))
        with model.offloadd_lease as lease:
            pool_start, pool_len = lease.segment_range(0)
            static_start, static_len = lease.segment_range(1)
            maps = Path("/proc/self/maps").read_text()
            assert f"{pool_start:x}-" in maps, "the pool mapping is in /proc/self/maps"
            line = next(l for l in maps.splitlines() if l.startswith(f"{pool_start:x}-"))
            assert line.split()[1].startswith("r--"), f"pool mapped read-only: {line}"
            for name, p in model.named_parameters():
                t = lease.tensor(name if name in lease.tensors else "lm_head.weight")  # tied
                start, end = (static_start, static_len) if t.placement == "prefetch" else (pool_start, pool_len)
                assert start <= p.data_ptr() < start + end, f"{name} ({t.placement}) is a copy"
            assert model.lm_head.weight is model.model.embed_tokens.weight, "tied weights stay tied"
