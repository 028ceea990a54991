"""Fast generation: a static KV cache, and the one-token decode step captured in a CUDA graph per batch bucket.

Why: eager transformers ``generate`` is bound by Python and kernel-launch overhead at the sizes people run (on an
H100 the GPU is busy ~1.8 ms of each 8 ms token). Replaying one captured step, the dfloat decode kernels
included, removes that overhead. A plain BF16 model goes through the same loop, so speed comparisons are fair, and
the loop runs without capture on the CPU, where tests prove its tokens equal transformers' ``generate``.

How one call runs:
- prompts are left-padded to one length S; the batch is padded to a bucket size (graphs only) with copies of a row;
- prefill runs eagerly over the prompts and fills slots 0..S-1 of a static cache of ``max_cache_len`` slots;
- every later token is one step over fixed input tensors (token, position, the mask of filled slots): a graph
  replay on CUDA, a plain call elsewhere; choosing the next token (argmax, or temperature / top-p sampling with a
  seeded generator) happens outside the graph;
- the host looks at the tokens every step when streaming, else every few steps, to stop when all rows are done.

Caches: transformers models use ``transformers.StaticCache`` (its slot counter lives on the device, so a replay
advances it) with a 4-D additive mask; dfloat's research architectures use their own ``StaticKVCache``. Models
whose cache cannot be static (the Bottlenecked Transformer rewrites past entries; sliding-window layers) run the
same loop eagerly over transformers' ``DynamicCache``, and a log line says why.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dfloat.errors import GenerationError

log = logging.getLogger(__name__)

SYNC_EVERY = 8  # steps between host checks for finished rows when nothing is streamed
CACHE_LEN_STEP = 256  # static caches are sized in multiples of this, so graphs are reused across calls


@dataclass
class GenerationResult:
    """What one call produced: new tokens per prompt (a stop token ends its row and is included) and timings."""

    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    # "graph": captured steps; "static": static cache, no capture; "eager": transformers' DynamicCache
    path: str = "eager"
    reason: str | None = None  # why the graph path was not taken
    prefill_s: float = 0.0  # prompt in, first new token on the host
    decode_s: float = 0.0  # the remaining tokens
    capture_s: float = 0.0  # building the graph (first call per bucket only)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _bucket(batch: int, buckets: Sequence[int] | None) -> int:
    if buckets:
        fitting = [b for b in sorted(buckets) if b >= batch]
        if fitting:
            return fitting[0]
    return 1 << (batch - 1).bit_length()


def _cache_kwarg(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``, 5.17 ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode_buffers(model) -> dict:
    return getattr(model, "_dfloat_buffers", None) or {}


def _graph_choice(device: torch.device, graphs: bool | None) -> tuple[bool, str | None]:
    """(capture the decode step?, why not when it is not captured on a CUDA device).

    ``DFLOAT_CHECK=1`` checks every decode on the host (a status word read back), which a graph cannot capture:
    the steps then run uncaptured over the same static cache, and a log line says so.
    """
    if graphs and device.type != "cuda":
        raise GenerationError(f"graphs=True needs a CUDA device; the inputs are on {device}")
    use = device.type == "cuda" if graphs is None else graphs
    if use and os.environ.get("DFLOAT_CHECK") == "1":
        why = "DFLOAT_CHECK=1 checks every decode on the host, which a CUDA graph cannot capture"
        log.warning("decode steps run without CUDA graphs: %s", why)
        return False, why
    return use, None


def _static_kind(model) -> tuple[str | None, str | None]:
    """("skeleton" | "hf" | None, reason when None): which static cache fits this model."""
    reason = getattr(model, "static_cache_unsupported", None)
    if reason:
        return None, f"{type(model).__name__}: {reason}"
    try:
        from dfloat.models.skeleton import DecoderForCausalLM
    except ImportError:  # pragma: no cover - transformers missing entirely
        DecoderForCausalLM = ()
    if isinstance(model, DecoderForCausalLM):
        return "skeleton", None
    return "hf", None


class _Session:
    """A static cache and the fixed tensors of one decode step, for one (batch, cache length); maybe a graph."""

    def __init__(self, model, kind: str, batch: int, max_len: int, device: torch.device):
        self.model, self.kind, self.batch, self.max_len, self.device = model, kind, batch, max_len, device
        self.cache_kw = _cache_kwarg(model)
        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        if kind == "skeleton":
            from dfloat.models.skeleton import StaticKVCache

            self.cache = StaticKVCache(model.config, batch, max_len, device, dtype)
        else:
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
            sliding = [i for i, layer in enumerate(self.cache.layers) if getattr(layer, "is_sliding", False)]
            if sliding:
                raise _NoStatic(
                    f"layers {sliding[:4]} use sliding-window attention, which this loop does not mask"
                )
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slots holding real tokens
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # slot of the token being fed
        self.graph = None
        self.logits = None
        self.buffers_after: dict = {}

    def _mask(self, queries: int):
        """What the model takes as attention mask over the whole cache."""
        if self.kind == "skeleton":
            return self.valid  # the skeleton adds causality from its own slot counter
        allowed = self.valid[:, None, None, :]
        if queries > 1:  # prefill from slot 0: causal over the prompt
            k = torch.arange(self.max_len, device=self.device)
            allowed = allowed & (k[None, :] <= torch.arange(queries, device=self.device)[:, None])[None, None]
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=self._mask(ids.shape[1]),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: self.cache},
        )
        return out.logits[:, -1]

    def step(self) -> torch.Tensor:
        """One token for every row: the body a graph captures (no host work, fixed addresses)."""
        self.valid.index_fill_(1, self.slot, True)
        logits = self.forward(self.ids, self.pos)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits

    def reset(self) -> None:
        self.cache.reset()
        self.valid.zero_()
        self.slot.zero_()
        self.pos.zero_()

    def capture(self) -> None:
        """Warm up on a side stream, then record one step; every dfloat unit is decoded inside the graph."""
        self.reset()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        buffers = _decode_buffers(self.model)
        for buf in buffers.values():
            buf.current = None  # or the graph would skip decoding the unit the buffer happens to hold now
        self.reset()
        # a graph of its own memory pool: its temporaries never overlap another graph's output
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step()
        self.buffers_after = {dev: buf.current for dev, buf in buffers.items()}
        self.graph = graph
        self.reset()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        for dev, buf in _decode_buffers(self.model).items():  # what the buffers hold after the graph ran
            buf.current = self.buffers_after.get(dev)
        return self.logits


class _NoStatic(Exception):
    """This model's cache cannot be made static; the message says why."""


