"""The synthetic reverse-text task: prompt ``<s> s =``, target ``reversed(s) </s>``.

Tokens come from a byte-level tokenizer built in code (:func:`build_tokenizer`: 256 byte tokens
plus ``<pad>``, ``<s>``, ``</s>``, no merges, so every character is one token); it is published
beside the weights, so an inference server reads the same ids. Problems are made in code from a
seeded ``torch.Generator``; nothing is downloaded.
"""

from __future__ import annotations

import functools

import torch

ALPHABET = "abcdefgh"
SEPARATOR = "="
SPECIAL = ("<pad>", "<s>", "</s>")
PAD, BOS, EOS = 0, 1, 2


@functools.cache
def build_tokenizer():
    """A ``transformers`` fast tokenizer: byte-level BPE without merges, 259 tokens
    (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then the 256 byte tokens in byte order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()  # byte -> the printable stand-in ByteLevel uses for it
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *(table[b] for b in range(256))])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL[PAD], bos_token=SPECIAL[BOS], eos_token=SPECIAL[EOS],
        model_max_length=64, clean_up_tokenization_spaces=False,
    )


VOCAB_SIZE = len(SPECIAL) + 256
_FIRST_BYTE = len(SPECIAL)


def encode(s: str) -> list[int]:
    """Characters to token ids (one byte token each; equals ``build_tokenizer().encode(s)``)."""
    return [_FIRST_BYTE + b for b in s.encode()]


def decode(tokens: list[int]) -> str:
    """Token ids to text; stops at EOS/PAD."""
    out = bytearray()
    for t in tokens:
        if t in (EOS, PAD):
            break
        if t >= _FIRST_BYTE:
            out.append(t - _FIRST_BYTE)
    return out.decode(errors="replace")


#: The tokens the policy may emit: the alphabet and EOS (sampling and training both restrict to them).
ALLOWED_TOKENS: tuple[int, ...] = (*encode(ALPHABET), EOS)


def sample_problems(n: int, generator: torch.Generator, min_len: int = 3, max_len: int = 6) -> list[str]:
    """``n`` random strings over :data:`ALPHABET` with lengths in ``[min_len, max_len]``."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    chars = torch.randint(0, len(ALPHABET), (n, max_len), generator=generator).tolist()
    return ["".join(ALPHABET[c] for c in row[:k]) for row, k in zip(chars, lengths)]


def prompt_tokens(s: str) -> list[int]:
    """``<s> s =``."""
    return [BOS, *encode(s), *encode(SEPARATOR)]


def reward(s: str, completion: list[int]) -> float:
    """Character overlap with ``reversed(s)``, in ``[0, 1]``.

    The completion is cut at its first EOS (or PAD); reward = matching positions divided by the
    longer of the two, so both wrong characters and a wrong length cost.
    """
    target = encode(s[::-1])
    out = []
    for t in completion:
        if t in (EOS, PAD):
            break
        out.append(t)
    denom = max(len(target), len(out))
    return sum(int(a == b) for a, b in zip(out, target)) / denom if denom else 1.0
