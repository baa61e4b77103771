"""Fixtures: the real daemon binary, the real SmolLM2 checkpoint, and its reference outputs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import offloadd
import placement
from daemon import Daemon
from smollm2 import ensure

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 32


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh daemon on a Unix socket and TCP port 0, reading models under tmp_path."""
    d = Daemon([str(tmp_path)], tcp=True)
    yield d
    assert d.stop() == 0, "daemon did not exit cleanly on SIGTERM"


@pytest.fixture
def client(daemon: Daemon) -> Iterator[offloadd.Client]:
    with offloadd.connect(daemon.uds) as c:
        yield c


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return ensure()


@pytest.fixture(scope="session")
def smol_daemon(smol_dir: Path) -> Iterator[Daemon]:
    """One daemon for the SmolLM2 tests, with the checkpoint registered once as "smol" in a pool
    sized to it; tests switch its backend with SetBackend (no re-read)."""
    d = Daemon([str(smol_dir)])
    with offloadd.connect(d.uds) as c:
        size = os.path.getsize(smol_dir / "model.safetensors") + (1 << 20)
        c.create_pool("smol", size_bytes=size)
        c.register_model("smol", pool="smol", path=str(smol_dir))
    yield d
    assert d.stop() == 0


class Reference:
    """``from_pretrained`` of the same checkpoint: greedy token ids and logits for each prompt,
    and how far its logits move when only the addresses of its weights change (placement.py)."""

    def __init__(self, model: object, smol_dir: Path) -> None:
        self.model, self.smol_dir = model, smol_dir
        ids, logits, self.tolerance = placement.measure(model, self.run)
        self.outputs = dict(zip(PROMPTS, zip(ids, logits, strict=True), strict=True))
        print(f"\nSmolLM2 reference: {self.tolerance.describe()}")

    def run(self, model: object) -> tuple[list[object], list[object]]:
        got = [generate(model, self.smol_dir, p) for p in PROMPTS]
        return [ids for ids, _ in got], [logits for _, logits in got]

    def check(self, label: str, got: dict[str, tuple[object, object]]) -> float:
        """Token ids identical, logits within the measured tolerance; returns the logits' largest
        difference."""
        import torch

        for prompt, (ids, _) in got.items():
            assert torch.equal(ids, self.outputs[prompt][0]), f"{label}: tokens differ for {prompt!r}"
        return self.tolerance.check(label, [got[p][1] for p in got], [self.outputs[p][1] for p in got])


@pytest.fixture(scope="session")
def reference(smol_dir: Path) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM

    return Reference(AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval(), smol_dir)


def generate(model: object, smol_dir: Path, prompt: str) -> tuple[object, object]:
    """Greedy decoding: (token ids, logits of every step stacked)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits)
