"""What makes two vLLM processes' processed weights identical: the fingerprint.

vLLM's parameters after loading are not the checkpoint's tensors: they are fused
(``qkv_proj``, ``gate_up_proj``), sharded for tensor parallelism and possibly quantized. So a
published copy is keyed by everything that shapes them. Computing it opens no weight file (the
files are only stat'ed), so a second start reads nothing from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..v1 import offloadd_pb2 as pb

#: Bumped when the publication format changes, so old publications are never bound.
FORMAT = 1
#: The tensor that carries the fingerprint inside a publication (for diagnosing mismatches).
FINGERPRINT_TENSOR = "__offloadd_fingerprint__"


@dataclass(frozen=True)
class Fingerprint:
    model_path: str
    #: Hash of config.json, the checkpoint index, and each weight file's name, size and mtime.
    checkpoint: str
    dtype: str
    quantization: str
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    vllm_version: str
    format: int = FORMAT

    @property
    def model_name(self) -> str:
        """The daemon's model name: the same path always shares a prefix, so a publication of
        the same model under another fingerprint can be found and reported."""
        return f"vllm-{_short(self.model_path)}-{_short(json.dumps(asdict(self), sort_keys=True))}"

    @property
    def path_prefix(self) -> str:
        return f"vllm-{_short(self.model_path)}-"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Fingerprint:
        return cls(**json.loads(raw))

    def differences(self, other: Fingerprint) -> list[str]:
        """``field: ours != theirs`` for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_hash(model_path: str, source: pb.Model | None = None) -> str:
    """config.json and the index by content; weight files by name, size and mtime (stat only);
    a source model (a ``Model`` message) by its path and each object's URL, size and ETag."""
    h = hashlib.sha256()
    if source is not None:
        h.update(f"source:{source.path}\n".encode())
        for o in source.source_objects:
            h.update(f"{o.url}:{o.size}:{o.etag}\n".encode())
    root = Path(model_path)
    for meta in ("config.json", "model.safetensors.index.json"):
        if (root / meta).is_file():
            h.update(meta.encode() + (root / meta).read_bytes())
    for name in sorted(os.listdir(root)) if root.is_dir() else []:
        if name.endswith((".safetensors", ".bin", ".pt")):
            st = (root / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def of(vllm_config: object, model_config: object, source: pb.Model | None = None) -> Fingerprint:
    """The fingerprint of this vLLM process's rank; ``source`` is the daemon's model the
    checkpoint's tensors come from, if they do not come from the model directory."""
    import vllm

    par = vllm_config.parallel_config  # type: ignore[attr-defined]
    path = os.path.realpath(model_config.model)  # type: ignore[attr-defined]
    return Fingerprint(
        model_path=path,
        checkpoint=checkpoint_hash(path, source),
        dtype=str(model_config.dtype),  # type: ignore[attr-defined]
        quantization=str(model_config.quantization),  # type: ignore[attr-defined]
        tp_size=par.tensor_parallel_size,
        tp_rank=_rank("tp"),
        pp_size=par.pipeline_parallel_size,
        pp_rank=_rank("pp"),
        vllm_version=vllm.__version__,
    )


def _rank(group: str) -> int:
    from vllm.distributed import parallel_state

    getter = {"tp": parallel_state.get_tp_group, "pp": parallel_state.get_pp_group}[group]
    return getter().rank_in_group
