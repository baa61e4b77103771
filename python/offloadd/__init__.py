"""offloadd's Python client: weights that the offloadd daemon holds, as zero-copy tensors.

    import offloadd
    client = offloadd.connect()
    with client.attach("smol") as lease:
        w = lease.torch("model.embed_tokens.weight")

``offloadd.torch`` binds a layer stack to a lease the way vLLM's offloaders do, and
``offloadd.hf`` builds a transformers model over the daemon's weights (extras ``torch`` and
``hf``).
"""

from .client import DEFAULT_SOCKET, Client, Tls, connect, prefetch, uva
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LeaseLost,
    NotFound,
    OffloaddError,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UnknownTensor,
)
from .fast import FastPath, Onloaded
from .lease import Lease, Tensor

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET", "Client", "Tls", "connect", "prefetch", "uva", "Lease", "Tensor", "FastPath",
    "Onloaded", "OffloaddError", "Aborted", "AlreadyExists", "Cancelled", "DataLoss",
    "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument", "LeaseLost",
    "NotFound", "OutOfRange", "PermissionDenied", "ResourceExhausted", "Unauthenticated",
    "Unavailable", "Unimplemented", "Unknown", "UnknownTensor",
]
