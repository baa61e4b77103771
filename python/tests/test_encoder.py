"""A BERT encoder (all-MiniLM-L6-v2, layers ``encoder.layer.N``) on the daemon's weights gives
hidden states bit-identical to ``from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import offloadd
import offloadd.hf
from daemon import Daemon
from minilm import ensure

SENTENCES = ["offloadd serves weights from host memory.", "The cat sat on the mat."]


@pytest.mark.parametrize("backend", [offloadd.prefetch(2, 1, 2), offloadd.uva(1 << 40), None],
                         ids=["prefetch-2-1-2", "uva-all", "device"])
def test_encoder_hidden_states_are_bit_identical(backend):
    ckpt = ensure()
    tok = AutoTokenizer.from_pretrained(ckpt)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    want = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
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
                ref = want(**batch).last_hidden_state
        assert torch.equal(got, ref) and torch.equal(again, ref)
    finally:
        assert d.stop() == 0
