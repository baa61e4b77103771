"""vLLM's offloaders, with their CPU storage in the daemon's pool.

vLLM's own ``PrefetchOffloader`` and ``UVAOffloader`` copy each offloaded parameter into a
private (pinned) CPU tensor per process. :class:`OffloaddOffloader` implements vLLM's
``BaseOffloader`` interface over a lease instead: the host copy is the pool (one per node),
prefetch slots are the daemon's static buffers, and onloads go through the daemon, in vLLM's
order. The three places vLLM's pin policy touches map onto the lease:

- the initial CPU storage: a view of the pool, never a new allocation;
- the re-pin after weight processing: none; the pool's pin decision stands;
- the pinned check before an asynchronous copy: the lease's ``pinned``, not ``is_pinned()``.
"""

from __future__ import annotations

import logging
from collections.abc import Generator

import torch
from torch import nn
from vllm.model_executor.offloader.base import BaseOffloader, get_offloader, should_pin_memory

from .. import torch as ot
from ..lease import Lease
from ..v1 import offloadd_pb2 as pb

log = logging.getLogger("vllm.offloadd")


def backend_of(offload_config: object) -> str:
    """vLLM's own choice (``create_offloader``): prefetch, uva or none."""
    backend = offload_config.offload_backend  # type: ignore[attr-defined]
    if backend == "auto":
        if offload_config.prefetch.offload_group_size > 0:  # type: ignore[attr-defined]
            return "prefetch"
        if offload_config.uva.cpu_offload_gb > 0:  # type: ignore[attr-defined]
            return "uva"
        return "none"
    return backend if backend in ("prefetch", "uva") else "none"


def daemon_backend(offload_config: object) -> pb.Backend | None:
    """The daemon's backend with vLLM's settings, so its plan is vLLM's plan."""
    import offloadd

    kind = backend_of(offload_config)
    if kind == "prefetch":
        p = offload_config.prefetch  # type: ignore[attr-defined]
        return offloadd.prefetch(p.offload_group_size, p.offload_num_in_group, p.offload_prefetch_step,
                                 sorted(p.offload_params))
    if kind == "uva":
        u = offload_config.uva  # type: ignore[attr-defined]
        return offloadd.uva(int(u.cpu_offload_gb * 1024**3), sorted(u.cpu_offload_params))
    return None


class OffloaddOffloader(BaseOffloader):
    """vLLM's offloader interface over an offloadd lease. The loader installs it, after a
    successful attach, before vLLM builds the model: each decoder layer is bound to the lease as
    ``make_layers`` yields it, as vLLM's own offloaders move each layer to CPU as it is built."""

    supports_tower_offload = False

    def __init__(self, kind: str, lease: Lease, device: torch.device) -> None:
        self.kind = kind
        self.lease = lease
        self.device = device
        self.prefix = ot.layer_prefix(lease)
        self.layers: nn.ModuleList | None = None
        self.binding: ot.Binding | None = None
        self.post_init_done = False
        #: Set when vLLM's should_pin_memory() and the daemon's decision disagree.
        self.pin_mismatch: str | None = None
        vllm_pin = should_pin_memory()
        if vllm_pin != lease.pinned:
            self.pin_mismatch = (
                f"vLLM's should_pin_memory() is {vllm_pin} but offloadd's pool is "
                f"{'pinned' if lease.pinned else 'not pinned'} ({lease.pin_reason}); set "
                "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY the same way for vLLM and offloadd"
            )
            log.warning(self.pin_mismatch)

    def wrap_modules(self, modules_generator: Generator[nn.Module, None, None], prefix: str = "") -> list[nn.Module]:
        if self.layers is not None:
            return list(modules_generator)  # only the decoder stack is offloaded
        modules = []
        for index, module in enumerate(modules_generator):
            ot.bind_layer(module, index, self.lease, self.prefix, self.device)
            if self.device.type == "cpu":
                self._keep_views(module, index)
            modules.append(module)
        self.layers = nn.ModuleList(modules)
        self.binding = ot.install_hooks(self.layers, self.lease, self.prefix, self.device)
        return modules

    def _keep_views(self, layer: nn.Module, index: int) -> None:
        """On vLLM's CPU platform, post-processing turns each linear weight into a private
        oneDNN copy and drops the parameter: an offloaded layer would then hold neither the
        pool's pages nor (for prefetch) the weights onloaded later. vLLM's own flag for layers
        it leaves unpacked, ``_cpu_skip_gemm_dispatch``, keeps the weight and runs
        ``F.linear`` on it, so the layer reads the pool (uva) or its static slot (prefetch)."""
        for name, module in layer.named_modules():
            weight = getattr(module, "weight", None)
            if getattr(module, "quant_method", None) is None or not isinstance(weight, torch.Tensor):
                continue
            full = ".".join(p for p in (self.prefix, str(index), name, "weight") if p)
            if self.lease.tensor(full).placement in ("prefetch", "uva"):
                module._cpu_skip_gemm_dispatch = True

    def post_init(self) -> None:
        # vLLM #51396: offloading silently became a no-op when the runner moved the place where
        # it installs its offloader. Refuse to run unnoticed.
        if get_offloader() is not self:
            raise RuntimeError(
                f"offloadd's offloader is not the one vLLM uses ({type(get_offloader()).__name__} "
                "is): this vLLM version installs its offloader elsewhere; offloading would be a "
                "silent no-op. Use a tested vLLM version or drop --offload-backend."
            )
        if self.layers is None:
            raise RuntimeError("vLLM never called wrap_modules on offloadd's offloader: nothing is offloaded")
        self.post_init_done = True

    def check_active(self) -> None:
        """Run before every forward. Another offloader in our place fails loudly (a silent
        no-op otherwise, vLLM #51396). A runner that never calls ``post_init`` (vLLM 0.32's
        CPUModelRunner) while ours is the active offloader gets it here, before the first
        forward, with the same checks."""
        if get_offloader() is not self:
            raise RuntimeError(
                "offloadd's offloader was installed but vLLM runs another one "
                f"({type(get_offloader()).__name__}); offloading would be a no-op"
            )
        if not self.post_init_done:
            log.info("offloadd: this vLLM runner did not call the offloader's post_init; running it "
                     "before the first forward")
            self.post_init()

    def sync_prev_onload(self) -> None:
        # Each onload answers once its copy is complete: nothing is in flight.
        return

    def join_after_forward(self) -> None:
        return
