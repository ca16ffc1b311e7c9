"""The pieces under the HTTP layer, in-process: detokenization, stop strings, the batch engine, options."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch

from serve.config import ServeConfig
from serve.engine import BatchEngine, Sequence
from serve.options import autoscaling_config, deployment_options, ingress_options
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


def _run(engine: BatchEngine, jobs: list[tuple[list[int], SamplingParams, int]]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in jobs]
    done = threading.Semaphore(0)
    seqs = []
    for i, (prompt, params, max_new) in enumerate(jobs):

        def emit(token: int, reason: str | None, i: int = i) -> None:
            out[i].append(token)
            if reason:
                done.release()

        seqs.append(Sequence(prompt, max_new, frozenset(), params, emit))
    for seq in seqs:  # one at a time, so later ones join a batch that is already decoding
        engine.submit([seq])
    for _ in seqs:
        assert done.acquire(timeout=120)
    return out


def test_engine_batched_equals_alone_for_greedy_and_seeded_sampling(model, tokenizer, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")
    rng = random.Random(1)
    jobs = []
    for i in range(10):
        start = rng.randrange(0, 50_000)
        prompt = tokenizer(text[start : start + rng.randint(5, 120)])["input_ids"]
        params = lambda i=i: SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=0.9, top_k=50, seed=i)  # noqa: E731
        jobs.append((prompt, params, 8 + 3 * i))
    engine = BatchEngine(model, tokenizer.pad_token_id, max_batch_size=4)
    engine.start()
    try:
        alone = [_run(engine, [(p, mk(), n)])[0] for p, mk, n in jobs]
        together = _run(engine, [(p, mk(), n) for p, mk, n in jobs])
        stats = engine.stats()
    finally:
        engine.stop()
    assert together == alone
    assert [len(t) for t in together] == [n for _, _, n in jobs]
    assert stats["peak_running"] == 4 and stats["running"] == 0


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
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (9, 11)
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"]) == (4, 6)
    assert opts["graceful_shutdown_timeout_s"] == 8
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert ingress_options(cfg)["name"] == "OpenAIIngress"

    from ray import serve

    class Probe:
        pass

    deployment = serve.deployment(Probe, **opts)  # Serve itself accepts every key and value
    assert deployment.name == "LLMServer" and deployment.max_queued_requests == 11
    serve.deployment(Probe, **ingress_options(cfg))
