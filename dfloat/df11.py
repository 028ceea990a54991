"""Units in the official DFloat11 layout (../shared/reference/df11-official-layout.md), read into our own form.

The official stream semantics equal ours with 8-byte windows and 512 windows per block; only the code is stored
differently (lookup tables for a non-canonical code instead of 256 canonical lengths; `dfloat.huffman` converts
between the two forms). Reading turns those tables back into (code, length) pairs, which then feed the same decode
tables as our own units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dfloat.code_tables import code_of
from dfloat.codec import decompress_tensor, encode_words
from dfloat.errors import CorruptStreamError
from dfloat.format import CODE_DF11_LUT, MODE_HUFFMAN, CompressedTensor, Member
from dfloat.huffman import luts_from_code
from dfloat.integrity import check_structure

OFFICIAL_BYTES_PER_THREAD = 8
OFFICIAL_THREADS_PER_BLOCK = 512
UNKNOWN_CRC = -1  # official checkpoints store no checksums

OFFICIAL_ARRAYS = ("encoded_exponent", "sign_mantissa", "luts", "gaps", "output_positions", "split_positions")


def to_official_unit(ct: CompressedTensor) -> dict[str, torch.Tensor]:
    """Re-encode a unit in the official layout (8-byte windows, 512 per block, LUTs). For tests and interop.

    Unlike the official writer it appends no end-of-stream code: readers stop at the stored number of weights.
    """
    words = decompress_tensor(ct, device="cpu").reshape(-1).view(torch.int16).numpy().view(np.uint16)
    coded = encode_words(words, ct.members, OFFICIAL_BYTES_PER_THREAD, OFFICIAL_THREADS_PER_BLOCK, 32)
    luts = luts_from_code(*code_of(coded))
    pos = coded.output_positions.numpy().astype(np.uint32)
    return {
        "encoded_exponent": coded.encoded_exponent,
        "sign_mantissa": coded.sign_mantissa,
        "luts": torch.from_numpy(luts),
        "gaps": coded.gaps,
        "output_positions": torch.from_numpy(pos.view(np.uint8).copy()),
        "split_positions": torch.tensor([m.offset for m in ct.members[1:]], dtype=torch.int64),
    }


def from_official_unit(
    arrays: Mapping[str, torch.Tensor],
    members: Sequence[tuple[str, tuple[int, ...]]],
    bytes_per_thread: int = OFFICIAL_BYTES_PER_THREAD,
    threads_per_block: int = OFFICIAL_THREADS_PER_BLOCK,
    where: str = "official unit",
) -> CompressedTensor:
    """A CompressedTensor over an official unit's arrays; ``members`` are the module weights' names and shapes in
    the unit's order (the official files do not store them)."""
    missing = [k for k in OFFICIAL_ARRAYS[:5] if k not in arrays]
    if missing:
        raise CorruptStreamError(f"{where}: missing {', '.join(missing)}")
    pos_bytes = arrays["output_positions"].detach().cpu().contiguous().view(torch.uint8).numpy()
    if pos_bytes.size % 4:
        raise CorruptStreamError(f"{where}: output_positions is not a whole number of uint32 values")
    positions = torch.from_numpy(pos_bytes.view(np.uint32).astype(np.int64))
    numel = int(arrays["sign_mantissa"].numel())
    offsets, out, total = [], [], 0
    for name, shape in members:
        shape = tuple(int(s) for s in shape)
        out.append(Member(name, shape, total, UNKNOWN_CRC))
        offsets.append(total)
        total += int(np.prod(shape, dtype=np.int64))
    if total != numel:
        raise CorruptStreamError(f"{where}: the module's weights hold {total} elements, the unit {numel}")
    if "split_positions" in arrays:
        split = arrays["split_positions"].detach().cpu().reshape(-1).tolist()
        if split and split != offsets[1:] and split != offsets:
            raise CorruptStreamError(
                f"{where}: split_positions {split[:4]}... disagree with the weights' sizes"
            )
    ct = CompressedTensor(
        mode=MODE_HUFFMAN,
        members=tuple(out),
        numel=numel,
        encoded_exponent=arrays["encoded_exponent"].reshape(-1),
        sign_mantissa=arrays["sign_mantissa"].reshape(-1),
        gaps=arrays["gaps"].reshape(-1),
        output_positions=positions,
        code=arrays["luts"].to(torch.uint8),
        code_kind=CODE_DF11_LUT,
        bytes_per_window=bytes_per_thread,
        windows_per_block=threads_per_block,
        max_code_length=32,
    )
    check_structure(ct, where)
    return ct
