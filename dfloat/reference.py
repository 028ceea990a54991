"""The reference decoder: plain Python, bit by bit, ignoring windows and blocks. The oracle for every other decoder.

Slow on purpose (about a million bits a second): use it on small units in tests.
"""

from __future__ import annotations

import numpy as np
import torch

from dfloat.code_tables import code_of
from dfloat.errors import CorruptStreamError
from dfloat.format import CompressedTensor


def reference_decode(ct: CompressedTensor) -> torch.Tensor:
    """Decode a unit to a flat BF16 tensor by walking the code one bit at a time from the stream's start."""
    if not ct.is_coded:
        return ct.raw.detach().cpu().reshape(-1).clone()
    codes, lengths = code_of(ct)
    symbol_of = {(int(lengths[s]), int(codes[s])): s for s in range(256) if lengths[s] > 0}
    bits = np.unpackbits(ct.encoded_exponent.cpu().numpy()).tolist()
    exponents = []
    code, length = 0, 0
    for bit in bits:
        if len(exponents) == ct.numel:
            break
        code, length = (code << 1) | bit, length + 1
        if (length, code) in symbol_of:
            exponents.append(symbol_of[(length, code)])
            code, length = 0, 0
        elif length > 32:
            raise CorruptStreamError(f"bit pattern {code:b} at exponent {len(exponents)} is no code")
    if len(exponents) != ct.numel:
        raise CorruptStreamError(f"stream ends after {len(exponents)} of {ct.numel} exponents")
    exp = np.array(exponents, dtype=np.uint16)
    sm = ct.sign_mantissa.cpu().numpy().astype(np.uint16)
    words = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    return torch.from_numpy(words.view(np.int16).copy()).view(torch.bfloat16)
