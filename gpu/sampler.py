"""Token sampling from the last-position logits of each request: greedy, temperature, top-k, top-p.

Seeded requests draw token n from a generator seeded by (seed, n), so the same seed gives the
same tokens whatever else shares the batch, and after a preemption too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleSpec:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    index: int = 0  # which completion token this draw is (for seeded draws)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """logits (S, V) float32 -> token ids (S,) int64, on logits' device."""
    out = logits.argmax(dim=-1)
    for row, spec in enumerate(specs):
        if not spec.greedy:
            out[row] = _draw(logits[row], spec)
    return out


def _draw(logits: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    logits = logits / spec.temperature
    if spec.top_k > 0:
        kth = torch.topk(logits, min(spec.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = None
    if spec.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((spec.seed * 1_000_003 + spec.index) % 2**63)
    return torch.multinomial(probs, 1, generator=gen)[0]
