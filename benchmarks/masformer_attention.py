"""MASFormer at long context on the CPU: attention time and KV-cache size, mixed spans vs all-full attention.

For each layout (all full; 1 full + 5 sliding; 1 full + 5 block; and the sparse layouts under the dense-mask
reference), a 6-layer model prefills one sequence of --tokens tokens. Reported per layout:
- attention time: the six layers' attention calls alone (the exact code path of a forward: the model's own
  masks or chunked span objects, q/k/v of the model's shapes), summed over layers, median of --repeats,
  in CPU seconds of the calling thread (one torch thread, so a busy shared machine does not skew the ratio)
  and in wall seconds;
- KV cache: bytes held by the cache after the prefill (keys + values, every layer);
- forward time: one whole cached prefill, CPU seconds (MLPs and projections included, same for every layout).

python benchmarks/masformer_attention.py [--tokens 8192] [--window 1024] [--block 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_result  # noqa: E402

from dfloat.models import MASFormerConfig, MASFormerForCausalLM  # noqa: E402
from dfloat.models.skeleton import attention, prepare_mask  # noqa: E402

LAYERS = 6


def build(spans: list[str], impl: str, args) -> MASFormerForCausalLM:
    cfg = MASFormerConfig(
        vocab_size=256,
        hidden_size=args.heads * args.head_dim,
        intermediate_size=2 * args.heads * args.head_dim,
        num_hidden_layers=LAYERS,
        num_attention_heads=args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.tokens,
        attention_spans=spans,
        attention_window=args.window,
        attention_block_size=args.block,
        sparse_attention_impl=impl,
    )
    torch.manual_seed(0)
    return MASFormerForCausalLM(cfg).eval()


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (thread CPU seconds, wall seconds) of ``repeats`` calls after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]


def attention_only(model: MASFormerForCausalLM, args) -> tuple[float, float]:
    """The six layers' attention on random q/k/v of the model's shapes, as a prefill runs it."""
    t, h, d = args.tokens, args.heads, args.head_dim
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, t, d, generator=g) for _ in range(3))
    q_slots = torch.arange(t)
    masks = [prepare_mask(m, "sdpa", q.dtype) for m in model.model.build_attention_masks(q_slots, t, None)]

    def run():
        for mask in masks:
            attention(q, k, v, mask, "sdpa")

    return timed(run, args.repeats)


def prefill(model: MASFormerForCausalLM, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
    return cache


def cache_bytes(cache: DynamicCache) -> int:
    return sum(la.keys.numel() * la.keys.element_size() * 2 for la in cache.layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    full = "full_attention"
    layouts = [
        ("all full", [full] * LAYERS, "chunked"),
        ("1 full + 5 sliding", [full] + ["sliding_attention"] * 5, "chunked"),
        ("1 full + 5 block", [full] + ["block_attention"] * 5, "chunked"),
        ("1 full + 5 sliding, dense mask", [full] + ["sliding_attention"] * 5, "dense"),
        ("1 full + 5 block, dense mask", [full] + ["block_attention"] * 5, "dense"),
    ]
    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(2))
    rows = []
    for name, spans, impl in layouts:
        model = build(spans, impl, args)
        attn_cpu, attn_wall = attention_only(model, args)
        c0 = time.thread_time()
        cache = prefill(model, ids)
        fwd_cpu = time.thread_time() - c0
        rows.append(
            {
                "layout": name,
                "impl": impl,
                "attention_cpu_s": round(attn_cpu, 3),
                "attention_wall_s": round(attn_wall, 3),
                "kv_cache_mib": round(cache_bytes(cache) / 2**20, 2),
                "prefill_cpu_s": round(fwd_cpu, 3),
            }
        )
        print(f"  {name}: attention {attn_cpu:.2f} CPU s, cache {rows[-1]['kv_cache_mib']} MiB", flush=True)
    base = rows[0]
    for r in rows:
        r["attention_speedup_vs_full"] = round(base["attention_cpu_s"] / r["attention_cpu_s"], 2)
        r["kv_cache_reduction_vs_full"] = round(base["kv_cache_mib"] / r["kv_cache_mib"], 2)
    print()
    print_table(
        rows,
        ["layout", "attention_cpu_s", "attention_wall_s", "attention_speedup_vs_full", "kv_cache_mib",
         "kv_cache_reduction_vs_full", "prefill_cpu_s"],
    )  # fmt: skip
    write_result(
        "masformer_attention",
        rows,
        settings={**vars(args), "layers": LAYERS, "batch": 1, "dtype": "float32", "torch_threads": 1},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
