"""Regenerate tests/data/golden_v1.safetensors (only when the format version changes on purpose).

The file holds a small input and its compressed form; tests require the encoder to reproduce it byte for byte
and every decoder backend to decode it, so format drift fails CI.
"""

from pathlib import Path

import numpy as np
import torch

import dfloat

GOLDEN = Path(__file__).with_name("golden_v1.safetensors")
OPTIONS = dict(bytes_per_window=8, windows_per_block=8, allow_raw=False)


def golden_input() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(20261126)
    w = torch.from_numpy(rng.normal(0, 0.02, 3000).astype(np.float32)).to(torch.bfloat16).view(50, 60)
    specials = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x0001, 0x807F, 0x3F80, 0xBF80],
                            dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return {"weight": w, "specials": specials}


if __name__ == "__main__":
    inputs = golden_input()
    unit = dfloat.compress_tensors(inputs, **OPTIONS)
    dfloat.save_compressed_tensors({"golden": unit}, GOLDEN, extra_tensors={f"input.{k}": v for k, v in inputs.items()})
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
