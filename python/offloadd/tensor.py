"""A lease's tensor table rows and typed views over their bytes; shared by :mod:`offloadd.lease`
and :mod:`offloadd.cuda`, which import it and not each other."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from .v1 import offloadd_pb2 as pb

if TYPE_CHECKING:
    import torch

PLACEMENT_NAMES = {
    pb.PLACEMENT_DEVICE: "device",
    pb.PLACEMENT_UVA: "uva",
    pb.PLACEMENT_PREFETCH: "prefetch",
}

NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype (built once: torch is imported only when needed)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return torch_dtypes()[name]
    except KeyError:
        raise TypeError(f"safetensors dtype {name} has no torch equivalent") from None


class Tensor:
    """One row of the lease's tensor table, read-only.

    It reads the row as the daemon sent it rather than copying it: a mixture-of-experts lease
    has 100k+ rows, and a Python object with each field copied made ``attach`` take 25 times
    as long as the calls it makes (1.3 s at 200k rows) and about 500 bytes a row.
    """

    __slots__ = ("_row",)

    def __init__(self, row: pb.LeaseTensor) -> None:
        self._row = row

    @property
    def name(self) -> str:
        return self._row.name

    @property
    def dtype(self) -> str:
        return self._row.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._row.shape)

    @property
    def layer(self) -> int | None:
        """Model layer, or None outside the layer stack."""
        return self._row.layer if self._row.HasField("layer") else None

    @property
    def placement(self) -> str:
        """Where a worker reads it: "device" (copy once), "uva" (in place) or "prefetch" (from
        its static slot)."""
        return PLACEMENT_NAMES.get(self._row.placement, "device")

    @property
    def segment(self) -> int:
        return self._row.segment

    @property
    def offset(self) -> int:
        return self._row.offset

    @property
    def length(self) -> int:
        return self._row.length

    @property
    def static_segment(self) -> int | None:
        return self._row.static_segment if self._row.HasField("static_segment") else None

    @property
    def static_offset(self) -> int:
        return self._row.static_offset

    @property
    def crc32c(self) -> int:
        return self._row.crc32c

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and self._row == other._row

    def __hash__(self) -> int:
        return hash((self._row.name, self._row.segment, self._row.offset))

    def __repr__(self) -> str:
        return (
            f"Tensor(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape}, layer={self.layer}, "
            f"placement={self.placement!r}, offset={self.offset}, length={self.length})"
        )


def typed_view(base: torch.Tensor, offset: int, t: Tensor) -> torch.Tensor:
    """``t``'s bytes at ``offset`` of the flat uint8 tensor ``base``, as its dtype and shape."""
    dtype = torch_dtype(t.dtype)
    return base[offset : offset + t.length].view(dtype).view(t.shape)
