"""Backend choice: by name with one-line errors, or automatic with a fallback when a backend cannot run."""

import pytest
import torch

import dfloat
from dfloat.errors import BackendUnavailableError
from dfloat.kernels import registry
from dfloat.testing import bits, weights_like


def test_unknown_and_unavailable_backends_say_what_to_do():
    ct = dfloat.compress_tensor(weights_like(10_000))
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        dfloat.decompress_tensor(ct, backend="nope")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        dfloat.decompress_tensor(ct, backend="cuda")


def test_automatic_choice_falls_back_when_a_backend_cannot_run(monkeypatch):
    t = weights_like(10_000)
    ct = dfloat.compress_tensor(t)
    monkeypatch.setattr(registry, "available_backends", lambda device: [registry.Backend.TRITON,
                                                                        registry.Backend.CPU])
    monkeypatch.setattr(registry, "_FAILED", set())
    monkeypatch.setattr(registry, "_CHOSEN", {})  # forget earlier choices

    def broken(ct, out, check=False):
        raise BackendUnavailableError("no toolkit")

    import dfloat.kernels.triton_decode as triton_decode

    monkeypatch.setattr(triton_decode, "decode", broken)
    out = dfloat.decompress_tensor(ct)
    assert torch.equal(bits(out), bits(t)) and (registry.Backend.TRITON, "cpu") in registry._FAILED


def test_a_choice_is_remembered_and_redone_when_it_stops_working(monkeypatch):
    t = weights_like(5_000)
    ct = dfloat.compress_tensor(t)
    monkeypatch.setattr(registry, "_FAILED", set())
    monkeypatch.setattr(registry, "_CHOSEN", {})
    monkeypatch.setattr(registry, "available_backends", lambda device: [registry.Backend.TRITON,
                                                                        registry.Backend.CPU])
    import dfloat.kernels.triton_decode as triton_decode

    calls = []

    def works_once(ct, out, check=False):
        calls.append(1)
        if len(calls) > 1:
            raise BackendUnavailableError("lost its toolkit")
        out.copy_(t)

    monkeypatch.setattr(triton_decode, "decode", works_once)
    assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(t))
    assert list(registry._CHOSEN.values()) == [(registry.Backend.TRITON, works_once)]
    assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(t))  # the remembered one fails: the CPU decodes
    assert len(calls) == 2 and (registry.Backend.TRITON, "cpu") in registry._FAILED
    from dfloat.kernels import cpu

    assert list(registry._CHOSEN.values()) == [(registry.Backend.CPU, cpu.decode)]


def test_decoding_into_a_flat_buffer_makes_no_views():
    t = weights_like(3_000).view(30, 100)
    ct = dfloat.compress_tensor(t)
    flat = torch.empty(ct.numel, dtype=torch.bfloat16)
    assert dfloat.decompress_tensor(ct, out=flat.view(30, 100)).data_ptr() == flat.data_ptr()
    shaped = torch.empty(30, 100, dtype=torch.bfloat16)
    got = dfloat.decompress_tensor(ct, out=shaped)
    assert got.data_ptr() == shaped.data_ptr() and torch.equal(bits(got), bits(t))
    one_d = dfloat.compress_tensor(weights_like(3_000))
    assert dfloat.decompress_tensor(one_d, out=flat) is flat  # flat, exactly numel: returned as it is
    got = dfloat.decompress_tensor(ct, out=flat)
    assert got.shape == (30, 100) and got.data_ptr() == flat.data_ptr() and torch.equal(bits(got), bits(t))
    bigger = torch.empty(ct.numel + 7, dtype=torch.bfloat16)
    got = dfloat.decompress_tensor(ct, out=bigger)
    assert got.shape == (30, 100) and torch.equal(bits(bigger[:ct.numel].view(30, 100)), bits(t))
