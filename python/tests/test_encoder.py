"""A BERT encoder (all-MiniLM-L6-v2, layers ``encoder.layer.N``) on the daemon's weights gives
the hidden states of ``from_pretrained``, within what moving its own weights in memory changes
(placement.py; exact where this machine's kernels ignore addresses)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import offloadd
import offloadd.hf
import placement
from daemon import Daemon
from minilm import ensure

SENTENCES = ["offloadd serves weights from host memory.", "The cat sat on the mat."]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, torch.Tensor, placement.Tolerance]:
    """The tokenized batch, from_pretrained's hidden states, and their placement tolerance."""
    ckpt = ensure()
    batch = AutoTokenizer.from_pretrained(ckpt)(SENTENCES, padding=True, return_tensors="pt")
    want = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()

    def run(model):
        with torch.no_grad():
            return None, [model(**batch).last_hidden_state]

    _, (ref,), tolerance = placement.measure(want, run)
    print(f"\nall-MiniLM-L6-v2 reference: {tolerance.describe()}")
    return batch, ref, tolerance


@pytest.mark.parametrize("backend", [offloadd.prefetch(2, 1, 2), offloadd.uva(1 << 40), None],
                         ids=["prefetch-2-1-2", "uva-all", "device"])
def test_encoder_hidden_states_match_from_pretrained(backend, reference):
    ckpt = ensure()
    batch, ref, tolerance = reference
    d = Daemon([str(ckpt)])
    try:
        with offloadd.connect(d.uds) as client:
            client.create_pool("p", size_bytes=(ckpt / "model.safetensors").stat().st_size + (1 << 20))
            client.register_model("minilm", pool="p", path=str(ckpt), backend=backend)
            model = offloadd.hf.from_daemon(client, "minilm", str(ckpt))
            with model.offloadd_lease as lease, torch.no_grad():
                layers = {t.layer for t in lease.tensors.values() if t.layer is not None}
                assert layers == set(range(6)), "the daemon found encoder.layer.N"
                if backend is not None and backend.HasField("prefetch"):
                    assert lease.offloaded_layers == [1, 3, 5]
                got = model(**batch).last_hidden_state
                again = model(**batch).last_hidden_state  # a second pass reuses the slots
        tolerance.check("encoder", [got], [ref])
        assert torch.equal(again, got), "the same weights at the same addresses give the same states"
    finally:
        assert d.stop() == 0
