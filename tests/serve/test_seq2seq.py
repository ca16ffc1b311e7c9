"""Encoder-decoder folders (AutoModelForSeq2SeqLM) are served by LLMServer's simple generate path."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest

from serve.model_server import LLMServer
from serve.protocol import ChunkItem, GenerationRequest


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tokenizer) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, out / name)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=5.0,
    )
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


def run(server: LLMServer, request: GenerationRequest) -> list[ChunkItem]:
    async def collect() -> list[ChunkItem]:
        return [item async for chunk in server.generate(request) for item in chunk]

    return asyncio.run(collect())


def test_seq2seq_generates_and_reports_length(tiny_t5: Path, tokenizer):
    server = LLMServer(str(tiny_t5), max_batch_size=4, torch_threads=1)
    assert server.encoder_decoder and server.engine is None
    prompt = tokenizer("translate: good morrow")["input_ids"]
    request = GenerationRequest(prompts=[prompt], max_tokens=[6], n=2, temperature=0.0)
    items = run(server, request)
    assert [i.index for i in items] == [0, 1]
    assert items[0].text == items[1].text  # greedy
    for item in items:
        assert 1 <= item.tokens <= 6
        assert item.finish_reason == ("length" if item.tokens == 6 else "stop")
    seeded = dataclasses.replace(request, temperature=1.0, seed=5, n=1)
    assert run(server, seeded) == run(server, seeded)
