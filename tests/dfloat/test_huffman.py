import numpy as np
import pytest

from dfloat import huffman
from dfloat.errors import CorruptStreamError, DFloatError


def unlimited_huffman_cost(counts):
    """Total bits of an unrestricted Huffman code (sum of merged weights), the optimum without a limit."""
    import heapq

    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def brute_force_limited_cost(counts, limit):
    """Optimal cost under a length limit by exhaustive search over length multisets (tiny alphabets only)."""
    import itertools

    c = sorted((x for x in counts if x > 0), reverse=True)
    best = None
    for ls in itertools.combinations_with_replacement(range(1, limit + 1), len(c)):
        if sum(2.0**-x for x in ls) <= 1.0:
            cost = sum(a * b for a, b in zip(c, sorted(ls)))
            best = cost if best is None else min(best, cost)
    return best


def test_matches_unlimited_huffman_when_the_limit_does_not_bind():
    rng = np.random.default_rng(1)
    counts = np.zeros(256, np.int64)
    counts[rng.choice(256, 40, replace=False)] = rng.integers(1, 10**6, 40)
    lengths = huffman.code_lengths(counts, 32)
    assert int((lengths.astype(np.int64) * counts).sum()) == unlimited_huffman_cost(counts)


@pytest.mark.parametrize("limit", [3, 4, 5])
def test_optimal_under_a_binding_limit(limit):
    counts = np.zeros(256, np.int64)
    counts[:7] = [1, 1, 2, 3, 5, 8, 13]
    lengths = huffman.code_lengths(counts, limit)
    assert lengths.max() <= limit
    assert int((lengths.astype(np.int64) * counts).sum()) == brute_force_limited_cost(counts, limit)
    assert huffman.kraft_sum(lengths) == 1.0


def test_fibonacci_counts_are_capped():
    counts = np.zeros(256, np.int64)
    a, b = 1, 1
    for i in range(40):
        counts[i] = a
        a, b = b, a + b
    assert huffman.code_lengths(counts, 32).max() == 32  # unlimited depth would be 39
    assert huffman.code_lengths(counts, 12).max() == 12


def test_one_symbol_and_all_symbols():
    one = np.zeros(256, np.int64)
    one[7] = 5
    assert huffman.code_lengths(one, 24).tolist() == [0] * 7 + [1] + [0] * 248
    assert (huffman.code_lengths(np.ones(256, np.int64), 8) == 8).all()
    with pytest.raises(DFloatError, match="cannot be coded"):
        huffman.code_lengths(np.ones(256, np.int64), 7)


def test_canonical_codes_and_tables_decode_every_code():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 1000, 256) * (rng.random(256) < 0.3)
    counts[0] = 1
    lengths = huffman.code_lengths(counts, 20)
    codes = huffman.canonical_codes(lengths)
    tables = huffman.build_decode_tables(codes, lengths)
    for s in np.flatnonzero(lengths):
        length, code = int(lengths[s]), int(codes[s])
        window = code << (32 - length)  # the code left-aligned in 32 bits, then lookups 8 bits at a time
        e, depth = tables[0][window >> 24], 1
        while e < 0:
            e = tables[-e][(window >> (24 - 8 * depth)) & 0xFF]
            depth += 1
        assert (e & 0xFF, e >> 8) == (s, length)


def test_tables_reject_codes_that_are_not_prefix_free():
    lengths = np.zeros(256, np.uint8)
    lengths[[1, 2]] = 1
    codes = np.zeros(256, np.uint32)  # both "0"
    with pytest.raises(CorruptStreamError):
        huffman.build_decode_tables(codes, lengths)
    with pytest.raises(CorruptStreamError, match="Kraft"):
        huffman.canonical_codes(np.full(256, 1, np.uint8))
