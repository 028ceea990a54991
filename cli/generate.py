"""dfloat generate [MODEL] --prompt TEXT: stream a completion from a compressed (or plain) model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import click

from dfloat.cli.options import DEVICE, NO_VERIFY, FiniteFloatRange


def load_for_generation(model_path, device, verify: bool = True, matmul="decode"):
    """(model, tokenizer, compressed?) for a compressed folder, an official DF11 folder or a plain BF16 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dfloat
    from dfloat.runtime import source as src

    folder, _ = src.resolve_folder(model_path)
    config = src.read_config(folder)
    compressed = "dfloat" in config or "dfloat11_config" in config
    if compressed:
        model = dfloat.load_compressed(folder, device=device, verify=verify, matmul=matmul)
    else:
        if matmul != "decode":
            raise click.UsageError("--fused needs a compressed model (it multiplies from the coded weights)")
        src.weight_files(folder)  # a clear error if there are no weights
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise dfloat.ModelSourceError(
            f"{folder}: {type(model).__name__} cannot generate text (not a causal or seq2seq LM); "
            "dfloat generate needs a text-generation model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise dfloat.ModelSourceError(
            f"{folder}: no usable tokenizer ({type(e).__name__}: {why}); copy the original model's tokenizer "
            "files into the folder"
        ) from None
    return model, tokenizer, compressed


