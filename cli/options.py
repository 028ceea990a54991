"""Option types shared by the subcommands: bad values are refused by click, before anything is loaded."""

from __future__ import annotations

import click


class DeviceType(click.ParamType):
    """cpu, cuda or cuda:N, and only a device this machine has."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{value!r} is not a device; use cpu, cuda or cuda:N", param, ctx)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                self.fail(f"{value!r}: this machine has no usable CUDA GPU; use --device cpu", param, ctx)
            if device.index is not None and device.index >= torch.cuda.device_count():
                self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)", param, ctx)
        elif device.type != "cpu":
            self.fail(f"{value!r}: dfloat runs on cpu or cuda devices", param, ctx)
        return str(value)


class BackendType(click.Choice):
    """cpu, triton or cuda, and only one that can decode on this machine (cuda and triton on its GPU)."""

    def __init__(self):
        super().__init__(["cpu", "triton", "cuda"])

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        import torch

        from dfloat.errors import BackendUnavailableError
        from dfloat.kernels.registry import resolve

        device = "cuda" if value != "cpu" and torch.cuda.is_available() else "cpu"
        try:
            resolve(value, device)
        except BackendUnavailableError as e:
            self.fail(f"{value!r} cannot decode on this machine: {str(e).split(': ', 1)[-1]}", param, ctx)
        return value


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's range lets nan through: no comparison fails)."""

    def convert(self, value, param, ctx):
        import math

        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return value


DEVICE = DeviceType()
BACKEND = BackendType()
NO_VERIFY = click.option(
    "--no-verify",
    is_flag=True,
    help="Skip checking the files against their checksums (for checkpoints verified once).",
)
