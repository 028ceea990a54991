"""dfloat generate [MODEL] --prompt TEXT: stream a completion from a compressed (or plain) model."""

from __future__ import annotations

import time

import click


def load_for_generation(model_path, device, matmul="decode"):
    """(model, tokenizer, compressed?) for a compressed folder, an official DF11 folder or a plain BF16 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dfloat
    from dfloat.runtime import source as src

    folder, _ = src.resolve_folder(model_path)
    config = src.read_config(folder)
    compressed = "dfloat" in config or "dfloat11_config" in config
    if compressed:
        model = dfloat.load_compressed(folder, device=device, matmul=matmul)
    else:
        if matmul != "decode":
            raise click.UsageError("--fused needs a compressed model (it multiplies from the coded weights)")
        src.weight_files(folder)  # a clear error if there are no weights
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise dfloat.ModelSourceError(f"{folder}: no usable tokenizer ({type(e).__name__})") from None
    return model, tokenizer, compressed


@click.command("generate")
@click.argument("model", required=False)
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=None, help="0 for greedy [default: the model's setting].")
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if present].")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--stats", is_flag=True, help="Print tokens/s, time to first token, peak memory and bandwidth.")
@click.option("--fused", is_flag=True,
              help="CUDA: multiply straight from the coded weights (deterministic, not bit-identical to BF16).")
def command(model, prompt, max_new_tokens, temperature, top_p, seed, device, chat, stats, fused):
    """Generate text with MODEL (Hub id or folder; default: the bundled demo model)."""
    import torch
    from transformers import TextStreamer

    from dfloat.demo import demo_model_path

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if seed is not None:
        torch.manual_seed(seed)
    t_load = time.perf_counter()
    lm, tok, compressed = load_for_generation(model or demo_model_path(), device, "fused" if fused else "decode")
    t_load = time.perf_counter() - t_load
    if chat:
        if not getattr(tok, "chat_template", None):
            raise click.UsageError("this model's tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(device)
    gen = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        gen.update(do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
    if top_p is not None:
        gen["top_p"] = top_p
    if getattr(lm.generation_config, "pad_token_id", None) is None and tok.eos_token_id is not None:
        gen["pad_token_id"] = tok.eos_token_id

    first = []

    class _Streamer(TextStreamer):
        def put(self, value):
            if self.next_tokens_are_prompt is False and not first:
                first.append(time.perf_counter())
            super().put(value)

    if not chat:
        click.echo(prompt, nl=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(ids, streamer=_Streamer(tok, skip_prompt=True), **gen)
    elapsed = time.perf_counter() - t0  # the streamer ends the text with a newline
    if stats:
        _print_stats(
            lm,
            out.shape[1] - ids.shape[1],
            elapsed,
            (first[0] - t0) if first else elapsed,
            t_load,
            device,
            compressed,
        )


def _print_stats(lm, n_new, elapsed, ttft, t_load, device, compressed):
    import resource

    import torch

    from dfloat.runtime.loader import weight_memory

    mem = weight_memory(lm) if compressed else None
    weights = (
        mem["compressed"] + mem["plain"]
        if mem
        else sum(p.numel() * p.element_size() for p in lm.parameters())
    )
    decode_time = max(elapsed - ttft, 1e-9)
    tps = (n_new - 1) / decode_time if n_new > 1 else n_new / elapsed
    peak = (
        torch.cuda.max_memory_allocated()
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    click.echo("--- stats", err=True)
    click.echo(f"tokens          {n_new} in {elapsed:.2f} s ({tps:.1f} tok/s after the first)", err=True)
    click.echo(f"first token     {1000 * ttft:.0f} ms (model load {t_load:.2f} s)", err=True)
    click.echo(
        f"weights         {weights / 2**20:.1f} MiB" + (" compressed + plain" if compressed else " BF16"),
        err=True,
    )
    click.echo(f"bandwidth       {weights * tps / 1e9:.2f} GB/s of weights read", err=True)
    click.echo(
        f"peak memory     {peak / 2**20:.0f} MiB ({'GPU allocated' if device.startswith('cuda') else 'process RSS'})",
        err=True,
    )
