"""The vLLM plugin: vLLM's own loader and offloaders take their weights from offloadd.

It uses only vLLM's public hooks: the ``vllm.general_plugins`` entry point (this module's
:func:`register`, run in every vLLM process) and ``register_model_loader`` for
``--load-format offloadd``. Options come through ``--model-loader-extra-config``:

- ``socket``: the daemon's Unix socket (default ``$OFFLOADD_SOCKET``, else
  ``/tmp/offloadd/offloadd.sock``) or ``host:port``;
- ``pool``: the pool to publish into (default ``vllm``; created to fit when missing; with
  more than one rank, each rank publishes into ``{pool}-tp{r}-pp{p}``);
- ``fallback``: when the daemon is down or holds this model under another fingerprint, load
  from disk with a warning (``true``, the default) or fail with the reason (``false``).
"""

from __future__ import annotations

import logging

#: vLLM versions this plugin was tested with (its hooks and offloader interface).
TESTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")

log = logging.getLogger("vllm.offloadd")


def version_warning(version: str) -> str | None:
    """The warning to give under a vLLM this plugin was not tested with, or None."""
    if version in TESTED_VLLM_VERSIONS:
        return None
    return (
        f"offloadd's vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, and this "
        f"is vLLM {version}: its loader and offloader hooks may have moved. The plugin checks at "
        "start-up that its offloader is the one in use and fails loudly if not."
    )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers ``--load-format offloadd``."""
    import vllm

    warning = version_warning(vllm.__version__)
    if warning:
        log.warning(warning)
    from . import loader  # noqa: F401  (registers the load format on import)
