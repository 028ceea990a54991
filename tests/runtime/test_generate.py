"""The fast generation loop (static cache; CUDA graphs on GPUs) run without capture on the CPU: its tokens equal
transformers' greedy generate, sampling is reproducible, stop tokens and streaming work.

Exactness note: like is compared with like. A static cache attends over all its slots with masks, dynamic
generate over exactly the filled ones: other shapes for the same math, which the CPU's kernels may round
differently (which ones does depend on the CPU: AVX-512 or not, thread count), and at a near-tie of two logits
pick different tokens. transformers' own static and dynamic caches disagree that way on the tiny random Qwen2, at
token 9 on AVX-512 CPUs (issue 19). So in BF16 the loop is checked against transformers' generate over a
``StaticCache`` of the same length (the same kernels on the same shapes, so the same bits on any CPU), and against
the default (dynamic-cache) generate in float32, where rounding differences cannot flip a choice. dfloat's research
architectures have their own static cache, which transformers' generate cannot use: in BF16 their loop is checked
against a plain step-by-step greedy loop over that cache, in float32 against transformers' generate. The trained
demo model (a dfloat architecture, BF16 only once compressed) is checked against the default generate: its logits
are far from ties, and its repetition penalty must be transformers' own.
"""

import pytest
import torch

import dfloat
from dfloat.errors import GenerationError
from dfloat.runtime.generate import CACHE_LEN_STEP, _cache_kwarg, generate_ids

NEW = 12
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _hf_model(family):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig(**COMMON), "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True)}[
        family
    ]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # trained magnitudes, so logits are not all nearly equal
        for p in model.parameters():
            p.normal_(0, 0.05 if p.ndim > 1 else 1.0)
    return model


