"""The pieces under the HTTP layer, in-process: detokenization, stop strings, the batch engine, options."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from serve.config import ServeConfig
from serve.engine import BatchEngine, Output, Sequence
from serve.options import HEADROOM_REQUESTS, app_deployments, autoscaling_config, deployment_options
from serve.sampling import SamplingParams
from serve.text import ChoiceText, IncrementalDetokenizer


def test_incremental_detokenizer_matches_full_decode(tokenizer):
    rng = random.Random(0)
    text = "Thou art — “quoted” naïve café, 日本語 and emoji 🙂 too.\nROMEO: nay"
    ids = tokenizer(text)["input_ids"]
    randoms = [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(5)]
    for seq in [ids, *randoms]:
        prompt = tokenizer("To be")["input_ids"]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        streamed = "".join(detok.push(t) for t in seq) + detok.flush()
        assert streamed == tokenizer.decode(seq, skip_special_tokens=True)


def test_stop_string_is_never_streamed_even_partially(tokenizer):
    text = "Good morrow, sweet STOP-HERE lady"
    ids = tokenizer(text)["input_ids"]
    choice = ChoiceText(IncrementalDetokenizer(tokenizer, []), ["STOP-HERE", "never"], frozenset())
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(choice.push(t, "length" if i == len(ids) - 1 else None))
        if choice.finish_reason:
            break
    assert "".join(pieces) == "Good morrow, sweet "
    assert not any("S" in p for p in pieces)  # not even the first character of the stop string leaked
    assert choice.finish_reason == "stop"
    assert choice.tokens < len(ids)


def test_stop_token_ends_with_stop_and_is_not_in_text(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer("fair")["input_ids"]
    choice = ChoiceText(IncrementalDetokenizer(tokenizer, []), [], frozenset({eos}))
    out = "".join(choice.push(t, None) for t in ids) + choice.push(eos, "stop")
    assert out == "fair" and choice.finish_reason == "stop" and choice.tokens == len(ids) + 1


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


class Collector:
    """A `deliver` for tests: each sequence's tokens (by `owner`), and a semaphore per finished one."""

    def __init__(self, count: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.outputs: list[list[Output]] = [[] for _ in range(count)]
        self.done = threading.Semaphore(0)

    def __call__(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.outputs[out.seq.owner].append(out)
            if out.token is not None:
                self.tokens[out.seq.owner].append(out.token)
            if out.finish_reason:
                self.done.release()


def _engine(model, tokenizer, collector: Collector, **kwargs) -> BatchEngine:
    engine = BatchEngine(model, tokenizer.pad_token_id, deliver=collector, **kwargs)
    engine.start()
    return engine


def _staggered(engine: BatchEngine, collector: Collector, seqs: list[Sequence], every_steps: int) -> None:
    """Submit one sequence every `every_steps` engine steps, so later ones join a batch mid-decode."""
    for seq in seqs:
        target = engine.steps + every_steps
        engine.submit([seq])
        deadline = time.monotonic() + 60
        while engine.steps < target and engine.running and time.monotonic() < deadline:
            time.sleep(0.001)
    for _ in seqs:
        assert collector.done.acquire(timeout=120)


def _jobs(tokenizer, shakespeare, count: int) -> list[tuple[list[int], int]]:
    text = shakespeare.read_text(encoding="utf-8")
    rng = random.Random(1)
    jobs = []
    for i in range(count):
        start = rng.randrange(0, 50_000)
        prompt = tokenizer(text[start : start + rng.choice([6, 30, 120, 400])])["input_ids"]
        jobs.append((prompt, 6 + 3 * i))
    return jobs


@pytest.mark.parametrize(("chunk", "delay"), [(0, 0), (16, 3)])
def test_engine_greedy_equals_model_generate_one_at_a_time(model, tokenizer, shakespeare, chunk, delay):
    """An independent reference: `model.generate` per request vs the engine with staggered arrivals,
    mixed prompt lengths (2..~120 tokens), slot reuse (4 slots, 10 requests), chunked prefill and
    newcomers gathered for a shared prefill."""
    jobs = _jobs(tokenizer, shakespeare, 10)
    with torch.inference_mode():
        reference = [
            model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p) :].tolist()
            for p, n in jobs
        ]
    collector = Collector(len(jobs))
    engine = _engine(
        model,
        tokenizer,
        collector,
        max_batch_size=4,
        prefill_chunk_tokens=chunk,
        max_prefill_delay_steps=delay,
    )
    eos = frozenset({tokenizer.eos_token_id})
    seqs = [Sequence(p, n, eos, SamplingParams(temperature=0.0), owner=i) for i, (p, n) in enumerate(jobs)]
    try:
        _staggered(engine, collector, seqs, every_steps=3)
        stats = engine.stats()
    finally:
        engine.stop()
    assert collector.tokens == reference
    assert sum(map(len, reference)) > 100  # not all cut short by an early eos
    assert stats["peak_running"] == 4 and stats["running"] == 0


