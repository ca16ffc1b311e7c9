"""Per-sequence sampling inside one batch: each row keeps its own temperature, top-k, top-p and RNG.

Greedy rows (temperature 0) take an argmax, so a batched greedy request gives the same tokens as the
same request alone; sampled rows draw from their own `torch.Generator`, so a seed reproduces a text
no matter which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one sequence asks of the sampler; `temperature == 0` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (set to -inf) the tokens outside top-k and outside the top-p nucleus of one row."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass *before* it already reaches top_p; the top token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """Next token per row of `logits` [batch, vocab], each row by its own parameters."""
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, p in enumerate(params):
        if p.greedy:
            out.append(greedy[row])
            continue
        scaled = _filter_top_k_top_p(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=p.generator).item()))
    return out