def _left_padded(vocab, seed=1, length=9):
    ids = torch.randint(3, vocab, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _static_cache(model, max_len=CACHE_LEN_STEP):
    """A transformers StaticCache of the length the loop uses by default, for generate(past_key_values=...)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def _greedy(model, ids, mask, **kw):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        repetition_penalty=1.0,
        pad_token_id=0,
        **kw,
    )
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_families_match_generate(family):
    model = _hf_model(family)
    ids, mask = _left_padded(256)
    for rows in (1, 3):  # BF16: against generate over a static cache of the same length
        got = generate_ids(model, ids[:rows], mask[:rows], max_new_tokens=NEW, stop_token_ids=[])
        assert got.path == "static"
        assert got.tokens == _greedy(model, ids[:rows], mask[:rows], past_key_values=_static_cache(model))
    model = model.float()  # float32 (new static caches): against the default generate (a dynamic cache)
    three = generate_ids(model, ids, mask, max_new_tokens=NEW, stop_token_ids=[])
    assert three.tokens == _greedy(model, ids, mask)
    # a batch padded up to a graph bucket (copies of a row) gives the same rows
    bucket = generate_ids(model, ids, mask, max_new_tokens=NEW, stop_token_ids=[], batch_buckets=(4,))
    assert bucket.tokens == three.tokens


@pytest.mark.parametrize("arch", ["polycom", "masformer", "nextlat", "bottlenecked"])
def test_research_architectures_match_generate(arch, caplog):
    from dfloat.models.testing import tiny_model

    model = tiny_model(arch)
    ids, mask = _left_padded(model.config.vocab_size, seed=2)
    with caplog.at_level("INFO", logger="dfloat.runtime.generate"):
        for rows in (1, 3):  # BF16: against the same cache kind (see the note at the top)
            result = generate_ids(model, ids[:rows], mask[:rows], max_new_tokens=NEW, stop_token_ids=[])
            if result.path == "eager":  # transformers' DynamicCache, as generate uses
                assert result.tokens == _greedy(model, ids[:rows], mask[:rows])
            else:
                assert result.tokens == _static_greedy(model, ids[:rows], mask[:rows])
            model = model.float()
        for rows in (1, 3):  # float32: against transformers' generate
            result = generate_ids(model, ids[:rows], mask[:rows], max_new_tokens=NEW, stop_token_ids=[])
            assert result.tokens == _greedy(model, ids[:rows], mask[:rows])
    if arch == "bottlenecked":  # its cache rewrites cannot be static: eager, and the log says why
        assert result.path == "eager" and "rewrites past cache entries" in result.reason
        assert "rewrites past cache entries" in caplog.text
    else:
        assert result.path == "static"


def _static_greedy(model, ids, mask, max_len=CACHE_LEN_STEP):
    """Greedy tokens from plain calls of a dfloat architecture over its own StaticKVCache (the BF16 reference for
    the loop: the same cache and shapes, hence the same kernels; its masks and positions written out here)."""
    from dfloat.models.skeleton import StaticKVCache

    batch, prompt = ids.shape
    cache = StaticKVCache(model.config, batch, max_len, ids.device, next(model.parameters()).dtype)
    valid = torch.zeros(batch, max_len, dtype=torch.bool)
    valid[:, :prompt] = mask.bool()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    step = dict(use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    tokens = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=valid, position_ids=pos, **step).logits[:, -1]
        pos = pos[:, -1:]
        for i in range(NEW):
            tokens.append(logits.float().argmax(-1))
            valid[:, prompt + i] = True
            pos = pos + 1
            logits = model(
                input_ids=tokens[-1][:, None], attention_mask=valid, position_ids=pos, **step
            ).logits
            logits = logits[:, -1]
    return torch.stack(tokens, 1).tolist()


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer

    from dfloat.demo import demo_model_path

    model = dfloat.load_compressed(demo_model_path(), device="cpu")
    return model, AutoTokenizer.from_pretrained(demo_model_path())


PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "She was the youngest of the two daughters"]


def test_demo_model_matches_generate_with_its_repetition_penalty(demo):
    model, tok = demo
    penalty = model.generation_config.repetition_penalty
    assert penalty != 1.0  # the demo's config sets one: the loop must apply it as transformers does
    for prompts in (PROMPTS[:1], PROMPTS):
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        ref = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        ref_texts = tok.batch_decode(ref[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        got = dfloat.generate(model, tok, prompts, max_new_tokens=NEW, repetition_penalty=penalty)
        assert got.path == "static"
        assert got.texts == ref_texts


def test_sampling_is_reproducible_with_a_seed(demo):
    model, tok = demo

    def run(seed):
        options = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.9, top_k=50, seed=seed)
        return dfloat.generate(model, tok, PROMPTS, **options).tokens

    first = run(3)
    assert run(3) == first
    assert run(4) != first


def test_stop_token_ends_only_its_row(demo):
    model, tok = demo
    full = dfloat.generate(model, tok, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    stop = full[0][2]
    got = dfloat.generate(model, tok, PROMPTS, max_new_tokens=NEW, stop_token_ids=[stop]).tokens
    for row, want in zip(got, full):
        end = want.index(stop) + 1 if stop in want else len(want)
        assert row == want[:end]
    assert len(got[0]) <= 3


def test_streaming_delivers_the_same_text(demo):
    model, tok = demo
    pieces: dict[int, list[str]] = {}
    got = dfloat.generate(
        model,
        tok,
        PROMPTS,
        max_new_tokens=NEW,
        stream=lambda row, text: pieces.setdefault(row, []).append(text),
    )
    assert sorted(pieces) == [0, 1, 2]
    assert all(len(p) > 1 for p in pieces.values())  # piece by piece, not all at the end
    assert ["".join(pieces[r]) for r in range(3)] == got.texts


def test_weights_are_fixed_views_of_the_decode_buffer(demo):
    """A captured graph records addresses: every coded weight must stay the same view across forwards."""
    model, _ = demo
    (buffer,) = model._dfloat_buffers.values()
    start, end = buffer.tensor.data_ptr(), buffer.tensor.data_ptr() + 2 * buffer.tensor.numel()
    before = {n: p.data_ptr() for n, p in model.named_parameters() if start <= p.data_ptr() < end}
    assert before  # the coded weights live in the buffer
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))
        model(torch.tensor([[8, 9]]))
    after = {n: p.data_ptr() for n, p in model.named_parameters() if start <= p.data_ptr() < end}
    assert after == before


def test_bad_requests_are_clear_errors():
    model = _hf_model("llama")
    ids, mask = _left_padded(256)
    with pytest.raises(GenerationError, match="left-padded"):
        generate_ids(model, ids, mask.flip(1), max_new_tokens=2)
    with pytest.raises(GenerationError, match="CUDA"):
        generate_ids(model, ids, mask, max_new_tokens=2, graphs=True)
    with pytest.raises(GenerationError, match="top_p"):
        generate_ids(model, ids, mask, max_new_tokens=2, top_p=0)


@pytest.mark.parametrize(
    "option, says",
    [
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature="0.7"), "temperature='0.7'"),
        (dict(max_new_tokens=2.0), "max_new_tokens=2.0: must be an int"),
        (dict(max_new_tokens="2"), "max_new_tokens='2': must be an int"),
        (dict(max_new_tokens=True), "max_new_tokens=True"),
        (dict(top_p=float("nan")), "top_p=nan"),
        (dict(top_k=1.5), "top_k=1.5"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty=nan"),
    ],
)
def test_bad_options_are_named_before_anything_runs(option, says):
    model = _hf_model("llama")
    ids, mask = _left_padded(256)
    with pytest.raises(GenerationError, match=says):
        generate_ids(model, ids, mask, **{"max_new_tokens": 2, **option})


def test_prompt_and_new_tokens_must_fit_the_context():
    model = _hf_model("llama")
    model.config.max_position_embeddings = 12
    ids, mask = _left_padded(256)  # the longest prompt has 9 tokens
    with pytest.raises(
        GenerationError, match="9 prompt tokens \\+ max_new_tokens=4 exceed the model's 12 positions"
    ):
        generate_ids(model, ids, mask, max_new_tokens=4)
    assert generate_ids(model, ids, mask, max_new_tokens=3).new_tokens <= 9


def test_an_empty_prompt_in_a_batch_is_named(demo):
    model, tok = demo
    for prompts, says in ((["Mr. Darcy", ""], "prompt 1 is empty"), (["a", None], "prompt 1 is a NoneType")):
        with pytest.raises(GenerationError, match=says):
            dfloat.generate(model, tok, prompts, max_new_tokens=2)
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    with pytest.raises(GenerationError, match="prompt 1 is empty: it has no tokens, only padding"):
        generate_ids(model, ids, torch.tensor([[1, 1, 1], [0, 0, 0]]), max_new_tokens=2)


def test_checked_decodes_turn_graphs_off_with_a_log_line(monkeypatch, caplog):
    from dfloat.runtime.generate import _graph_choice

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("DFLOAT_CHECK", raising=False)
    assert _graph_choice(cuda, None) == (True, None) and _graph_choice(cuda, False) == (False, None)
    assert _graph_choice(cpu, None) == (False, None)
    monkeypatch.setenv("DFLOAT_CHECK", "1")
    with caplog.at_level("WARNING", logger="dfloat.runtime.generate"):
        for graphs in (None, True):
            use, why = _graph_choice(cuda, graphs)
            assert not use and "DFLOAT_CHECK=1" in why
    assert sum("without CUDA graphs" in r.message for r in caplog.records) == 2
    assert _graph_choice(cpu, None) == (False, None)  # no graphs on a CPU anyway: nothing to say
    with pytest.raises(dfloat.errors.GenerationError, match="graphs=True needs a CUDA device"):
        _graph_choice(cpu, True)
