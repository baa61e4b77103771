"""transformers models whose weights offloadd serves.

:func:`from_daemon` builds the model from its config with every parameter on the meta device
(nothing allocated, nothing read from disk), attaches to the daemon's copy and binds every
weight from the lease: the layer stack through :func:`offloadd.torch.bind`, everything else
(embeddings, final norm, pooler) by its placement. Tied weights (``lm_head`` =
``embed_tokens``) end up as one parameter, as ``from_pretrained`` leaves them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import cast

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from .client import Client
from .errors import FailedPrecondition, NotFound, OffloaddError, Unavailable, UnknownTensor
from .lease import Lease
from .torch import Binding, bind, layer_prefix, placed, set_tensor


def model_class(config: transformers.PretrainedConfig) -> type[transformers.PreTrainedModel]:
    """The class named by the config's ``architectures`` (e.g. LlamaForCausalLM, BertModel)."""
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return cast("type[transformers.PreTrainedModel]", transformers.AutoModel._model_mapping[type(config)])


def from_daemon(
    client: Client,
    model: str,
    config_dir: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    worker_name: str = "",
    ttl: float = 0.0,
    cls: type[transformers.PreTrainedModel] | None = None,
    async_copy: bool | None = None,
) -> transformers.PreTrainedModel:
    """A ready-to-run transformers model (``eval()`` mode) over the weights of ``model``.

    ``config_dir`` holds ``config.json`` (the checkpoint's own directory will do). The lease is
    kept on the result as ``model.offloadd_lease`` and its hooks as ``model.offloadd_binding``;
    close the lease when done (it also detaches at exit). ``async_copy``: see
    :func:`offloadd.torch.bind` (default: events on cuda, synchronous on cpu)."""
    device = torch.device(device)
    config = transformers.AutoConfig.from_pretrained(config_dir)
    cls = cls or model_class(config)
    # Parameters on meta, buffers (rotary frequencies, position ids) computed for real.
    with init_empty_weights():
        m = cls._from_config(config, dtype=dtype)
    # from_pretrained ties after loading; do it first, so tied names share one parameter here.
    m.tie_weights()
    lease = client.attach(model, worker_name=worker_name, ttl=ttl)
    try:
        binding = bind_model(m, lease, device, async_copy)
    except BaseException:
        lease.close()
        raise
    _keep(m, offloadd_lease=lease, offloadd_binding=binding, offloadd_worker_name=worker_name)
    return m.eval()


def bind_model(
    m: nn.Module, lease: Lease, device: torch.device, async_copy: bool | None = None
) -> Binding:
    """Binds every parameter of ``m`` from ``lease``; shared (tied) parameters stay shared."""
    prefix = layer_prefix(lease)
    layers = m.get_submodule(prefix)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{prefix} is {type(layers).__name__}, not the ModuleList of layers")
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in m.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    binding = bind(layers, lease, prefix, device, async_copy)
    for names in groups.values():
        if any(n.startswith(prefix + ".") for n in names):
            continue  # bound with the layer stack
        # Of tied names, the one the checkpoint holds (save_model may keep either).
        held = [n for n in names if n in lease.tensors]
        if not held:
            raise UnknownTensor(names[0], lease.tensors)
        value = placed(lease, lease.tensor(held[0]), device)
        for n in names:
            set_tensor(m, n, value)
    # Buffers (rotary frequencies, position ids) were computed on the host; parameters are
    # placed already, and a copy-on-use parameter must stay on the host, so not m.to(device).
    for module in m.modules():
        for bname, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[bname] = buf.to(device)
    # Tied names now hold distinct Parameter objects over one tensor; make them one again.
    for names in groups.values():
        if len(names) > 1:
            first = m.get_parameter(names[0])
            for n in names[1:]:
                owner, _, leaf = n.rpartition(".")
                (m.get_submodule(owner) if owner else m)._parameters[leaf] = first
    return binding


def reattach(
    m: transformers.PreTrainedModel, timeout: float = 60.0, async_copy: bool | None = None
) -> Lease:
    """After the lease of a :func:`from_daemon` model was lost (the daemon restarted, or the
    ttl passed), attaches to the same model again, retrying with backoff while the daemon is
    down or the model is not READY yet, and points every weight at the new lease's memory. The
    pool mapping is kept when the pool is the very same file (a restarted daemon adopts its
    pools and models from its journal); otherwise it is mapped again. Static slots are always
    new. Returns the new lease."""
    old = cast(Lease, m.offloadd_lease)
    binding = cast(Binding, m.offloadd_binding)
    binding.remove()
    old.close()
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            lease = old.client.attach(old.model, worker_name=cast(str, m.offloadd_worker_name), ttl=old.ttl)
            break
        except (Unavailable, NotFound, FailedPrecondition) as e:
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    f"could not attach to {old.model!r} again within {timeout:.0f} s: {e.message}"
                ) from None
            time.sleep(delay)  # backoff between attempts while the daemon comes back
            delay = min(delay * 2, 2.0)
    # The same pool file (adopted by the restarted daemon) keeps its mapping: no new mmap, no
    # page faults on the first forward.
    lease.keep_pool_mapping(old)
    try:
        new_binding = bind_model(m, lease, binding.device, async_copy)
    except OffloaddError:
        lease.close()
        raise
    _keep(m, offloadd_lease=lease, offloadd_binding=new_binding)
    return lease


def _keep(m: nn.Module, **state: object) -> None:
    """Hangs offloadd's state on the model. (nn.Module's ``__setattr__`` is typed for tensors and
    modules; for any other value it stores a plain attribute, as this does.)"""
    for name, value in state.items():
        object.__setattr__(m, name, value)
