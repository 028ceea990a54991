"""End to end: BF16 vs dfloat in one run: per-token latency (batch 1 and 16), prefill time, weight and peak memory.

Models (random BF16 weights whose exponents follow the trained MiniLM histogram, so they compress like real ones):
  llama-3.2-1b   the shapes of Llama-3.2-1B (16 layers, hidden 2048, FFN 8192, vocab 128256, tied)
  llama-8b-layer one decoder layer with Llama-3.1-8B shapes (hidden 4096, FFN 14336, 32/8 heads), small vocab

    python benchmarks/e2e.py                       # on the GPU (cuda) when present, else CPU at reduced size
    python benchmarks/e2e.py --device cpu --layers 2 --vocab 32000 --new-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import minilm_bf16, print_table, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.runtime.loader import weight_memory  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        head_dim=64,
    ),
    "llama-8b-layer": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=1024,
        tie_word_embeddings=False,
        head_dim=128,
    ),
}


def exponent_sampler():
    """A 65,536-entry table mapping a uniform 16-bit draw to an exponent with MiniLM's histogram."""
    w = minilm_bf16().view(torch.int16).numpy().view(np.uint16)
    hist = np.bincount((w >> 7) & 0xFF, minlength=256).astype(np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    return np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).astype(np.uint16)


def fill_like_trained(model: torch.nn.Module, seed: int = 0) -> None:
    table = exponent_sampler()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2:
                p.fill_(1.0)
                continue
            n = p.numel()
            draw = rng.integers(0, 65536, size=(2, n), dtype=np.uint16)
            sm = draw[1]
            words = ((sm & 0x80) << 8) | (table[draw[0]] << 7) | (sm & 0x7F)
            p.copy_(torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).view(p.shape))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_token_ms(model, device, batch, prompt_len, new_tokens, vocab, repeats=3) -> float:
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        one = []
        full = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
            sync(device)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(ids, **gen)
            sync(device)
            full.append(time.perf_counter() - t0)
    # (all tokens) - (prefill + first token), per generated token after the first
    return 1000 * (np.median(full) - np.median(one)) / (new_tokens - 1)


def prefill_ms(model, device, prompt_len, vocab, repeats=3) -> float:
    ids = torch.randint(0, vocab, (1, prompt_len), device=device)
    times = []
    with torch.inference_mode():
        model(ids)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(ids)
            sync(device)
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def peak_bytes(device) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name, cfg_over, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**cfg_over, max_position_embeddings=4096)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        fill_like_trained(model)
        model.save_pretrained(Path(tmp) / "bf16")
        del model
        gc.collect()
        t0 = time.perf_counter()
        report = dfloat.compress_model(Path(tmp) / "bf16", Path(tmp) / "dfloat", verify=False)
        compress_s = time.perf_counter() - t0
        for kind in ("bf16", "dfloat"):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if kind == "bf16":
                lm = AutoModelForCausalLM.from_pretrained(Path(tmp) / "bf16", dtype=torch.bfloat16).to(
                    args.device
                )
                wbytes = sum(p.numel() * p.element_size() for p in lm.parameters())
            else:
                lm = dfloat.load_compressed(Path(tmp) / "dfloat", device=args.device, backend=args.backend)
                wbytes = weight_memory(lm)["total"]
            lm.eval()
            row = {
                "model": name,
                "weights": kind,
                "device": args.device,
                "weight_MiB": round(wbytes / 2**20, 1),
            }
            for b in args.batches:
                row[f"ms_per_token_b{b}"] = round(
                    per_token_ms(lm, args.device, b, args.prompt, args.new_tokens, cfg.vocab_size), 3
                )
            row["prefill_ms"] = round(prefill_ms(lm, args.device, args.prefill, cfg.vocab_size), 2)
            row["peak_MiB"] = round(peak_bytes(args.device) / 2**20, 1)
            if kind == "dfloat":
                row["compress_s"] = round(compress_s, 2)
                row["stored_pct"] = round(100 * report.ratio, 2)
            rows.append(row)
            del lm
            gc.collect()
    base, df = rows
    for b in args.batches:
        df[f"x_bf16_b{b}"] = round(df[f"ms_per_token_b{b}"] / base[f"ms_per_token_b{b}"], 2)
    df["weight_pct_of_bf16"] = round(100 * df["weight_MiB"] / base["weight_MiB"], 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (CPU runs)")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary (CPU runs)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoints")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        over = dict(SHAPES[name])
        if args.layers and over["num_hidden_layers"] > 1:
            over["num_hidden_layers"] = args.layers
        if args.vocab:
            over["vocab_size"] = args.vocab
        label = name + (
            "" if over == SHAPES[name] else f" ({over['num_hidden_layers']}L, vocab {over['vocab_size']})"
        )
        rows += measure(label, over, args)
    cols = [
        "model",
        "weights",
        "weight_MiB",
        *[f"ms_per_token_b{b}" for b in args.batches],
        "prefill_ms",
        "peak_MiB",
        *[f"x_bf16_b{b}" for b in args.batches],
        "weight_pct_of_bf16",
    ]
    print_table(rows, cols)
    write_result(
        args.name or f"e2e_{args.device.split(':')[0]}",
        rows,
        settings=vars(args),
        targets={"x_bf16_b1_max": 2.0, "weight_pct_of_bf16_max": 72},
    )


if __name__ == "__main__":
    main()
