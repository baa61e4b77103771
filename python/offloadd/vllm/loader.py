"""``--load-format offloadd``: vLLM's default loader on first start, the daemon's copy after.

First start: vLLM's DefaultModelLoader loads and post-processes (fusion, TP sharding,
quantization) as usual, with vLLM's own offloader; every parameter of this rank is then
published to the daemon under the rank's fingerprint. Later starts with the same fingerprint
attach and bind without opening a checkpoint file, with offloadd's offloader in place of vLLM's
when an offload backend is configured. A publication under another fingerprint never binds.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.offloader.base import get_offloader, set_offloader
from vllm.utils.torch_utils import set_default_torch_dtype

import offloadd

from .. import torch as ot
from ..errors import NotFound, OffloaddError
from ..v1 import offloadd_pb2 as pb
from . import fingerprint
from .offloader import OffloaddOffloader, backend_of, daemon_backend
from .publish import BindError, check_fits, publish, published_fingerprint

log = logging.getLogger("offloadd.vllm")
OPTIONS = {"socket", "pool", "fallback"}


class OffloaddLoadError(RuntimeError):
    """The daemon could not serve this model and ``fallback`` is false."""


@register_model_loader("offloadd")
class OffloaddModelLoader(BaseModelLoader):
    """See the module doc; options come from ``--model-loader-extra-config``."""

    def __init__(self, load_config: object) -> None:
        super().__init__(load_config)
        extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
        unknown = set(extra) - OPTIONS
        if unknown:
            raise ValueError(f"unknown offloadd options {sorted(unknown)}; known: {sorted(OPTIONS)}")
        self.socket: str | None = extra.get("socket")
        self.pool: str = extra.get("pool", "vllm")
        self.fallback: bool = bool(extra.get("fallback", True))
        disk_config = copy.copy(load_config)
        disk_config.load_format = "auto"
        disk_config.model_loader_extra_config = {}
        self.disk = DefaultModelLoader(disk_config)
        #: What the last load_model did: "attached", "published" or "disk", and why.
        self.outcome = ""
        self.reason = ""

    def download_model(self, model_config: ModelConfig) -> None:
        self.disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self.disk.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        fp = fingerprint.of(vllm_config, model_config)
        try:
            client = offloadd.connect(self.socket)
            client.get_info()
        except OffloaddError as e:
            return self._disk(vllm_config, model_config, prefix, f"offloadd is unreachable ({e})")
        try:
            _wait_until_sealed(client, fp.model_name)
        except NotFound:
            other = _same_path_other_fingerprint(client, fp)
            if other is not None:
                return self._disk(vllm_config, model_config, prefix, other)
            return self._publish(client, vllm_config, model_config, prefix, fp)
        try:
            return self._attach(client, vllm_config, model_config, prefix, fp)
        except (BindError, OffloaddError) as e:
            return self._disk(vllm_config, model_config, prefix, f"cannot bind {fp.model_name}: {e}")

    def _attach(self, client, vllm_config, model_config, prefix, fp) -> nn.Module:
        device = _device(vllm_config, self.load_config)
        kind = backend_of(vllm_config.offload_config)
        # The daemon plans with this engine's offload settings, which may differ from the
        # publisher's (the weights do not depend on them).
        wanted = _wanted_backend(vllm_config)
        if client.get_model(fp.model_name).backend != wanted:
            try:
                client.set_backend(fp.model_name, wanted)
            except OffloaddError as e:
                raise BindError(
                    f"other engines use this publication with other offload settings ({e.message}); "
                    "start every engine of a model with the same --offload-* settings"
                ) from None
        lease = client.attach(fp.model_name, worker_name=f"vllm-tp{fp.tp_rank}-pp{fp.pp_rank}")
        vllms_offloader = get_offloader()
        registered = _layer_registry(vllm_config)
        before = set(registered)
        try:
            offloader = OffloaddOffloader(kind, lease, device) if kind != "none" else None
            set_offloader(offloader if offloader is not None else vllms_offloader)
            # With an offloader, each layer is bound as it is built; a parameter the publication
            # lacks, or holds with another shape, stops the build (and falls back to disk).
            with set_default_torch_dtype(model_config.dtype), device:
                model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            check_fits(model, lease.tensors)
            _bind_rest(model, lease, offloader, device)
        except BaseException:
            set_offloader(vllms_offloader)
            _forget_layers(registered, before)  # so a disk load can build the model again
            lease.close()
            raise
        model.offloadd_lease = lease
        model.offloadd_offloader = offloader
        self.outcome, self.reason = "attached", f"bound {fp.model_name} from offloadd"
        log.info("offloadd: %s without reading the checkpoint", self.reason)
        return model.eval()

    def _publish(self, client, vllm_config, model_config, prefix, fp) -> nn.Module:
        model = self.disk.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        try:
            publish(client, self.pool, fp, model, _wanted_backend(vllm_config))
        except (OffloaddError, BindError) as e:
            # The weights are loaded; only sharing is lost. Say why and serve anyway.
            log.warning("offloadd: could not publish %s (%s); serving from this process's copy", fp.model_name, e)
            self.outcome, self.reason = "disk", f"publish failed: {e}"
            return model
        self.outcome, self.reason = "published", f"published {fp.model_name} to pool {self.pool!r}"
        log.info("offloadd: %s; later starts attach to it", self.reason)
        return model

    def _disk(self, vllm_config, model_config, prefix, why) -> nn.Module:
        if not self.fallback:
            raise OffloaddLoadError(f"offloadd load format: {why}; fallback is false, so not loading from disk")
        log.warning("offloadd: %s; loading from disk", why)
        self.outcome, self.reason = "disk", why
        return self.disk.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)


def _wanted_backend(vllm_config: VllmConfig) -> object:
    """The daemon's backend for this engine: vLLM's offload settings, or uva with a zero budget
    (everything on the device) when offloading is off."""
    return daemon_backend(vllm_config.offload_config) or offloadd.uva(0)


#: How long a start waits for another engine's publication of the same fingerprint.
PUBLISH_WAIT_S = 600.0


def _wait_until_sealed(client: offloadd.Client, name: str) -> None:
    """Returns once ``name`` is READY. Replicas started together find the first one's
    publication in progress (AWAITING_SEAL) and wait for it instead of each reading the
    checkpoint; NotFound when there is none."""
    model = client.get_model(name)
    if model.state == pb.MODEL_STATE_READY:
        return
    log.info("offloadd: waiting for another engine to finish publishing %s", name)
    for update in client.watch_model(name, timeout=PUBLISH_WAIT_S):
        if update.state == pb.MODEL_STATE_READY:
            return
    raise NotFound(f"the publication of {name} did not complete (the publishing engine failed?)")


def _layer_registry(vllm_config: VllmConfig) -> dict:
    """Where vLLM registers each attention layer by name as it is built; a second build of the
    same model in one process must not find the first one's names there."""
    return vllm_config.compilation_config.static_forward_context


