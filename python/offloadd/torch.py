"""Zero-copy torch parameters from a lease, placed the way vLLM's offloaders place them.

:func:`bind` takes the decoder (or encoder) stack, an ``nn.ModuleList``, and points each
parameter at the memory the lease says:

- ``device``: the weight lives on the worker's device. On cuda it is copied there once; on the
  cpu device, whose memory *is* host memory, the parameter is a view of the pool, so workers
  on one node share one copy.
- ``uva``: the parameter is read in place from host memory: a view of the pool on cpu, of this
  process's own registered mapping on cuda (only when the lease says ``pinned``), or copied to
  the device around each forward when the lease says copy-on-use.
- ``prefetch``: the parameter is a view of its static slot. Forward hooks onload in vLLM's order:
  the first ``prefetch_step`` offloaded layers before the first forward, then, after offloaded
  layer ``k`` runs, layer ``prefetch_next[k]``. On cpu (and on cuda with ``async_copy=False``)
  each onload returns once the copy is complete, so a layer never runs on a slot that is still
  being written. On cuda the default is vLLM's asynchronous fork/join across processes: the
  onload returns once the daemon enqueued the copy behind this worker's "slot free" event, and
  the layer's stream waits on the daemon's "copy done" event (:class:`offloadd.cuda.SlotEvents`).
"""

from __future__ import annotations

import re
import torch
from torch import nn

from .errors import InvalidArgument
from .lease import Lease
from .tensor import Tensor
from .v1 import offloadd_pb2 as pb

_LAYER = re.compile(r"^(.*?)\.?(\d+)\.")


def layer_prefix(lease: Lease) -> str:
    """The dotted path of the layer stack in the checkpoint (``model.layers``,
    ``encoder.layer``): what comes before the first layer tensor's layer number."""
    for t in lease.tensors.values():
        if t.layer is not None:
            m = _LAYER.match(t.name)
            if m and int(m.group(2)) == t.layer:
                return m.group(1)
    raise InvalidArgument(f"model {lease.model!r} has no layer tensors to bind")


