"""Publishing a vLLM rank's processed parameters to the daemon, and binding them back."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..client import Client
from ..errors import AlreadyExists, NotFound
from ..lease import torch_dtypes
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
    """CreateModel, write every parameter through the pool file, SealModel. Raises
    AlreadyExists when another process published the same fingerprint first."""
    params = parameters(model)
    raw_fp = fp.to_bytes()
    specs = [pb.TensorSpec(name=FINGERPRINT_TENSOR, dtype="U8", shape=[len(raw_fp)])]
    for name, p in params:
        if p.dtype not in SAFETENSORS_DTYPES:
            raise BindError(f"{name} is {p.dtype}, which has no safetensors dtype")
        specs.append(pb.TensorSpec(name=name, dtype=SAFETENSORS_DTYPES[p.dtype], shape=list(p.shape)))
    try:
        client.get_pool(pool)
    except NotFound:
        try:
            client.create_pool(pool, size_bytes=pool_bytes(params))
        except AlreadyExists:
            pass  # another rank created it meanwhile
    created = client.create_model(fp.model_name, pool=pool, tensors=specs, backend=backend)
    try:
        offsets = {t.name: t.offset for t in created.tensors}
        path = client.get_pool(pool).path
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED) as m:
                dst = torch.frombuffer(m, dtype=torch.uint8)
                _write(dst, offsets[FINGERPRINT_TENSOR], torch.frombuffer(bytearray(raw_fp), dtype=torch.uint8))
                for name, p in params:
                    _write(dst, offsets[name], p.detach())
                del dst
        finally:
            os.close(fd)
        return client.seal_model(fp.model_name)
    except BaseException:
        client.unregister_model(fp.model_name)  # nothing half-published
        raise


def _write(dst: torch.Tensor, offset: int, t: torch.Tensor) -> None:
    flat = t.contiguous().cpu().reshape(-1).view(torch.uint8)
    dst[offset : offset + flat.numel()].copy_(flat)


def published_fingerprint(client: Client, name: str) -> Fingerprint | None:
    """The fingerprint a publication carries, read from the pool (None if unreadable)."""
    with client.attach(name, worker_name="offloadd-vllm-fingerprint") as lease:
        try:
            return Fingerprint.from_bytes(lease.numpy(FINGERPRINT_TENSOR).tobytes())
        except (KeyError, ValueError, TypeError):
            return None


def check_fits(model: nn.Module, lease_tensors: dict[str, object]) -> None:
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
