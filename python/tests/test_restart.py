"""A worker across a daemon crash: SmolLM2 built with offloadd.hf.from_daemon keeps generating
after the daemon is SIGKILLed and started again (which registers the model again from its
config): the lost lease is detected, offloadd.hf.reattach attaches again and rebinds every
weight to the new daemon's memory, and the tokens are the same as before the crash."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import offloadd
import offloadd.hf
from conftest import PROMPTS, generate
from daemon import Daemon


def config(tmp_path: Path, smol_dir: Path) -> Path:
    size = os.path.getsize(smol_dir / "model.safetensors") + (1 << 20)
    path = tmp_path / "offloadd.toml"
    path.write_text(
        f"""
[[pools.create]]
name = "smol"
size_bytes = {size}

[[models.register]]
name = "smol"
pool = "smol"
path = "{smol_dir}"
prefetch = {{ group_size = 2, num_in_group = 1, prefetch_step = 2 }}
"""
    )
    return path


def test_a_worker_carries_on_after_a_daemon_crash(tmp_path: Path, smol_dir: Path, reference):
    cfg = config(tmp_path, smol_dir)
    uds = str(tmp_path / "offloadd.sock")
    d = Daemon([str(smol_dir)], uds=uds, args=["--config", str(cfg)])
    client = offloadd.connect(uds)
    list(client.watch_model("smol"))  # the config's registration loads in the background
    model = offloadd.hf.from_daemon(client, "smol", str(smol_dir), worker_name="survivor")
    before = generate(model, smol_dir, PROMPTS[0])
    assert torch.equal(before[0], reference[PROMPTS[0]][0])
    first = model.offloadd_lease.id

    d.stop(signal.SIGKILL)
    d = Daemon([str(smol_dir)], uds=uds, args=["--config", str(cfg)])
    try:
        # The old lease is gone with the old daemon: the next forward says so instead of
        # reading memory nobody serves any more.
        with pytest.raises(offloadd.LeaseLost):
            generate(model, smol_dir, PROMPTS[0])
        lease = offloadd.hf.reattach(model, timeout=60)
        assert lease.id != first and lease.alive
        after = generate(model, smol_dir, PROMPTS[0])
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        # Every parameter now lies in the new daemon's memory.
        lo, n = lease.segment_range(0)
        held = {n: t for n, t in lease.tensors.items() if t.placement != "prefetch"}
        views = [p for name, p in model.named_parameters(remove_duplicate=False) if name in held]
        assert views and all(lo <= p.data_ptr() < lo + n for p in views)
        lease.close()
    finally:
        assert d.stop() == 0