def _check_prompts(prompts: tuple[str, ...]) -> list[str]:
    """Refuse empty prompts and bytes that are not UTF-8 text (the shell passes them through as surrogates)."""
    hint = "'--prompt'"
    for i, prompt in enumerate(prompts):
        which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(prompt[e.start]) - 0xDC00 if 0xDC80 <= ord(prompt[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else repr(prompt[e.start])
            raise click.BadParameter(
                f"{which} is not UTF-8 text ({what} at character {e.start}); pass UTF-8 text", param_hint=hint
            ) from None
        if not prompt.strip():
            raise click.BadParameter(f"{which} is empty; give some text to continue", param_hint=hint)
    return list(prompts)


def _prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"][0].tolist()
    return tok(prompt)["input_ids"]


def _check_context(lm, prompt_tokens: int, max_new_tokens: int) -> None:
    context = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(context, int) and prompt_tokens + max_new_tokens > context:
        raise click.BadParameter(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new ones exceed the model's {context} positions; "
            "lower it or shorten the prompt",
            param_hint="'--max-new-tokens'",
        )


@click.command("generate")
@click.argument("model", required=False)
@click.option(
    "--prompt",
    "-p",
    "prompts",
    required=True,
    multiple=True,
    help="Text to continue; repeat -p to generate for several prompts as one batch.",
)
@click.option(
    "--max-new-tokens",
    "-n",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Tokens to generate for each prompt (fewer when the model ends its text).",
)
@click.option(
    "--temperature",
    type=FiniteFloatRange(min=0),
    default=None,
    help="0 for greedy [default: the model's setting].",
)
@click.option(
    "--top-p",
    type=FiniteFloatRange(0, 1, min_open=True),
    default=None,
    help="Sample only from the most likely tokens whose probabilities add up to this [default: the model's "
    "setting; 1 = all].",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--device", type=DEVICE, default=None, help="cpu, cuda, cuda:1 ... [default: cuda if present].")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--stats", is_flag=True, help="Print tokens/s, time to first token, peak memory and bandwidth.")
@click.option(
    "--no-graphs",
    is_flag=True,
    help="On CUDA, use transformers' eager generate instead of the static-cache, CUDA-graph fast path.",
)
@click.option(
    "--fused",
    is_flag=True,
    help="CUDA: multiply straight from the coded weights (deterministic, not bit-identical to BF16).",
)
@NO_VERIFY
def command(
    model, prompts, max_new_tokens, temperature, top_p, seed, device, chat, stats, no_graphs, fused, no_verify
):
    """Generate text with MODEL (Hub id or folder; default: the bundled demo model)."""
    import torch
    from transformers import TextStreamer

    from dfloat.demo import demo_model_path

    prompts = _check_prompts(prompts)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if seed is not None:
        torch.manual_seed(seed)
    t_load = time.perf_counter()
    lm, tok, compressed = load_for_generation(
        model or demo_model_path(), device, verify=not no_verify, matmul="fused" if fused else "decode"
    )
    t_load = time.perf_counter() - t_load
    if chat and not getattr(tok, "chat_template", None):
        raise click.UsageError("this model's tokenizer has no chat template; drop --chat")
    run = _Run(lm, tok, chat, max_new_tokens, temperature, top_p, seed, stats, t_load, device, compressed)
    if len(prompts) > 1:
        _batch(run, prompts, no_graphs)
        return
    prompt = prompts[0]
    ids = torch.tensor([_prompt_ids(tok, prompt, chat)], device=device)
    _check_context(lm, ids.shape[1], max_new_tokens)
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
    if device.startswith("cuda") and not no_graphs:
        _fast(run, ids)
        return
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(ids, streamer=_Streamer(tok, skip_prompt=True), **gen)
    elapsed = time.perf_counter() - t0  # the streamer ends the text with a newline
    if stats:
        _print_stats(run, out.shape[1] - ids.shape[1], elapsed, (first[0] - t0) if first else elapsed)


def _sampling(lm, temperature, top_p) -> dict:
    """Sampling options for `generate_ids`: the ones given, else the model's generation config."""
    cfg = lm.generation_config
    sample = bool(cfg.do_sample) if temperature is None else temperature > 0
    return dict(
        temperature=(temperature or getattr(cfg, "temperature", None) or 1.0) if sample else 0.0,
        top_p=(top_p or getattr(cfg, "top_p", None) or 1.0) if sample else 1.0,
        top_k=(getattr(cfg, "top_k", None) or 0) if sample else 0,
        repetition_penalty=getattr(cfg, "repetition_penalty", None) or 1.0,
    )


@dataclass
class _Run:
    """What the batch and CUDA-graph paths and the --stats lines need of one `dfloat generate` call."""

    lm: object
    tok: object
    chat: bool
    max_new_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stats: bool
    t_load: float
    device: str
    compressed: bool


def _batch(run: _Run, prompts: list[str], no_graphs: bool) -> None:
    """Several prompts as one left-padded batch through `dfloat.generate`'s loop (CUDA graphs on a GPU unless
    --no-graphs); each completion is printed under a "--- i/n" line once all are done."""
    import torch

    from dfloat.runtime.generate import generate_ids

    lm, tok, device = run.lm, run.tok, run.device
    rows = [_prompt_ids(tok, p, run.chat) for p in prompts]
    _check_context(lm, max(map(len, rows)), run.max_new_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = generate_ids(
        lm,
        ids,
        mask,
        max_new_tokens=run.max_new_tokens,
        seed=run.seed,
        graphs=False if no_graphs else None,
        **_sampling(lm, run.temperature, run.top_p),
    )
    elapsed = time.perf_counter() - t0
    for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
        click.echo(f"--- {i + 1}/{len(prompts)}")
        click.echo(("" if run.chat else prompt) + tok.decode(tokens, skip_special_tokens=True))
    if run.stats:
        click.echo(f"--- path         {result.path}, batch of {len(prompts)}", err=True)
        _print_stats(run, result.new_tokens, elapsed, result.capture_s + result.prefill_s, rows=len(prompts))


def _fast(run: _Run, ids) -> None:
    """The fast path (static cache, decode step replayed from a CUDA graph), with the model's sampling settings."""
    from dfloat.runtime.generate import _text_streamer, generate_ids

    options = _sampling(run.lm, run.temperature, run.top_p)
    t0 = time.perf_counter()
    result = generate_ids(
        run.lm,
        ids,
        max_new_tokens=run.max_new_tokens,
        seed=run.seed,
        on_tokens=_text_streamer(run.tok, 1, lambda row, text: click.echo(text, nl=False)),
        **options,
    )
    elapsed = time.perf_counter() - t0
    click.echo("")
    if run.stats:
        click.echo(f"--- path         {result.path} (graph capture {result.capture_s:.2f} s)", err=True)
        _print_stats(run, len(result.tokens[0]), elapsed, result.capture_s + result.prefill_s)


def _print_stats(run: _Run, n_new: int, elapsed: float, ttft: float, rows: int = 1) -> None:
    import resource

    import torch

    from dfloat.runtime.loader import weight_memory

    lm, device, compressed, t_load = run.lm, run.device, run.compressed, run.t_load
    mem = weight_memory(lm) if compressed else None
    weights = (
        mem["compressed"] + mem["plain"]
        if mem
        else sum(p.numel() * p.element_size() for p in lm.parameters())
    )
    decode_time = max(elapsed - ttft, 1e-9)
    tps = (n_new - rows) / decode_time if n_new > rows else n_new / elapsed
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
