"""NextLat (Microsoft Research, arXiv 2511.05963): next-latent prediction as an auxiliary loss and a drafter.

h(t) is the final hidden state after the last norm (the lm_head input), so a predicted latent can go straight
into lm_head. The head predicts h(t+1) from h(t) and the embedding of token t+1:

    h_hat(t+1) = h(t) + fc3(gelu(fc2(gelu(fc1(LayerNorm([h(t); embed(x_{t+1})]))))))

with fc3 zero-initialised (so an untrained head predicts "no change"). Training loss with labels:

    CE + latent_loss_weight * D(h_hat(t+1), stopgrad h(t+1)) + kl_loss_weight * KL(p(t+1) || p_hat(t+1))

D is smooth L1 (``latent_loss="smooth_l1"``, the authors' public code) or the mean squared error ("mse");
p = softmax(lm_head(h(t+1))) is a detached target; p_hat = softmax(lm_head(h_hat(t+1))).

What each loss trains is a config choice (defaults follow the authors' public code where it says):
- ``kl_trains_lm_head`` (False): the KL term reads lm_head through a detached weight, so it trains the head and
  the backbone's h(t), not lm_head.
- ``latent_trains_embeddings`` (True): the embedding of x_{t+1} fed to the head is not detached, so the latent
  loss also trains embed_tokens.
- ``latent_pairs`` ("all"): every (t, t+1) pair counts; "labels" counts only pairs whose labels[t+1] != -100.
The target h(t+1) and p(t+1) are always detached; h(t) never is (the latent loss shapes the backbone: the point).

Speculative decoding drafts with the head (h -> head -> lm_head -> argmax -> embed -> head ...), optionally of
variable length: drafting stops when the head's top probability drops below ``draft_confidence`` (our rule; the
paper's exact stopping rule is not public here). The head is off the logits path: forward() logits and generate()
are those of the plain decoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .skeleton import DecoderConfig, DecoderForCausalLM, DecoderModel, make_output, output_cache

logger = logging.getLogger(__name__)


LATENT_LOSSES = ("smooth_l1", "mse")
LATENT_PAIRS = ("all", "labels")


class NextLatConfig(DecoderConfig):
    """Args (beyond DecoderConfig); the module docstring says which default comes from where:
    latent_loss_weight: weight of the latent term (default 1.0; the paper's value is unknown here).
    latent_loss: "smooth_l1" (default, the authors' code) or "mse".
    kl_loss_weight: weight of the KL self-distillation term (default 0.0 = off).
    kl_trains_lm_head: whether the KL term sends gradient into lm_head (default False, as the authors' code).
    latent_trains_embeddings: whether the latent loss trains embed_tokens through the head input (default True).
    latent_pairs: "all" pairs count (default) or only those with labels[t+1] != -100 ("labels").
    draft_confidence: default stop threshold of variable-length drafting (0.0 = always draft the full k).
    latent_head_eps: LayerNorm eps of the head (default 1e-5, torch's default).
    """

    model_type = "nextlat"

    def __init__(
        self,
        latent_loss_weight: float = 1.0,
        latent_loss: str = "smooth_l1",
        kl_loss_weight: float = 0.0,
        kl_trains_lm_head: bool = False,
        latent_trains_embeddings: bool = True,
        latent_pairs: str = "all",
        draft_confidence: float = 0.0,
        latent_head_eps: float = 1e-5,
        **kwargs,
    ):
        if latent_loss not in LATENT_LOSSES:
            raise ValueError(f"latent_loss={latent_loss!r}: expected one of {LATENT_LOSSES}")
        if latent_pairs not in LATENT_PAIRS:
            raise ValueError(f"latent_pairs={latent_pairs!r}: expected one of {LATENT_PAIRS}")
        if not 0.0 <= draft_confidence <= 1.0:
            raise ValueError(f"draft_confidence={draft_confidence}: expected a probability in [0, 1]")
        self.latent_loss_weight = latent_loss_weight
        self.latent_loss = latent_loss
        self.kl_loss_weight = kl_loss_weight
        self.kl_trains_lm_head = kl_trains_lm_head
        self.latent_trains_embeddings = latent_trains_embeddings
        self.latent_pairs = latent_pairs
        self.draft_confidence = draft_confidence
        self.latent_head_eps = latent_head_eps
        super().__init__(**kwargs)


class LatentHead(nn.Module):
    """LayerNorm(2d) -> Linear(2d,d) -> GELU -> Linear(d,d) -> GELU -> Linear(d,d), residual from h(t)."""

    def __init__(self, config: NextLatConfig):
        super().__init__()
        d = config.hidden_size
        self.norm = nn.LayerNorm(2 * d, eps=config.latent_head_eps)
        self.fc1 = nn.Linear(2 * d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, d)
        self.fc3._zero_init = True  # read by DecoderPreTrainedModel._init_weights

    def forward(self, h: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.cat([h, next_embed], dim=-1))
        x = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))
        return h + x


@dataclass
class NextLatOutput(CausalLMOutputWithPast):
    """CausalLMOutput plus the loss parts (None without labels)."""

    lm_loss: torch.Tensor | None = None
    latent_loss: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None


@dataclass
class SpeculativeStats:
    """Counts from one generate_speculative call; acceptance_rate = accepted / drafted."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens after the first per verifying forward (the first comes from the prefill); greedy gets 1.0."""
        return (self.new_tokens - 1) / self.verify_steps if self.verify_steps else 0.0


class NextLatModel(DecoderModel):
    config_class = NextLatConfig


class NextLatForCausalLM(DecoderForCausalLM):
    config_class = NextLatConfig
    base_model_class = NextLatModel

    def build_extra_modules(self, config: NextLatConfig) -> None:
        self.latent_head = LatentHead(config)
        self.last_speculative_stats: SpeculativeStats | None = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: DynamicCache | None = None,
        **kwargs,
    ) -> NextLatOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        cache_out = output_cache(out)
        base = self._lm_output(out.last_hidden_state, cache_out, out.hidden_states, labels, logits_to_keep)
        parts = {"logits": base.logits, "hidden_states": base.hidden_states}
        if labels is None:
            return make_output(NextLatOutput, cache_out, **parts)
        if input_ids is None:
            raise ValueError("NextLat's latent loss needs input_ids (the head embeds token t+1)")
        latent_loss, kl_loss = self.latent_losses(out.last_hidden_state, input_ids, labels)
        loss = base.loss + self.config.latent_loss_weight * latent_loss
        if kl_loss is not None:
            loss = loss + self.config.kl_loss_weight * kl_loss
        return make_output(
            NextLatOutput,
            cache_out,
            loss=loss,
            lm_loss=base.loss,
            latent_loss=latent_loss,
            kl_loss=kl_loss,
            **parts,
        )

    def latent_losses(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D(h_hat(t+1), stopgrad h(t+1)) and, if weighted, KL(p(t+1) || p_hat(t+1)), averaged over counted pairs."""
        cfg = self.config
        h_t, h_next = hidden[:, :-1], hidden[:, 1:].detach()
        next_embed = self.model.embed_tokens(input_ids[:, 1:])
        if not cfg.latent_trains_embeddings:
            next_embed = next_embed.detach()
        h_hat = self.latent_head(h_t, next_embed)
        if cfg.latent_pairs == "labels":
            keep = (labels[:, 1:] != -100).to(h_hat.device, torch.float32)
        else:
            keep = torch.ones(h_hat.shape[:2], device=h_hat.device)
        n = keep.sum().clamp(min=1)
        if cfg.latent_loss == "mse":
            per_pair = F.mse_loss(h_hat.float(), h_next.float(), reduction="none").mean(-1)
        else:
            per_pair = F.smooth_l1_loss(h_hat.float(), h_next.float(), reduction="none").mean(-1)
        latent_loss = (per_pair * keep).sum() / n
        kl_loss = None
        if cfg.kl_loss_weight:
            weight = self.lm_head.weight if cfg.kl_trains_lm_head else self.lm_head.weight.detach()
            with torch.no_grad():
                target = F.log_softmax(self.lm_head(h_next).float(), dim=-1)
            pred = F.log_softmax(F.linear(h_hat, weight).float(), dim=-1)
            kl = F.kl_div(pred, target, log_target=True, reduction="none").sum(
                -1
            )  # sum p (log p - log p_hat)
            kl_loss = (kl * keep).sum() / n
        return latent_loss, kl_loss

    @torch.no_grad()
    def draft(
        self, h_last: torch.Tensor, token: torch.Tensor, draft_tokens: int, min_confidence: float = 0.0
    ) -> torch.Tensor:
        """Greedy draft of up to ``draft_tokens`` tokens after ``token``: latent -> lm_head -> argmax -> embed.

        ``h_last`` (1, d) is the latent of the position before ``token`` (1,). Drafting stops before a token whose
        softmax probability under the head's latent is below ``min_confidence``. Returns (1, <= k).
        """
        drafts = [token.new_empty(token.shape[0], 0)]
        z, tok = h_last, token
        for _ in range(draft_tokens):
            z = self.latent_head(z, self.model.embed_tokens(tok))
            logits = self.lm_head(z).float()
            tok = logits.argmax(-1)
            if min_confidence > 0.0 and float(torch.softmax(logits, -1).max()) < min_confidence:
                break
            drafts.append(tok[:, None])
        return torch.cat(drafts, dim=1)

    @staticmethod
    def _next_draft_inputs(hidden: torch.Tensor, block: torch.Tensor, greedy: torch.Tensor, accepted: int):
        """After verifying ``block`` = [cur, d1..dk] with ``accepted`` drafts accepted: the latent h(t) of the last
        accepted position (block index ``accepted``) and x_{t+1}, the token the model predicts after it."""
        return hidden[:, accepted], greedy[accepted : accepted + 1]

    @torch.no_grad()
    def generate_speculative(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        draft_tokens: int = 4,
        eos_token_id: int | list[int] | None = None,
        return_stats: bool = False,
        draft_confidence: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats]:
        """Greedy self-speculative decoding: the head drafts, one forward of the model verifies.

        Each step feeds [current token, d1..dk] through the model, accepts the longest prefix of drafts that
        matches the model's own argmax, and takes the model's token after it, so the result is greedy decoding's.
        It equals ``generate(do_sample=False)`` token for token up to floating-point near-ties (a k+1-token
        forward may round logits differently from k+1 one-token forwards). Batch size 1 only.

        Args:
            input_ids: (1, prompt_len) prompt.
            max_new_tokens: at most this many new tokens.
            draft_tokens: k, the most tokens drafted per verification step.
            eos_token_id: stop after emitting one of these; defaults to the generation config's.
            return_stats: also return the SpeculativeStats (also kept in ``self.last_speculative_stats``).
            draft_confidence: stop a draft early when the head's top probability falls below this (variable-length
                drafting); defaults to ``config.draft_confidence``.

        Returns:
            (1, prompt_len + n) token ids, n <= max_new_tokens, [and the stats].
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_speculative supports batch size 1, got {input_ids.shape[0]}")
        if draft_tokens < 1 or max_new_tokens < 1:
            raise ValueError("draft_tokens and max_new_tokens must be >= 1")
        if eos_token_id is None and self.generation_config is not None:
            eos_token_id = self.generation_config.eos_token_id
        if draft_confidence is None:
            draft_confidence = self.config.draft_confidence
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        stats = SpeculativeStats()
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        h_last = out.last_hidden_state[:, -1]
        cur = self.lm_head(h_last).argmax(-1)
        new = [int(cur)]
        while len(new) < max_new_tokens and new[-1] not in eos:
            k = min(draft_tokens, max_new_tokens - len(new) - 1)  # no drafts past the last needed token
            drafts = self.draft(h_last, cur, k, draft_confidence)
            k = drafts.shape[1]
            block = torch.cat([cur[:, None], drafts], dim=1)
            past = cache.get_seq_length()
            out = self.model(input_ids=block, cache=cache, use_cache=True)
            greedy = self.lm_head(out.last_hidden_state).argmax(-1)[0]
            match = (greedy[:-1] == drafts[0]).to(torch.int64)
            m = int(match.cumprod(0).sum())
            stats.drafted += k
            stats.accepted += m
            stats.verify_steps += 1
            if m < k:
                cache.crop(-(k - m))
            if cache.get_seq_length() != past + m + 1:
                raise RuntimeError("cache length after verification does not match the accepted tokens")
            emitted = [int(t) for t in greedy[: m + 1]]
            for t in emitted:
                new.append(t)
                if t in eos or len(new) >= max_new_tokens:
                    break
            h_last, cur = self._next_draft_inputs(out.last_hidden_state, block, greedy, m)
        new = new[:max_new_tokens]
        stats.new_tokens = len(new)
        self.last_speculative_stats = stats
        logger.info(
            "speculative decoding: %d tokens in %d verify steps, %d/%d drafts accepted (%.1f%%)",
            stats.new_tokens,
            stats.verify_steps,
            stats.accepted,
            stats.drafted,
            100.0 * stats.acceptance_rate,
        )
        seq = torch.cat(
            [input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], dim=1
        )
        return (seq, stats) if return_stats else seq
