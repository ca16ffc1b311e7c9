"""Per-sequence sampling inside one batch: each row keeps its own temperature, top-k, top-p and RNG.

Greedy rows (temperature 0) take an argmax, so a batched greedy request gives the same tokens as the
same request alone; sampled rows draw from their own `torch.Generator` (created on the logits' device
at first use, since a CUDA draw needs a CUDA generator), so a seed reproduces a text no matter which
other requests share the batch.
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
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """This sequence's generator on `device`, seeded once (from `seed`, else randomly)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

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
        out.append(int(torch.multinomial(probs, 1, generator=p.generator(logits.device)).item()))
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of `logits` [n, vocab]: the logprob of `tokens[row]` and the `top` most likely tokens.

    Log-softmax of the model's own logits (before temperature, top-k or top-p), which is what the
    OpenAI API reports and what log-likelihood evaluation needs.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, device=logits.device)[:, None]
    chosen = logprobs.gather(-1, index)[:, 0].tolist()
    if top <= 0:
        return chosen, [[] for _ in tokens]
    values, ids = logprobs.topk(top, dim=-1)
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
