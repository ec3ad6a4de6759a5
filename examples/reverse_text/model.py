"""A tiny decoder-only transformer in plain torch, and batched sampling (no KV cache).

Sequences are *left*-padded prompts followed by the completion; ``attn_mask`` marks real tokens
(1) and padding (0). Positions count real tokens only, so a prompt gets the same positions
whatever its padding. The output distribution never puts mass on PAD/BOS/SEP (they are inputs
only); :func:`policy_logits` applies that mask, and sampling and training both go through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from examples.reverse_text.task import BOS, EOS, PAD, SEP, VOCAB_SIZE


class ModelConfig(BaseModel):
    """Model shape (``--model.*``); trainer and orchestrator must agree."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    d_model: int = Field(64, ge=8)
    """Width of the residual stream."""

    n_layers: int = Field(2, ge=1)
    """Number of transformer blocks."""

    n_heads: int = Field(4, ge=1)
    """Attention heads per block (must divide d_model)."""

    max_seq_len: int = Field(16, ge=4)
    """Longest sequence (prompt + completion) the position table covers (tokens)."""

    vocab_size: int = Field(VOCAB_SIZE, ge=1)
    """Vocabulary size (the task's alphabet + BOS/SEP/EOS/PAD)."""


class Block(nn.Module):
    """Pre-LayerNorm block: causal self-attention then an MLP, both residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, final LayerNorm, LM head.

    Args:
        cfg: model shape.
        seed: initialisation seed; the same seed gives bitwise the same weights (a local
            ``torch.Generator`` is used, the global RNG is not touched).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"n_heads ({cfg.n_heads}) must divide d_model ({cfg.d_model})")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]``; ``attn_mask [B, T]`` is 1 for real tokens."""
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        real = attn_mask.bool()
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        # query i sees key j iff j <= i and j is real; always itself (pad rows stay finite).
        mask = (causal & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=tokens.device)
        mask = mask[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def policy_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits of the sampling policy: PAD/BOS/SEP are never emitted, then temperature."""
    logits = logits.clone()
    logits[..., [PAD, BOS, SEP]] = float("-inf")
    return logits / temperature


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists with PAD: ``(tokens [B, T], attn_mask [B, T])``."""
    t = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = 1
    return tokens, mask


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos: int | None = None,
) -> dict[str, torch.Tensor]:
    """Sample completions for ``prompts`` (token lists), stopping a row at ``eos``.

    Returns ``prompt [B, P]`` / ``prompt_mask`` (left-padded), ``completion [B, C]`` (PAD after
    the end, EOS included when emitted), ``completion_mask [B, C]`` and ``logprobs [B, C]``
    (per-token log-probabilities under the sampling distribution, 0 where masked).
    """
    eos = EOS if eos is None else eos
    prompt, prompt_mask = left_pad(prompts)
    b = prompt.shape[0]
    tokens, mask = prompt, prompt_mask
    done = torch.zeros(b, dtype=torch.bool)
    out_tok, out_mask, out_lp = [], [], []
    for _ in range(max_new_tokens):
        logits = policy_logits(model(tokens, mask)[:, -1].float(), temperature)
        logp = torch.log_softmax(logits, dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        live = ~done
        nxt = torch.where(live, nxt, torch.full_like(nxt, PAD))
        out_tok.append(nxt)
        out_mask.append(live.long())
        out_lp.append(torch.where(live, logp.gather(-1, nxt[:, None]).squeeze(-1), torch.zeros(b)))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        done = done | (nxt == eos)
        if bool(done.all()):
            break
    return {
        "prompt": prompt,
        "prompt_mask": prompt_mask,
        "completion": torch.stack(out_tok, 1),
        "completion_mask": torch.stack(out_mask, 1),
        "logprobs": torch.stack(out_lp, 1),
    }


def completion_logprobs(
    model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
    completion_mask: torch.Tensor, temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probabilities ``[B, C]`` of ``completion`` under ``model`` (with grad), 0
    where ``completion_mask`` is 0. Same policy as :func:`generate`."""
    p = prompt.shape[1]
    c = completion.shape[1]
    tokens = torch.cat([prompt, completion], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(tokens, mask)[:, p - 1 : p + c - 1].float()
    logp = torch.log_softmax(policy_logits(logits, temperature), dim=-1)
    safe = torch.where(completion_mask.bool(), completion, torch.full_like(completion, EOS))
    lp = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(completion_mask.bool(), lp, torch.zeros_like(lp))
