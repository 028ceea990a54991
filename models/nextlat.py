"""NextLat (Microsoft Research, Nov 2025): next-latent prediction as an auxiliary loss and a speculative drafter.

h(t) is the final hidden state after the last norm (the lm_head input), so a predicted latent can go straight
into lm_head. The head predicts h(t+1) from h(t) and the embedding of token t+1:

    h_hat(t+1) = h(t) + fc3(gelu(fc2(gelu(fc1(LayerNorm([h(t); embed(x_{t+1})]))))))

with fc3 zero-initialised (so an untrained head predicts "no change"). Training loss with labels:

    CE + latent_loss_weight * MSE(h_hat(t+1), stopgrad(h(t+1))) + kl_loss_weight * KL(p(t+1) || p_hat(t+1))

where p = softmax(lm_head(h)) is detached and p_hat = softmax(lm_head(h_hat)). The KL self-distillation term's
exact form is not public: this is our reading, off by default (weight 0). Pairs count where labels[t+1] != -100.

The head is off the logits path: forward() logits and generate() are those of the plain decoder.
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


class NextLatConfig(DecoderConfig):
    """Args (beyond DecoderConfig):
    latent_loss_weight: weight of the latent MSE in the training loss (default 1.0; the paper's value is unknown).
    kl_loss_weight: weight of the KL self-distillation term (default 0.0 = off).
    latent_head_eps: LayerNorm eps of the head (default 1e-5, torch's default).
    """

    model_type = "nextlat"

    def __init__(
        self,
        latent_loss_weight: float = 1.0,
        kl_loss_weight: float = 0.0,
        latent_head_eps: float = 1e-5,
        **kwargs,
    ):
        self.latent_loss_weight = latent_loss_weight
        self.kl_loss_weight = kl_loss_weight
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
        """MSE(h_hat(t+1), stopgrad h(t+1)) and, if weighted, the KL term; averaged over counted pairs."""
        h_t, h_next = hidden[:, :-1], hidden[:, 1:].detach()
        h_hat = self.latent_head(h_t, self.model.embed_tokens(input_ids[:, 1:]))
        keep = (labels[:, 1:] != -100).to(h_hat.device)
        n = keep.sum().clamp(min=1)
        sq = (h_hat.float() - h_next.float()).pow(2).mean(-1)
        latent_loss = (sq * keep).sum() / n
        kl_loss = None
        if self.config.kl_loss_weight:
            with torch.no_grad():
                target = F.log_softmax(self.lm_head(h_next).float(), dim=-1)
            pred = F.log_softmax(self.lm_head(h_hat).float(), dim=-1)
            kl = F.kl_div(pred, target, log_target=True, reduction="none").sum(-1)
            kl_loss = (kl * keep).sum() / n
        return latent_loss, kl_loss

    @torch.no_grad()
    def draft(self, h_last: torch.Tensor, token: torch.Tensor, draft_tokens: int) -> torch.Tensor:
        """Greedy draft of ``draft_tokens`` tokens after ``token``: latent -> lm_head -> argmax -> embed -> latent.

        ``h_last`` (batch, d) is the latent of the position before ``token`` (batch,). Returns (batch, k).
        """
        drafts = [token.new_empty(token.shape[0], 0)]
        z, tok = h_last, token
        for _ in range(draft_tokens):
            z = self.latent_head(z, self.model.embed_tokens(tok))
            tok = self.lm_head(z).argmax(-1)
            drafts.append(tok[:, None])
        return torch.cat(drafts, dim=1)

    @torch.no_grad()
    def generate_speculative(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        draft_tokens: int = 4,
        eos_token_id: int | list[int] | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats]:
        """Greedy self-speculative decoding: the head drafts, one forward of the model verifies.

        Each step feeds [current token, d1..dk] through the model, accepts the longest prefix of drafts that
        matches the model's own argmax, and takes the model's token after it, so the result is greedy decoding's.
        It equals ``generate(do_sample=False)`` token for token up to floating-point near-ties (a k+1-token
        forward may round logits differently from k+1 one-token forwards). Batch size 1 only.

        Args:
            input_ids: (1, prompt_len) prompt.
            max_new_tokens: at most this many new tokens.
            draft_tokens: k, tokens drafted per verification step.
            eos_token_id: stop after emitting one of these; defaults to the generation config's.
            return_stats: also return the SpeculativeStats (also kept in ``self.last_speculative_stats``).

        Returns:
            (1, prompt_len + n) token ids, n <= max_new_tokens, [and the stats].
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_speculative supports batch size 1, got {input_ids.shape[0]}")
        if draft_tokens < 1 or max_new_tokens < 1:
            raise ValueError("draft_tokens and max_new_tokens must be >= 1")
        if eos_token_id is None and self.generation_config is not None:
            eos_token_id = self.generation_config.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        stats = SpeculativeStats()
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        h_last = out.last_hidden_state[:, -1]
        cur = self.lm_head(h_last).argmax(-1)
        new = [int(cur)]
        while len(new) < max_new_tokens and new[-1] not in eos:
            k = min(draft_tokens, max_new_tokens - len(new) - 1)  # no drafts past the last needed token
            drafts = self.draft(h_last, cur, k)
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
            h_last = out.last_hidden_state[:, m]
            cur = greedy[m : m + 1]
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
