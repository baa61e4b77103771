"""Publishing a vLLM rank's loaded parameters to the daemon, checking that the publication can
serve, and checking that it fits a model built later."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..client import Client
from ..errors import AlreadyExists, FailedPrecondition, NotFound
from ..tensor import torch_dtypes
from ..v1 import offloadd_pb2 as pb
from .fingerprint import FINGERPRINT_TENSOR, Fingerprint

#: torch dtype -> safetensors dtype name: the inverse of the lease's table.
SAFETENSORS_DTYPES = {dtype: name for name, dtype in torch_dtypes().items()}
ALIGN = 256


class BindError(Exception):
    """The publication does not fit this model (another parameter set); load from disk."""


def parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, in module order (the order vLLM's offloaders walk)."""
    return [(n, p) for n, p in model.named_parameters()]


def pool_bytes(params: Iterable[tuple[str, torch.Tensor]]) -> int:
    """A pool that holds these parameters and the fingerprint, aligned as the daemon aligns."""
    total = sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for _, p in params)
    return total + (1 << 20)


def publish(client: Client, pool: str, fp: Fingerprint, model: nn.Module, backend: pb.Backend | None) -> pb.Model:
    """CreateModel, send every parameter (WriteModel), SealModel, then
    :func:`verify`. Raises AlreadyExists when another process published the same fingerprint
    first, BindError (with the publication removed) when it could not serve."""
    params = parameters(model)
    raw_fp = fp.to_bytes()
    specs = [pb.TensorSpec(name=FINGERPRINT_TENSOR, dtype="U8", shape=[len(raw_fp)])]
    for name, p in params:
        if p.dtype not in SAFETENSORS_DTYPES:
            raise BindError(f"{name} is {p.dtype}, which has no safetensors dtype")
        specs.append(pb.TensorSpec(name=name, dtype=SAFETENSORS_DTYPES[p.dtype], shape=list(p.shape)))
    pool = rank_pool(pool, fp)
    _ensure_pool(client, pool, pool_bytes(params))
    created = client.create_model(fp.model_name, pool=pool, tensors=specs, backend=backend)
    try:
        # The daemon writes the pool; this process only sends the bytes (WriteModel).
        # A generator: a GPU tensor's host copy lives only while it is being sent.
        client.write_model(
            created,
            itertools.chain(
                [(FINGERPRINT_TENSOR, raw_fp)], ((name, _raw(p.detach()).numpy().data) for name, p in params)
            ),
        )
        sealed = client.seal_model(fp.model_name, created.publish_token)
        verify(client, fp, model)
        return sealed
    except BaseException:
        client.unregister_model(fp.model_name)  # nothing half-published, nothing unservable
        raise


def rank_pool(pool: str, fp: Fingerprint) -> str:
    """The pool a rank publishes into: ``pool`` itself for an engine of one rank, else one per
    rank (``{pool}-tp{r}-pp{p}``), each sized to its own shard, so ranks never race to size or
    resize a shared one."""
    if fp.tp_size * fp.pp_size == 1:
        return pool
    return f"{pool}-tp{fp.tp_rank}-pp{fp.pp_rank}"


def _ensure_pool(client: Client, pool: str, need: int) -> None:
    """Creates the pool to fit when missing. An empty pool too small for this publication (made
    for another, or left by one removed as unservable) is made again at the right size."""
    try:
        found = client.get_pool(pool)
    except NotFound:
        try:
            client.create_pool(pool, size_bytes=need)
        except AlreadyExists:
            pass  # an engine started beside this one created it meanwhile
        return
    if found.used_bytes == 0 and found.size_bytes < need:
        try:
            client.delete_pool(pool)
            client.create_pool(pool, size_bytes=need)
        except (AlreadyExists, FailedPrecondition, NotFound):
            pass  # an engine started beside this one got there first; CreateModel says whether it fits


def verify(client: Client, fp: Fingerprint, model: nn.Module) -> None:
    """Attaches to the sealed publication as a later start would, and checks that it carries
    this fingerprint and exactly this model's parameters, byte for byte. Raises BindError naming
    the first that differs: such a publication could not serve, and is caught here rather than
    at the next start."""
    with client.attach(fp.model_name, worker_name="offloadd-vllm-verify") as lease:
        if lease.numpy(FINGERPRINT_TENSOR).tobytes() != fp.to_bytes():
            raise BindError("the publication's fingerprint differs from the one this engine wrote")
        check_fits(model, lease.tensors)
        for pname, p in parameters(model):
            if not torch.equal(_raw(lease.torch(pname)), _raw(p.detach())):
                raise BindError(f"the publication's {pname} differs from the weight this engine loaded")


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, on the CPU, as a flat uint8 tensor (a view when they already are)."""
    return t.contiguous().cpu().reshape(-1).view(torch.uint8)


def published_fingerprint(client: Client, name: str) -> Fingerprint | None:
    """The fingerprint a publication carries, read from the pool (None if unreadable)."""
    with client.attach(name, worker_name="offloadd-vllm-fingerprint") as lease:
        try:
            return Fingerprint.from_bytes(lease.numpy(FINGERPRINT_TENSOR).tobytes())
        except (KeyError, ValueError, TypeError):
            return None


def check_fits(model: nn.Module, lease_tensors: Mapping[str, object]) -> None:
    """Raises BindError unless the publication holds exactly this model's parameters."""
    ours = {n: (tuple(p.shape), SAFETENSORS_DTYPES.get(p.dtype)) for n, p in parameters(model)}
    theirs = {
        n: (tuple(t.shape), t.dtype)  # type: ignore[attr-defined]
        for n, t in lease_tensors.items()
        if n != FINGERPRINT_TENSOR
    }
    if ours != theirs:
        missing = sorted(set(ours) - set(theirs))[:3]
        extra = sorted(set(theirs) - set(ours))[:3]
        changed = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])[:3]
        raise BindError(f"publication does not match the model: missing {missing}, extra {extra}, changed {changed}")
