"""One vLLM engine per run: what tests/runtime/test_vllm.py, benchmarks/vllm_memory.py and vllm_check.py compare.

Run as a script: vLLM spawns its engine and workers, which re-import the main module, so the work sits behind the
``__main__`` guard, and every engine lives in its own process (its memory goes when the run ends).

    python benchmarks/vllm_engine.py build OUT --arch llama|qwen2 [--tied] [--vocab N] [--kv-heads N] ...
        -> OUT/bf16 (a random model with the bundled demo's tokenizer) and OUT/dfloat (`dfloat compress`ed)
    python benchmarks/vllm_engine.py run FOLDER OUT.json [--tp N] [--eager] [--gpu-memory-utilization F]
        -> greedy token ids and top logprobs of PROMPTS; each rank's weight memory as vLLM reports it (GPU) and,
           for dfloat folders, as `dfloat.runtime.vllm.layers.weight_memory` counts it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

PROMPTS = ["Once upon a time", "It is a truth universally acknowledged", "Mr. Darcy said", "The"]
MAX_TOKENS = 24


def build(
    out: Path,
    arch: str,
    tied: bool,
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    seed: int = 0,
) -> None:
    """A random model whose greedy generations vary (embeddings N(0, 0.02), matrices N(0, 1/fan_in), biases
    N(0, 0.1)), saved in BF16 and compressed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    import dfloat
    from dfloat.demo import demo_model_path

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = 0.02 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_path() / f, out / "bf16" / f)
    dfloat.compress_model(out / "bf16", out / "dfloat", overwrite=True)


def _reported_model_memory(worker) -> int | None:
    """What vLLM logs as "Model loading took X GiB" on a GPU (the CPU runner does not measure it)."""
    return getattr(getattr(worker, "model_runner", None), "model_memory_usage", None)


def run(folder: str, out: Path, tp: int, eager: bool, memory_utilization: float = 0.1) -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=folder,
        tensor_parallel_size=tp,
        enforce_eager=eager,
        gpu_memory_utilization=memory_utilization,
        max_model_len=256,
        seed=0,
    )
    started = time.perf_counter() - t0
    results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2))
    report = {
        "folder": folder,
        "tp": tp,
        "eager": eager,
        "start_s": round(started, 1),
        "ids": [list(r.outputs[0].token_ids) for r in results],
        "logprobs": [
            [{str(k): v.logprob for k, v in step.items()} for step in r.outputs[0].logprobs] for r in results
        ],
        "texts": [r.outputs[0].text for r in results],
        "vllm_model_memory_bytes": llm.collective_rpc(_reported_model_memory),
    }
    from dfloat.runtime.checkpoint import is_compressed_folder

    if is_compressed_folder(Path(folder)):
        from dfloat.runtime.vllm.layers import weight_memory

        report["ranks"] = llm.apply_model(weight_memory)
    out.write_text(json.dumps(report))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    b.add_argument("--tied", action="store_true")
    b.add_argument("--vocab", type=int, default=4096)
    b.add_argument("--hidden", type=int, default=128)
    b.add_argument("--intermediate", type=int, default=256)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--kv-heads", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("folder")
    r.add_argument("out", type=Path)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--eager", action="store_true")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.out, a.arch, a.tied, a.vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads)
    else:
        run(a.folder, a.out, a.tp, a.eager, a.gpu_memory_utilization)


if __name__ == "__main__":
    main(sys.argv[1:])
