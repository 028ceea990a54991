"""A unit's code, whichever form it is stored in (256 canonical code lengths, or the official DFloat11 lookup
tables), and the decode tables every decoder walks, built from it once per unit."""

from __future__ import annotations

import numpy as np

from dfloat import huffman
from dfloat.errors import CorruptStreamError
from dfloat.format import CODE_CANONICAL, CompressedTensor, unit_label


def code_of(ct: CompressedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes, lengths) of a coded unit, whatever form its code is stored in."""
    code = ct.code.detach().cpu().numpy()
    if ct.code_kind == CODE_CANONICAL:
        return huffman.canonical_codes(code), code.astype(np.uint8)
    return huffman.codes_from_luts(code)


def decode_tables(ct: CompressedTensor) -> np.ndarray:
    """The unit's decode tables (int32, (k, 256)); built once per unit and cached."""
    tables = ct._cache.get("tables")
    if tables is None:
        try:
            tables = huffman.build_decode_tables(*code_of(ct))
        except CorruptStreamError as e:
            raise CorruptStreamError(f"{unit_label(ct)}: {e}") from None
        ct._cache["tables"] = tables
    return tables
