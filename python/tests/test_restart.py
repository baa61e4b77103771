"""A worker across a daemon crash: SmolLM2 built with offloadd.hf.from_daemon keeps generating
after the daemon is SIGKILLed and started again (which adopts the pool and the model from its
journal, verified): the lost lease is detected, offloadd.hf.reattach attaches again, keeps its
mapping of the very same pool file and rebinds every weight, and the tokens are the same as
before the crash."""

from __future__ import annotations

import os
import signal
import tempfile
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
    # Both daemons share the pool directory, as a container restart in a pod does.
    shm = tempfile.TemporaryDirectory(prefix="offloadd-py-", dir="/dev/shm")
    pools = str(Path(shm.name) / "pools")
    d = Daemon([str(smol_dir)], uds=uds, args=["--config", str(cfg)], pools_dir=pools)
    client = offloadd.connect(uds)
    list(client.watch_model("smol"))  # the config's registration loads in the background
    model = offloadd.hf.from_daemon(client, "smol", str(smol_dir), worker_name="survivor")
    before = generate(model, smol_dir, PROMPTS[0])
    assert torch.equal(before[0], reference.outputs[PROMPTS[0]][0])
    first = model.offloadd_lease.id
    first_range = model.offloadd_lease.segment_range(0)

    d.stop(signal.SIGKILL)
    # Calls while it is down fail (as the lease's renewals do), which leaves the channel
    # waiting to reconnect when the daemon comes back.
    for _ in range(3):
        with pytest.raises(offloadd.Unavailable):
            client.get_info()
    d = Daemon([str(smol_dir)], uds=uds, args=["--config", str(cfg)], pools_dir=pools)
    try:
        # The old lease is gone with the old daemon: the next forward says so instead of
        # reading memory nobody serves any more.
        with pytest.raises(offloadd.LeaseLost):
            generate(model, smol_dir, PROMPTS[0])
        lease = offloadd.hf.reattach(model, timeout=60)
        assert lease.id != first and lease.alive
        m = client.get_model("smol")
        assert m.adopted, "the restarted daemon adopted the model instead of loading it again"
        assert lease.segment_range(0) == first_range, "the same pool file keeps its mapping"
        after = generate(model, smol_dir, PROMPTS[0])
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        # Every parameter lies in the pool mapping the new lease serves.
        lo, n = lease.segment_range(0)
        held = {n: t for n, t in lease.tensors.items() if t.placement != "prefetch"}
        views = [p for name, p in model.named_parameters(remove_duplicate=False) if name in held]
        assert views and all(lo <= p.data_ptr() < lo + n for p in views)
        lease.close()
    finally:
        assert d.stop() == 0
        shm.cleanup()