def _forget_layers(registry: dict, before: set) -> None:
    for name in set(registry) - before:
        del registry[name]


def _device(vllm_config: VllmConfig, load_config: object) -> torch.device:
    device = getattr(load_config, "device", None) or vllm_config.device_config.device
    return torch.device(device)


def _bind_rest(model: nn.Module, lease: offloadd.Lease, offloader: OffloaddOffloader | None,
               device: torch.device) -> None:
    """Everything the offloader did not bind: the whole model without one, else what lies
    outside the decoder stack (embeddings, final norm, lm_head)."""
    prefix = ot.layer_prefix(lease)
    if offloader is None:
        ot.bind(model.get_submodule(prefix), lease, prefix, device)
    else:
        model.register_forward_pre_hook(lambda _m, _a: offloader.check_active())
    for name, _ in list(model.named_parameters()):
        if not name.startswith(prefix + "."):
            ot.set_tensor(model, name, ot.placed(lease, lease.tensor(name), device))


def _same_path_other_fingerprint(client: offloadd.Client, fp: fingerprint.Fingerprint) -> str | None:
    """Why a publication of this model under another fingerprint cannot be used, if one exists."""
    for m in client.list_models():
        if m.name.startswith(fp.path_prefix) and m.name != fp.model_name:
            theirs = published_fingerprint(client, m.name)
            diff = fp.differences(theirs) if theirs else ["unreadable fingerprint"]
            return f"offloadd holds {m.name} for this model under another fingerprint ({'; '.join(diff)})"
    return None
