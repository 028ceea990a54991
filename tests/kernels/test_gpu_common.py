"""Checked decodes and CUDA-graph capture (kernels/gpu_common.py), on the CPU with the capture state faked: a checked
decode reads a status word back on the host, which a capture cannot record."""

from __future__ import annotations

import logging

import pytest

from dfloat.errors import DFloatError
from dfloat.kernels import gpu_common


def test_outside_capture_the_environment_asks_for_checks(monkeypatch):
    monkeypatch.setattr(gpu_common, "capturing", lambda: False)
    monkeypatch.delenv("DFLOAT_CHECK", raising=False)
    assert not gpu_common.wants_check(False) and gpu_common.wants_check(True)
    monkeypatch.setenv("DFLOAT_CHECK", "1")
    assert gpu_common.wants_check(False)


def test_under_capture_the_environment_check_is_skipped_once_logged(monkeypatch, caplog):
    monkeypatch.setattr(gpu_common, "capturing", lambda: True)
    monkeypatch.setattr(gpu_common, "_CAPTURE_NOTED", [])
    monkeypatch.setenv("DFLOAT_CHECK", "1")
    with caplog.at_level(logging.WARNING, logger="dfloat.kernels.gpu_common"):
        assert not gpu_common.wants_check(False)
        assert not gpu_common.wants_check(False)
    assert [r.message for r in caplog.records if "not checked" in r.message] != []
    assert len(caplog.records) == 1


def test_under_capture_an_explicit_check_is_an_error(monkeypatch):
    monkeypatch.setattr(gpu_common, "capturing", lambda: True)
    with pytest.raises(DFloatError, match="CUDA-graph capture"):
        gpu_common.wants_check(True)


def test_capturing_is_false_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_common.capturing() is False
