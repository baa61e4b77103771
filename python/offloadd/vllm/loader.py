"""``--load-format offloadd``: vLLM's default loader on first start, the daemon's copy after.

Both run vLLM's own ``BaseModelLoader.load_model``: build the model, load its weights, then
``process_weights_after_loading``. Only where the weights come from changes.

First start: vLLM's DefaultModelLoader reads the checkpoint (fusing ``qkv_proj`` and
``gate_up_proj``, sharding for tensor parallelism), with vLLM's own offloader. Every parameter
of this rank is published to the daemon under the rank's fingerprint **before** the platform's
post-processing, which may turn weights into something no other process can use (on CPU, each
linear weight becomes a oneDNN handle and its parameter ``torch.empty(0)``; on GPU, quantized
kernels repack). The publication is then read back and compared with the parameters, so one that
could not serve is reported and removed at this start, not found out at the next.

With the ``weights`` option, the first start reads the checkpoint's tensors from a model the
daemon already holds (for example one registered from ``s3://``) instead of the model directory,
which then needs only the config and tokenizer: the node's one copy of the checkpoint, fetched
once, feeds every engine's first start. That model's identity (its URL and each object's ETag)
is part of the fingerprint, so a new version of the checkpoint is a new publication.

Later starts with the same fingerprint build the model, bind every parameter to the daemon's
pool without opening a checkpoint file (with offloadd's offloader in place of vLLM's when an
offload backend is configured), and run the post-processing again, as a disk load would. A
publication under another fingerprint never binds.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Generator
from typing import cast

import torch
from torch import nn
from vllm.config import LoadConfig, ModelConfig, VllmConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.offloader.base import get_offloader, set_offloader

import offloadd

from .. import torch as ot
from ..errors import NotFound, OffloaddError
from ..v1 import offloadd_pb2 as pb
from . import fingerprint
from .offloader import OffloaddOffloader, backend_of, daemon_backend
from .publish import BindError, check_fits, publish, published_fingerprint, rank_pool

# Under vLLM's logger, so its handler prints our lines with vLLM's own (INFO and up).
log = logging.getLogger("vllm.offloadd")
OPTIONS = {"socket", "pool", "fallback", "weights"}


class OffloaddLoadError(RuntimeError):
    """The daemon could not serve this model and ``fallback`` is false, or the engine's settings
    cannot work with offloadd's offloader."""


