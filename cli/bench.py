"""dfloat bench [MODEL]: decode throughput per backend, and BF16-vs-dfloat generation on a GPU."""

from __future__ import annotations

import json
import statistics
import time

import click

from dfloat.cli.options import NO_VERIFY


def _time(fn, repeats, sync):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rows(units, repeats: int) -> list[dict]:
    import torch

    import dfloat
    from dfloat.kernels import available_backends

    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        on_dev = [u.to(dev) for u in units]
        numel = sum(u.numel for u in on_dev)
        out = torch.empty(max(u.numel for u in on_dev), dtype=torch.bfloat16, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for backend in available_backends(dev):

            def run(b=backend.value, on_dev=on_dev, out=out):
                for u in on_dev:
                    dfloat.decompress_tensor(u, out=out, backend=b)

            t = _time(run, repeats, sync)
            rows.append(
                {
                    "device": dev,
                    "backend": backend.value,
                    "weights": numel,
                    "G_weights_per_s": round(numel / t / 1e9, 3),
                    "GB_per_s_bf16_out": round(2 * numel / t / 1e9, 2),
                }
            )
    return rows


@click.command("bench")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Timed runs per backend, after one warm-up; the median is reported.",
)
@NO_VERIFY
def command(model, as_json, repeats, no_verify):
    """Decode throughput of MODEL's units (default: the bundled demo model) on every available backend; on a
    CUDA GPU with MODEL given, also per-token generation latency and weight memory against BF16."""
    from dfloat.demo import demo_model_path
    from dfloat.runtime.checkpoint import CompressedCheckpoint

    units = [
        ct
        for _, us, _ in CompressedCheckpoint.open(model or demo_model_path()).iter_shards(
            verify=not no_verify
        )
        for ct in us.values()
        if ct.is_coded
    ]
    rows = decode_rows(units, repeats)
    result = {"model": str(model or demo_model_path()), "decode": rows}
    import torch

    gen = _generation_rows(model) if model and torch.cuda.is_available() else []
    if gen:
        result["generation"] = gen
    else:
        why = "no CUDA GPU here" if not torch.cuda.is_available() else "no MODEL given"
        result["note"] = f"decoding only: generation is compared with BF16 on a CUDA GPU with MODEL ({why})"
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{'device':<7} {'backend':<8} {'weights':>12} {'G weights/s':>12} {'GB/s out':>9}")
    for r in rows:
        click.echo(
            f"{r['device']:<7} {r['backend']:<8} {r['weights']:>12,} {r['G_weights_per_s']:>12} "
            f"{r['GB_per_s_bf16_out']:>9}"
        )
    for r in gen:
        click.echo(
            f"{r['weights']:<8} {r['ms_per_token']:.2f} ms/token, weight memory {r['weight_MiB']:.0f} MiB"
        )
    if "note" in result:
        click.echo(result["note"])


def _generation_rows(model) -> list[dict]:
    """Per-token latency at batch 1 and weight memory on the GPU: dfloat vs the same model decompressed to BF16."""
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    import dfloat
    from dfloat.runtime.loader import weight_memory

    def per_token(m, ids):
        with torch.inference_mode():
            t = _time(
                lambda: m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
                3,
                torch.cuda.synchronize,
            )
        return 1000 * t / 32

    lm = dfloat.load_compressed(model, device="cuda")
    ids = torch.randint(0, lm.config.vocab_size, (1, 16), device="cuda")
    rows = [
        {
            "weights": "dfloat",
            "ms_per_token": per_token(lm, ids),
            "weight_MiB": weight_memory(lm)["total"] / 2**20,
        }
    ]
    del lm
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        dfloat.decompress_model(model, Path(tmp) / "bf16")
        ref = AutoModelForCausalLM.from_pretrained(Path(tmp) / "bf16", dtype=torch.bfloat16).to("cuda").eval()
    size = sum(p.numel() * p.element_size() for p in ref.parameters())
    rows.append({"weights": "bf16", "ms_per_token": per_token(ref, ids), "weight_MiB": size / 2**20})
    return rows
