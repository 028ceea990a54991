"""vLLM plugin: ``vllm serve FOLDER`` / ``vllm.LLM(FOLDER)`` on a dfloat folder, bit-identical to the BF16 model.

Installed, dfloat declares the entry point ``vllm.general_plugins: dfloat = dfloat.runtime.vllm:register``;
vLLM calls `register` in each of its processes, which adds the quantization method ``"dfloat"`` (named by the
folder's config.json) through vLLM's out-of-tree quantization API. Nothing here imports vLLM until vLLM itself
runs the plugin. How it works: docs/vllm.md.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register() -> None:
    """Make ``quant_method: "dfloat"`` known to vLLM (idempotent; a vLLM this plugin cannot work with gets a
    warning, not a crash of vLLM itself)."""
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config

        from dfloat.runtime.vllm.config import QUANT_METHOD, DfloatConfig
    except ImportError as e:
        log.warning("dfloat: the vLLM plugin is not registered (%s)", e)
        return
    register_quantization_config(QUANT_METHOD)(DfloatConfig)