class _Publishing(DefaultModelLoader):
    """vLLM's DefaultModelLoader, publishing the rank's weights between loading them and the
    platform's post-processing (see the module doc)."""

    def __init__(self, load_config: LoadConfig, after_load: Callable[[nn.Module], None],
                 source: offloadd.Lease | None = None) -> None:
        super().__init__(load_config)
        self.after_load = after_load
        self.source = source

    def get_all_weights(
        self, model_config: ModelConfig, model: nn.Module
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The checkpoint's tensors: from the source lease's pool when there is one (views, which
        vLLM's weight loaders copy from), else vLLM's own files."""
        if self.source is None:
            yield from super().get_all_weights(model_config, model)
            return
        self.counter_before_loading_weights = time.perf_counter()
        for name in self.source.tensors:
            yield name, self.source.torch(name)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        super().load_weights(model, model_config)
        self.after_load(model)


@register_model_loader("offloadd")
class OffloaddModelLoader(BaseModelLoader):
    """See the module doc; options come from ``--model-loader-extra-config``."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
        unknown = set(extra) - OPTIONS
        if unknown:
            raise ValueError(f"unknown offloadd options {sorted(unknown)}; known: {sorted(OPTIONS)}")
        self.socket: str | None = extra.get("socket")
        self.pool: str = extra.get("pool", "vllm")
        self.fallback: bool = bool(extra.get("fallback", True))
        #: A daemon model holding the checkpoint's tensors, read by the first start (module doc).
        self.weights: str | None = extra.get("weights")
        disk_config = copy.copy(load_config)
        disk_config.load_format = "auto"
        disk_config.model_loader_extra_config = {}
        self.disk = DefaultModelLoader(disk_config)
        #: What the last load_model did: "attached", "published" or "disk", and why.
        self.outcome = ""
        self.reason = ""

    def download_model(self, model_config: ModelConfig) -> None:
        if self.weights is None:  # otherwise the directory holds no weights to download
            self.disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self.disk.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        refuse_uncapturable(vllm_config)
        try:
            client = offloadd.connect(self.socket)
            client.get_info()
        except OffloaddError as e:
            return self._disk(vllm_config, model_config, prefix, f"offloadd is unreachable ({e})")
        source = self._source(client) if self.weights is not None else None
        fp = fingerprint.of(vllm_config, model_config, source)
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
        # Tied to the fast path: an engine killed without running atexit (vLLM ends its engine
        # core by signal) lets go of the lease at once, so the next start may change the
        # backend instead of finding this one still attached for a whole ttl.
        lease = client.attach(
            fp.model_name, worker_name=f"vllm-tp{fp.tp_rank}-pp{fp.pp_rank}", end_with_fast_path=True
        )
        if kind == "uva" and device.type == "cuda" and lease.uva_mode == pb.UVA_MODE_COPY_ON_USE:
            try:
                refuse_uncapturable(vllm_config, "uva with copy-on-use (the lease's uva mode)")
            except OffloaddLoadError:
                lease.close()
                raise
        vllms_offloader = get_offloader()
        registered = _layer_registry(vllm_config)
        before = set(registered)
        try:
            offloader = OffloaddOffloader(kind, lease, device) if kind != "none" else None
            set_offloader(offloader if offloader is not None else vllms_offloader)
            # vLLM's own load_model: build (with an offloader, each layer is bound as it is
            # built; a parameter the publication lacks, or holds with another shape, stops the
            # build and falls back to disk), bind the rest instead of reading, post-process.
            binder = _Binding(self.load_config, lease, offloader, device)
            started = time.perf_counter()
            model = binder.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            done = time.perf_counter()
        except BaseException:
            set_offloader(vllms_offloader)
            _forget_layers(registered, before)  # so a disk load can build the model again
            lease.close()
            raise
        model.offloadd_lease = lease
        model.offloadd_offloader = offloader
        self.outcome = "attached"
        self.reason = (
            f"attached {fp.model_name}: built and bound in {binder.bound_at - started:.2f} s without "
            f"reading the checkpoint, post-processing {done - binder.bound_at:.2f} s"
        )
        log.info("offloadd: %s", self.reason)
        return model

    def _publish(self, client, vllm_config, model_config, prefix, fp) -> nn.Module:
        def after_load(model: nn.Module) -> None:
            try:
                publish(client, self.pool, fp, model, _wanted_backend(vllm_config))
            except (OffloaddError, BindError) as e:
                # The weights are loaded; only sharing is lost. Say why and serve anyway.
                log.warning("offloadd: could not publish %s (%s); nothing of it is left in the daemon, so the "
                            "next start publishes again; serving from this process's copy", fp.model_name, e)
                self.outcome, self.reason = "disk", f"publish failed: {e}"
                return
            pool = rank_pool(self.pool, fp)
            self.outcome, self.reason = "published", f"published {fp.model_name} to pool {pool!r}"
            log.info("offloadd: %s; later starts attach to it", self.reason)

        if self.weights is None:
            loader = _Publishing(self.disk.load_config, after_load)
            return loader.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        with client.attach(self.weights, worker_name=f"vllm-tp{fp.tp_rank}-pp{fp.pp_rank}-source") as source:
            loader = _Publishing(self.disk.load_config, after_load, source)
            model = loader.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        log.info("offloadd: read the checkpoint from the daemon's model %s", self.weights)
        return model

    def _source(self, client: offloadd.Client) -> pb.Model:
        """The ``weights`` model, once READY (a load in progress is waited for)."""
        assert self.weights is not None
        try:
            _wait_until_sealed(client, self.weights)
            return client.get_model(self.weights)
        except OffloaddError as e:
            raise OffloaddLoadError(
                f"offloadd option weights={self.weights!r}: {e}; register the checkpoint first "
                "(RegisterModel with its s3:// URL or directory) under that name"
            ) from None

    def _disk(self, vllm_config, model_config, prefix, why) -> nn.Module:
        if self.weights is not None:
            raise OffloaddLoadError(f"offloadd load format: {why}; the weights are the daemon's model "
                                    f"{self.weights!r}, so there is no disk to fall back to")
        if not self.fallback:
            raise OffloaddLoadError(f"offloadd load format: {why}; fallback is false, so not loading from disk")
        log.warning("offloadd: %s; loading from disk", why)
        self.outcome, self.reason = "disk", why
        return self.disk.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)


class _Binding(BaseModelLoader):
    """vLLM's BaseModelLoader whose weights come from a lease instead of the checkpoint."""

    def __init__(self, load_config: LoadConfig, lease: offloadd.Lease, offloader: OffloaddOffloader | None,
                 device: torch.device) -> None:
        super().__init__(load_config)
        self.lease, self.offloader, self.device = lease, offloader, device
        self.bound_at = 0.0

    def download_model(self, model_config: ModelConfig) -> None:
        return

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        check_fits(model, self.lease.tensors)
        _bind_rest(model, self.lease, self.offloader, self.device)
        self.bound_at = time.perf_counter()


def refuse_uncapturable(vllm_config: VllmConfig, what: str | None = None) -> None:
    """offloadd's prefetch offloader onloads from forward hooks (so does uva when the lease says
    copy-on-use). A CUDA graph replays kernels, not Python hooks, and torch.compile traces them
    into a graph that cannot call the daemon; either would run layers on stale weights. So the
    combination is refused at start, never silently wrong. ``what`` names the hooked mode; by
    default, prefetch when the engine asks for it."""
    if what is None:
        if backend_of(vllm_config.offload_config) != "prefetch":
            return
        what = "prefetch"
    cc = vllm_config.compilation_config
    # Both are enums whose NONE means off (CUDAGraphMode's other values are not all ints).
    mode, graphs = (getattr(v, "name", "NONE") if v is not None else "NONE" for v in (cc.mode, cc.cudagraph_mode))
    if (mode, graphs) != ("NONE", "NONE"):
        raise OffloaddLoadError(
            f"offloadd's {what} offloader moves weights from forward hooks, which CUDA graphs and "
            f"torch.compile do not replay (compilation mode {mode}, cudagraph mode {graphs}); start "
            "vLLM with --enforce-eager (LLM(..., enforce_eager=True))"
        )


def _wanted_backend(vllm_config: VllmConfig) -> pb.Backend:
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


def _device(vllm_config: VllmConfig, load_config: LoadConfig) -> torch.device:
    device = getattr(load_config, "device", None) or vllm_config.device_config.device
    return torch.device(str(device))


def _bind_rest(model: nn.Module, lease: offloadd.Lease, offloader: OffloaddOffloader | None,
               device: torch.device) -> None:
    """Everything the offloader did not bind: the whole model without one, else what lies
    outside the decoder stack (embeddings, final norm, lm_head)."""
    prefix = ot.layer_prefix(lease)
    if offloader is None:
        ot.bind(cast(nn.ModuleList, model.get_submodule(prefix)), lease, prefix, device)
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
            if all(d.startswith(("tp_rank:", "pp_rank:")) for d in diff):
                continue  # another rank of the same engine: its shard, not a stale publication
            return f"offloadd holds {m.name} for this model under another fingerprint ({'; '.join(diff)})"
    return None
