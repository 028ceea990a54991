#!/usr/bin/env python3
"""PolyCom vs Llama on the demo recipe at a fixed step count, several seeds each: mean and spread of val loss.

Why: one run per architecture with different step counts (the first demo comparison) cannot tell an
architecture difference from seed noise. Every run here uses ``scripts/train_demo_model.py``'s corpus, tokenizer,
model builder, optimizer (AdamW 0.9/0.95, weight decay 0.1 on matrices, clip 1.0) and warm-up + cosine schedule,
with the same --steps, batch and context; runs differ only in --arch (with the demo doc's MLP widths: SwiGLU 768,
PolyCom's non-gated 1152) and the seed, which fixes the weight init and the data order. The corpus and tokenizer
are built once, in process, so the budget goes to training. Validation loss is on the demo's held-out 2% tail.

Usage::

    python benchmarks/demo_arch_seeds.py --steps 40 --seeds 1 2 3 --deb r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_demo_model as demo  # noqa: E402
from common import print_table, write_result  # noqa: E402

FFN = {"llama": 768, "polycom": 1152}


def train_one(arch: str, seed: int, args, train: torch.Tensor, val: torch.Tensor, tokenizer) -> dict:
    torch.manual_seed(seed)
    margs = argparse.Namespace(
        arch=arch, hidden=256, ffn=FFN[arch], layers=4, heads=4, kv_heads=4, max_positions=512
    )
    eos, pad = tokenizer.convert_tokens_to_ids(demo.EOS), tokenizer.convert_tokens_to_ids(demo.PAD)
    model = demo.build_model(margs, len(tokenizer), eos, eos, pad)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    T, B, V = args.ctx, args.batch, len(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    n = (len(train) - 1) // (T + 1)
    chunks = train[: n * (T + 1)].view(n, T + 1)
    order = torch.randperm(n, generator=gen)
    model.train()
    c0 = time.thread_time()
    for step in range(args.steps):
        lr = demo.lr_at(step, args.steps, args.warmup, args.lr, args.lr * 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x = chunks[order[(step * B) % n : (step * B) % n + B]]
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_cpu = time.thread_time() - c0
    model.eval()
    val_chunks = val[: (len(val) // (T + 1)) * (T + 1)].view(-1, T + 1)
    tot = cnt = 0.0
    with torch.no_grad():
        for i in range(0, len(val_chunks), 16):
            x = val_chunks[i : i + 16]
            logits = model(input_ids=x[:, :-1]).logits.float()
            tot += torch.nn.functional.cross_entropy(
                logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="sum"
            )
            cnt += x[:, 1:].numel()
    return {
        "arch": arch,
        "seed": seed,
        "steps": args.steps,
        "final_train_loss": round(loss.item(), 4),
        "val_loss": round(float(tot / cnt), 4),
        "train_cpu_s": round(train_cpu, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--archs", nargs="+", default=["llama", "polycom"], choices=list(FFN))
    ap.add_argument(
        "--deb", type=Path, required=True, help="r-cran-janeaustenr .deb (apt-get download gets it)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    novels, _ = demo.load_corpus(args.deb)
    tokenizer = demo.train_tokenizer(novels, 4096)
    eos = tokenizer.convert_tokens_to_ids(demo.EOS)
    ids = []
    for text in novels:
        ids.extend(tokenizer.backend_tokenizer.encode(text).ids)
        ids.append(eos)
    data = torch.tensor(ids, dtype=torch.long)
    n_val = int(len(data) * 0.02)
    train, val = data[:-n_val], data[-n_val:]
    runs = []
    for seed in args.seeds:
        for arch in args.archs:
            r = train_one(arch, seed, args, train, val, tokenizer)
            print(
                f"{arch:8s} seed {seed}: val loss {r['val_loss']:.4f}  ({r['train_cpu_s']} CPU s)", flush=True
            )
            runs.append(r)
    summary = []
    for arch in args.archs:
        vals = [r["val_loss"] for r in runs if r["arch"] == arch]
        summary.append(
            {
                "arch": arch,
                "runs": len(vals),
                "mean_val_loss": round(statistics.mean(vals), 4),
                "stdev": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        )
    print()
    print_table(summary, ["arch", "runs", "mean_val_loss", "stdev", "min", "max"])
    settings = {k: v for k, v in vars(args).items() if k != "deb"}
    write_result("demo_arch_seeds", summary, settings=settings, ffn=FFN, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