def test_seeded_sampling_is_the_same_alone_and_batched(model, tokenizer, shakespeare):
    jobs = _jobs(tokenizer, shakespeare, 6)

    def seqs() -> list[Sequence]:
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i) for i in range(len(jobs))]
        return [Sequence(p, n, frozenset(), params[i], owner=i) for i, (p, n) in enumerate(jobs)]

    alone_c, together_c = Collector(len(jobs)), Collector(len(jobs))
    alone = _engine(model, tokenizer, alone_c, max_batch_size=4, prefill_chunk_tokens=32)
    together = _engine(model, tokenizer, together_c, max_batch_size=4, prefill_chunk_tokens=32)
    try:
        for seq in seqs():
            alone.submit([seq])
            assert alone_c.done.acquire(timeout=120)
        _staggered(together, together_c, seqs(), every_steps=2)
    finally:
        alone.stop()
        together.stop()
    assert together_c.tokens == alone_c.tokens
    assert [len(t) for t in together_c.tokens] == [n for _, n in jobs]


def test_logprobs_are_log_softmax_of_the_model_logits(model, tokenizer):
    prompt = tokenizer("ROMEO: Is the day so young?")["input_ids"]
    collector = Collector(2)
    engine = _engine(model, tokenizer, collector, max_batch_size=2, prefill_chunk_tokens=4)
    gen = Sequence(prompt, 3, frozenset(), SamplingParams(temperature=0.0), owner=0, logprobs=3)
    echo = Sequence(prompt, 0, frozenset(), SamplingParams(), owner=1, logprobs=2, prompt_logprobs=True)
    try:
        engine.submit([gen, echo])
        assert collector.done.acquire(timeout=60) and collector.done.acquire(timeout=60)
    finally:
        engine.stop()
    full = prompt + collector.tokens[0]
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    for k, out in enumerate(collector.outputs[0]):
        row = expected[len(prompt) - 1 + k]
        assert out.logprob == pytest.approx(row[out.token].item(), abs=1e-4)
        assert [t for t, _ in out.top] == row.topk(3).indices.tolist()
        assert [v for _, v in out.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    (only,) = collector.outputs[1]
    assert only.token is None and only.finish_reason == "length"
    scores = only.prompt_logprobs
    assert scores[0] is None and len(scores) == len(prompt)
    for i, (lp, top) in enumerate(scores[1:], start=1):
        assert lp == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in top] == expected[i - 1].topk(2).indices.tolist()


def test_options_map_one_to_one():
    cfg = ServeConfig(
        min_replicas=2,
        max_replicas=5,
        target_ongoing_requests=3,
        upscale_delay_s=1.5,
        downscale_delay_s=7,
        max_ongoing_requests=9,
        max_queued_requests=11,
        health_check_period_s=4,
        health_check_timeout_s=6,
        graceful_shutdown_timeout_s=8,
        num_cpus_per_replica=2,
        num_gpus_per_replica=1,
    )
    opts = deployment_options(cfg)
    assert opts["name"] == "LLMServer"
    assert opts["autoscaling_config"] == autoscaling_config(cfg)
    assert {
        k: opts["autoscaling_config"][k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
    } == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 3,
    }
    assert opts["autoscaling_config"]["upscale_delay_s"] == 1.5
    assert opts["autoscaling_config"]["downscale_delay_s"] == 7
    # the replica admits 9 + 11 generation requests itself (then an OpenAI-shaped 503); Serve lets them in
    per_replica = 9 + 11 + HEADROOM_REQUESTS
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (per_replica, 5 * per_replica)
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"]) == (4, 6)
    assert opts["graceful_shutdown_timeout_s"] == 8
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert app_deployments(cfg) == [opts]

    from ray import serve

    class Probe:
        pass

    deployment = serve.deployment(Probe, **opts)  # Serve itself accepts every key and value
    assert deployment.name == "LLMServer" and deployment.max_queued_requests == 5 * per_replica