def placed(lease: Lease, t: Tensor, device: torch.device) -> torch.Tensor:
    """The tensor a parameter should hold for this row of the lease (see the module doc)."""
    if t.placement == "prefetch":
        return lease.static(t.name)
    host = lease.torch(t.name)
    if device.type == "cpu":
        return host
    if t.placement == "uva" and lease.uva_mode != pb.UVA_MODE_COPY_ON_USE:
        from . import cuda

        return cuda.uva_view(lease, t, device)
    # device placement, or uva with copy-on-use (the copy is swapped in around each forward).
    return host.to(device) if t.placement == "device" else host


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Points the parameter ``name`` (dotted, under ``root``) at ``value``. A materialised
    parameter keeps its object (engines hang attributes on it, e.g. vLLM's weight loaders) and
    gets new data; a meta parameter is replaced."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    old = module._parameters[leaf]
    if old is None or old.is_meta:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif old.shape == value.shape and old.dtype == value.dtype:
        old.data = value
    else:
        raise InvalidArgument(
            f"{name} is {tuple(old.shape)} {old.dtype} in the model but "
            f"{tuple(value.shape)} {value.dtype} in the lease: not the same model"
        )


class Binding:
    """The hooks :func:`bind` installed; :meth:`remove` takes them out again."""

    def __init__(
        self, lease: Lease, layers: nn.ModuleList, device: torch.device, async_copy: bool
    ) -> None:
        self.lease = lease
        self.device = device
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.onloads = 0
        self._next_k = 0
        self._primed = False
        self._k_of = {layer: k for k, layer in enumerate(lease.offloaded_layers)}
        self._layers = layers
        self._events = None
        if async_copy:
            from .cuda import SlotEvents

            self._events = SlotEvents(lease, device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def async_copy(self) -> bool:
        return self._events is not None

    def _onload(self, layer: int) -> None:
        if self._events is not None:
            slot = self._k_of[layer] % self.lease.prefetch_step
            self.lease.onload(layer, async_copy=True, slot_free_event=self._events.slot_free(slot))
        else:
            if self.device.type == "cuda":
                # The synchronous onload overwrites a slot the stream may still be reading.
                torch.cuda.current_stream(self.device).synchronize()
            self.lease.onload(layer)
        self.onloads += 1

    def _before_layer(self, k: int) -> None:
        if self._events is not None:
            self._events.wait_copied(k % self.lease.prefetch_step)

    def _before_stack(self, module: nn.Module, args: object) -> None:
        # A forward that stopped half way (an exception) left the slots mid-cycle: start over.
        if not self._primed or self._next_k != 0:
            for layer in self.lease.offloaded_layers[: self.lease.prefetch_step]:
                self._onload(layer)
            self._primed, self._next_k = True, 0

    def _after_layer(self, k: int) -> None:
        self._onload(self.lease.prefetch_next[k])
        self._next_k = (k + 1) % len(self.lease.offloaded_layers)


def bind(
    layers: nn.ModuleList,
    lease: Lease,
    prefix: str | None = None,
    device: str | torch.device = "cpu",
    async_copy: bool | None = None,
) -> Binding:
    """Points every parameter of ``layers[i]`` at ``{prefix}.{i}.{name}`` of the lease and, for
    prefetch, installs the onload hooks. ``prefix`` defaults to the checkpoint's layer stack.
    ``async_copy`` defaults to True on cuda (events, see the module doc) and is False on cpu."""
    device = torch.device(device)
    prefix = prefix if prefix is not None else layer_prefix(lease)
    for i, layer in enumerate(layers):
        bind_layer(layer, i, lease, prefix, device)
    return install_hooks(layers, lease, prefix, device, async_copy)


def bind_layer(layer: nn.Module, index: int, lease: Lease, prefix: str, device: torch.device) -> None:
    """Points the parameters of one layer at ``{prefix}.{index}.{name}`` of the lease. Engines
    that build layers one at a time (vLLM's ``wrap_modules``) call it per layer, so device
    memory of offloaded weights is released as the model is built."""
    for name, _ in list(layer.named_parameters()):
        t = lease.tensor(f"{prefix}.{index}.{name}" if prefix else f"{index}.{name}")
        set_tensor(layer, name, placed(lease, t, device))


def install_hooks(
    layers: nn.ModuleList,
    lease: Lease,
    prefix: str,
    device: torch.device,
    async_copy: bool | None = None,
) -> Binding:
    """The prefetch onload hooks (vLLM's order) and the copy-on-use hooks for bound layers."""
    if async_copy is None:
        async_copy = device.type == "cuda" and bool(lease.offloaded_layers)
    if async_copy and device.type != "cuda":
        raise InvalidArgument(f"async onload needs a cuda device, not {device}")
    binding = Binding(lease, layers, device, async_copy and bool(lease.offloaded_layers))
    _copy_on_use_hooks(binding, layers, prefix)
    if lease.offloaded_layers:
        # Registered first, so on layer 0 the priming onloads come before the wait for them.
        binding.handles.append(layers[0].register_forward_pre_hook(binding._before_stack))
        for k, layer in enumerate(lease.offloaded_layers):
            if binding.async_copy:
                binding.handles.append(
                    layers[layer].register_forward_pre_hook(
                        lambda _m, _a, k=k: binding._before_layer(k)
                    )
                )
            binding.handles.append(
                layers[layer].register_forward_hook(
                    lambda _m, _a, _o, k=k: binding._after_layer(k)
                )
            )
    return binding


def _copy_on_use_hooks(binding: Binding, layers: nn.ModuleList, prefix: str) -> None:
    """uva with copy-on-use on cuda: the host view is copied in before the layer runs and
    dropped after, as vLLM does when UVA is disabled."""
    if binding.device.type == "cpu" or binding.lease.uva_mode != pb.UVA_MODE_COPY_ON_USE:
        return
    for i, layer in enumerate(layers):
        names = [
            n for n, _ in layer.named_parameters()
            if binding.lease.tensor(f"{prefix}.{i}.{n}").placement == "uva"
        ]
        if not names:
            continue
        hosts = {n: layer.get_parameter(n).data for n in names}

        def pre(m: nn.Module, _a: object, hosts: dict[str, torch.Tensor] = hosts) -> None:
            for n, h in hosts.items():
                m.get_parameter(n).data = h.to(binding.device, non_blocking=True)

        def post(m: nn.Module, _a: object, _o: object, hosts: dict[str, torch.Tensor] = hosts) -> None:
            for n, h in hosts.items():
                m.get_parameter(n).data = h

        binding.handles.append(layer.register_forward_pre_hook(pre))
        binding.handles.append(layer.register_forward_hook(post))

