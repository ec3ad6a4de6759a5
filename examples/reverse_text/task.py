"""The synthetic reverse-text task: prompt ``BOS s SEP``, target ``reversed(s) EOS``.

Everything is made in code from a seeded ``torch.Generator``; nothing is downloaded.
"""

from __future__ import annotations

import torch

ALPHABET = "abcdefgh"
PAD, BOS, SEP, EOS = 0, 1, 2, 3
SPECIAL = ("<pad>", "<bos>", "<sep>", "<eos>")
FIRST_CHAR = len(SPECIAL)
VOCAB_SIZE = FIRST_CHAR + len(ALPHABET)


def encode(s: str) -> list[int]:
    """Characters to token ids."""
    return [FIRST_CHAR + ALPHABET.index(c) for c in s]


def decode(tokens: list[int]) -> str:
    """Token ids to text; stops at EOS/PAD, shows other specials as ``<name>``."""
    out = []
    for t in tokens:
        if t in (EOS, PAD):
            break
        out.append(ALPHABET[t - FIRST_CHAR] if t >= FIRST_CHAR else SPECIAL[t])
    return "".join(out)


def sample_problems(n: int, generator: torch.Generator, min_len: int = 3, max_len: int = 6) -> list[str]:
    """``n`` random strings over :data:`ALPHABET` with lengths in ``[min_len, max_len]``."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    chars = torch.randint(0, len(ALPHABET), (n, max_len), generator=generator).tolist()
    return ["".join(ALPHABET[c] for c in row[:k]) for row, k in zip(chars, lengths)]


def prompt_tokens(s: str) -> list[int]:
    """``BOS s SEP``."""
    return [BOS, *encode(s), SEP]


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