class _Dynamic:
    """The same interface over transformers' DynamicCache, for models whose cache cannot be static."""

    def __init__(self, model, batch: int, max_len: int, device: torch.device):
        from transformers import DynamicCache

        self.model, self.batch, self.device = model, batch, device
        self.cache_kw = _cache_kwarg(model)
        try:
            self.cache = DynamicCache(config=model.config)
        except TypeError:  # pragma: no cover - a transformers without the config argument
            self.cache = DynamicCache()
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.filled = 0

    def forward(self, ids, pos):
        self.filled += ids.shape[1]
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=self.valid[:, : self.filled].long(),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: self.cache},
        )
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or self.cache
        return out.logits[:, -1]

    def step(self):
        self.valid.index_fill_(1, self.slot, True)
        logits = self.forward(self.ids, self.pos)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits

    def reset(self) -> None:
        self.valid.zero_()
        self.slot.zero_()


def _sessions(model) -> dict:
    if not hasattr(model, "_dfloat_generation"):
        model._dfloat_generation = {}
    return model._dfloat_generation


def release_graphs(model) -> None:
    """Drop the static caches and CUDA graphs kept on ``model`` by earlier calls (they are reused otherwise)."""
    if hasattr(model, "_dfloat_generation"):
        del model._dfloat_generation


