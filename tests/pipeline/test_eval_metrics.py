"""Evaluation metrics on hand-made cases: exact match, token F1, perplexity of a known distribution."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from jobs.evaluate import exact_match, normalize_answer, perplexity, results_markdown, score_answers, token_f1


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  The Pro plan costs $12 per month. ") == "the pro plan costs 12 per month"
    assert exact_match("the pro plan costs $12 per month", "The Pro plan costs $12 per month.") == 1.0
    assert exact_match("The Pro plan costs $13 per month.", "The Pro plan costs $12 per month.") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_by_hand():
    # prediction 4 tokens, reference 3, overlap 2: P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7.
    assert token_f1("red green blue cat", "red green dog") == pytest.approx(4 / 7)
    assert token_f1("red green dog", "red green dog") == 1.0
    assert token_f1("cat", "dog") == 0.0
    # Tokens count as a bag: a repeated token only matches as often as the reference has it.
    assert token_f1("a a a", "a b") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "dog") == 0.0


def test_score_answers_averages():
    scores = score_answers(["Red green dog.", "cat"], ["red green dog", "dog"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "examples": 2}


class FixedDistribution(torch.nn.Module):
    """A 'model' whose next-token distribution is always `probs`, whatever the input."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = probs.log()

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.log_probs.expand(b, t, -1).clone())


def test_perplexity_of_uniform_distribution_is_vocab_size():
    vocab = 37
    model = FixedDistribution(torch.full((vocab,), 1.0 / vocab))
    blocks = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    out = perplexity(model, blocks, batch_size=2)
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert out["tokens"] == 4 + 2 + 6  # every token but each block's first is predicted; padding excluded


def test_perplexity_of_known_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    model = FixedDistribution(probs)
    blocks = [[0, 0, 1, 2], [3, 1]]  # predicted targets: 0, 1, 2 | 1
    expected = math.exp(-(math.log(0.5) + math.log(0.25) + math.log(0.125) + math.log(0.25)) / 4)
    out = perplexity(model, blocks, batch_size=8)
    assert out["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert out["nll_per_token"] == pytest.approx(math.log(expected), rel=1e-5)


def test_markdown_table_lists_every_model():
    sample = {"prompt": "q?", "reference": "a.", "prediction": "a."}
    results = {
        "models": {
            "pretrained": {
                "exact_match": 0.0,
                "token_f1": 0.25,
                "perplexity": 12.5,
                "examples": 4,
                "samples": [],
            },
            "finetuned": {
                "exact_match": 0.75,
                "token_f1": 0.9,
                "perplexity": 9.0,
                "examples": 4,
                "samples": [sample],
            },
        }
    }
    md = results_markdown(results)
    assert "| pretrained | 0.000 | 0.250 | 12.50 | 4 |" in md
    assert "| finetuned | 0.750 | 0.900 | 9.00 | 4 |" in md
    assert "**Q:** q?" in md
