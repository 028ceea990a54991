"""Without vLLM the plugin's entry point is harmless: `register` warns and returns (the vLLM tests need vLLM)."""

import importlib.util
import logging

import pytest


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_register_without_vllm_warns_and_returns(caplog):
    from dfloat.runtime.vllm import register

    with caplog.at_level(logging.WARNING, logger="dfloat.runtime.vllm"):
        assert register() is None
    assert "the vLLM plugin is not registered" in caplog.text
    assert "No module named 'vllm'" in caplog.text