def pick_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token per row, with transformers' order of processing: repetition penalty over the tokens in
    ``seen`` (rows, vocab), then greedy when ``temperature`` is 0, else temperature, top-k, top-p and sampling."""
    scores = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        scores = torch.where(
            seen, torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty), scores
        )
    if temperature <= 0:
        return scores.argmax(-1)
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the most likely token is always kept
        ordered = ordered.masked_fill(outside, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def _stop_ids(model, stop_token_ids) -> list[int]:
    if stop_token_ids is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [int(t) for t in stop_token_ids]


def _check_options(
    model, max_new_tokens, temperature, top_p, top_k, repetition_penalty, input_ids, attention_mask
):
    """Every argument checked before anything runs: a bad one is a GenerationError naming it."""

    def integer(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if not integer(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: must be an int of at least 1")
    if not real(temperature) or temperature < 0:
        raise GenerationError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if not real(top_p) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p!r}: must be in (0, 1]")
    if not integer(top_k) or top_k < 0:
        raise GenerationError(f"top_k={top_k!r}: must be an int >= 0 (0 = no top-k cut)")
    if not real(repetition_penalty) or repetition_penalty <= 0:
        raise GenerationError(
            f"repetition_penalty={repetition_penalty!r}: must be a finite number > 0 (1.0 = none)"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GenerationError(
            f"input_ids has shape {list(input_ids.shape)}: expected (batch, prompt length > 0)"
        )
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(
            f"attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}"
        )
    lengths = attention_mask.bool().sum(-1)
    if not bool(lengths.all()):
        row = int((lengths == 0).nonzero()[0])
        raise GenerationError(f"prompt {row} is empty: it has no tokens, only padding")
    if not bool(attention_mask[:, -1].all()):
        raise GenerationError(
            "prompts must be left-padded: the attention mask has padding in its last column"
        )
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = int(lengths.max())
    if isinstance(context, int) and longest + max_new_tokens > context:
        raise GenerationError(
            f"{longest} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's {context} positions "
            "(max_position_embeddings); ask for fewer tokens or shorten the prompt"
        )


def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    graphs: bool | None = None,
    max_cache_len: int | None = None,
    batch_buckets: Sequence[int] | None = None,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
) -> GenerationResult:
    """Token-level generation over a static cache, with the decode step replayed from a CUDA graph on GPUs.

    Args:
        model: a transformers causal LM (from ``load_compressed`` or plain BF16) or a ``dfloat.models`` one.
        input_ids: (batch, length) prompts, left-padded; ``attention_mask`` marks the real tokens.
        max_new_tokens: tokens to generate per row (fewer when a row hits a stop token).
        temperature, top_p, top_k, seed: 0 is greedy; else sampling, reproducible for a given seed and device.
        repetition_penalty: transformers' penalty on tokens already in the prompt or output (1.0 = none).
        stop_token_ids: tokens that end a row (default: the model's eos tokens); the stop token is kept.
        graphs: capture the decode step in a CUDA graph (default: on CUDA devices); False runs it as plain calls.
        max_cache_len: static cache slots (default: prompt + new tokens, rounded up to a multiple of 256).
        batch_buckets: batch sizes graphs are built for (default: powers of two); a batch is padded up to one.
        on_tokens: called every step with the new tokens of each row (an empty list once a row has stopped).
    Returns:
        GenerationResult with the new tokens per row, the path taken and timings.
    Raises:
        GenerationError: bad options (wrong types, NaN, out of range), an empty or right-padded prompt, prompt +
            new tokens beyond the model's ``max_position_embeddings``, or graphs asked for on a non-CUDA device.
    """
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    _check_options(
        model, max_new_tokens, temperature, top_p, top_k, repetition_penalty, input_ids, attention_mask
    )
    use_graphs, no_graph_reason = _graph_choice(device, graphs)
    batch, prompt_len = input_ids.shape
    need = prompt_len + max_new_tokens
    max_len = max_cache_len or CACHE_LEN_STEP * math.ceil(need / CACHE_LEN_STEP)
    if max_len < need:
        raise GenerationError(f"max_cache_len={max_len} is less than prompt ({prompt_len}) + new tokens")

    kind, reason = _static_kind(model)
    reason = reason or no_graph_reason
    if kind is not None and use_graphs and len(_decode_buffers(model)) > 1:
        use_graphs, reason = False, "weights are decoded on several devices; graphs capture one device"
    rows = _bucket(batch, batch_buckets) if (use_graphs or batch_buckets) and kind else batch
    session = None
    capture_s = 0.0
    if kind is not None:
        key = (kind, rows, max_len, str(device), getattr(model, "dtype", None))  # model.float(): new caches
        session = _sessions(model).get(key)
        if session is None:
            try:
                session = _Session(model, kind, rows, max_len, device)
            except _NoStatic as e:
                kind, reason, rows = None, f"{type(model).__name__}: {e}", batch
            else:
                _sessions(model)[key] = session
    if session is not None and use_graphs and session.graph is None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            session.capture()
        capture_s = time.perf_counter() - t0
        log.info("captured the decode step for batch %d, cache %d slots (%.2f s)", rows, max_len, capture_s)
    if session is None:
        if use_graphs or graphs is None:
            log.info("generation without a static cache or graphs: %s", reason)
        session = _Dynamic(model, batch, max_len, device)
    if kind is None:
        path = "eager"
    else:  # a session captured by an earlier call is replayed only when graphs are wanted now
        path = "graph" if use_graphs and session.graph is not None else "static"

    if rows > batch:  # pad the batch with copies of the last row; their tokens are dropped
        extra = rows - batch
        input_ids = torch.cat([input_ids, input_ids[-1:].expand(extra, -1)])
        attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)])
    stop = torch.tensor(_stop_ids(model, stop_token_ids), dtype=torch.long, device=device)
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    tokens: list[list[int]] = [[] for _ in range(batch)]
    with torch.inference_mode():
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        session.reset()
        real = attention_mask.bool()
        session.valid[:, :prompt_len] = real
        positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
        logits = session.forward(input_ids, positions)
        session.pos.copy_(positions[:, -1:] + 1)
        session.slot.fill_(prompt_len)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(rows, logits.shape[-1], dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids, True)  # the whole prompt, padding included, as transformers does

        def choose(lg: torch.Tensor) -> torch.Tensor:
            return pick_next(lg, temperature, top_p, generator, top_k, repetition_penalty, seen)

        token = choose(logits)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
        reported = 0
        every = 1 if on_tokens is not None else SYNC_EVERY
        t_first = None
        stop_list = stop.tolist()
        for t in range(max_new_tokens):
            out[:, t] = token
            done |= torch.isin(token, stop)
            last = t + 1 == max_new_tokens
            if last or t == 0 or (t + 1) % every == 0:  # tokens to the host: report, check for the end
                fresh: list[list[int]] = [[] for _ in range(batch)]
                for r, row in enumerate(out[:batch, reported : t + 1].tolist()):
                    for tok in row:
                        if not tokens[r] or tokens[r][-1] not in stop_list:
                            tokens[r].append(tok)
                            fresh[r].append(tok)
                reported = t + 1
                if t_first is None:
                    t_first = time.perf_counter()
                if on_tokens is not None:
                    on_tokens(fresh)
                if last or bool(done[:batch].all()):
                    break
            session.ids.copy_(token[:, None])
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            logits = session.replay() if path == "graph" else session.step()
            token = choose(logits)
        sync()
        t_end = time.perf_counter()
    return GenerationResult(
        tokens=tokens,
        path=path,
        reason=reason if path != "graph" else None,
        prefill_s=(t_first or t_end) - t0,
        decode_s=t_end - (t_first or t_end),
        capture_s=capture_s,
    )


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    stream: Callable[[int, str], None] | None = None,
    graphs: bool | None = None,
    **kw,
) -> GenerationResult:
    """Complete text prompts with a static KV cache and, on CUDA, CUDA-graph decode steps.

    Works for a model from ``dfloat.load_compressed`` and for a plain BF16 transformers model alike.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        prompts: one string or a list (a batch, left-padded here).
        max_new_tokens, temperature, top_p, seed, stop_token_ids, graphs: as in ``generate_ids``.
        stream: called as text arrives, with (prompt index, new text).
        **kw: passed to ``generate_ids`` (``top_k``, ``repetition_penalty``, ``max_cache_len``, ``batch_buckets``).
    Returns:
        GenerationResult; ``texts`` holds each completion (without the prompt).
    Example:
        >>> model = dfloat.load_compressed("./llama-dfloat", device="cuda")
        >>> tok = transformers.AutoTokenizer.from_pretrained("./llama-dfloat")
        >>> dfloat.generate(model, tok, ["The capital of France is"], max_new_tokens=20).texts
    """
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise GenerationError("no prompts given")
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise GenerationError(f"prompt {i} is a {type(text).__name__}, not text")
        if not text.strip():
            raise GenerationError(f"prompt {i} is empty; give some text to continue")
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    try:
        tokenizer.padding_side = "left"
        if pad is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(batch, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad
    device = getattr(model, "device", None) or next(model.parameters()).device
    on_tokens = _text_streamer(tokenizer, len(batch), stream) if stream is not None else None
    result = generate_ids(
        model,
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_token_ids=stop_token_ids,
        graphs=graphs,
        on_tokens=on_tokens,
        **kw,
    )
    result.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    return result


def _text_streamer(tokenizer, rows: int, stream: Callable[[int, str], None]):
    """Turns new tokens into new text per row, holding back an incomplete UTF-8 character."""
    seen: list[list[int]] = [[] for _ in range(rows)]
    sent = [0] * rows

    def on_tokens(fresh: list[list[int]]) -> None:
        for r, toks in enumerate(fresh):
            if not toks:
                continue
            seen[r] += toks
            text = tokenizer.decode(seen[r], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > sent[r]:
                stream(r, text[sent[r] :])
                sent[r] = len(text)

    return on_tokens
