"""Choosing each sequence's next token from its logits: greedy at temperature 0, else temperature and top-p."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, offset: int, device: torch.device) -> torch.Generator | None:
    """Each sequence samples from its own generator: a seeded request repeats whatever else shares its batch."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    seed = random.getrandbits(63) if params.seed is None else (params.seed + offset) % (1 << 63)
    generator.manual_seed(seed)
    return generator


def next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` ([batch, vocab])."""
    chosen: list[int] = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = _sample(logits[row], p, generator)
    return chosen


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop every token after the smallest set whose mass reaches top_p (the first one always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
