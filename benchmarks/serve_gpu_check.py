"""GPU check of the built-in engine: serve a small model on a CUDA device, compare, measure.

One command, on any machine with a CUDA device:

    python benchmarks/serve_gpu_check.py [--clients 16] [--new-tokens 64]

It builds a small Llama (random weights with a large `initializer_range`, so greedy decoding has no
near-ties; raylm tokenizer trained on the vendored tinyshakespeare), serves it on one GPU replica
(bf16, the engine's GPU default) through Ray Serve, sends `--clients` concurrent greedy streams of mixed
prompt lengths through the official `openai` client, and checks every text against `model.generate`
of the same bf16 model on the same GPU, one request at a time. It prints tokens/s for both and exits 1
on any mismatch. Without a CUDA device it says so and exits 0 (`--allow-cpu` runs the same check on
the CPU, to test this script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tiny_model import build_tiny_llama  # noqa: E402  (after the path insert)


def reference(model_dir: Path, prompts: list[str], new_tokens: int, device: str) -> tuple[list[str], float]:
    """`model.generate` greedy texts, one request at a time, and its tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.engine_process import pick_device

    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = pick_device()[1] if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    texts, tokens = [], 0
    with torch.inference_mode():
        ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False).to(device)
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up (kernels, allocator)
        start = time.perf_counter()
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)[
                0, ids["input_ids"].shape[1] :
            ]
            tokens += len(out)
            texts.append(tok.decode(out, skip_special_tokens=True))
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    del model
    return texts, tokens / elapsed


async def served(
    base_url: str, model: str, key: str, prompts: list[str], new_tokens: int
) -> tuple[list[str], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)

    async def one(prompt: str) -> tuple[str, int]:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    await one(prompts[0])  # warm-up
    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - start
    return [t for t, _ in results], sum(n for _, n in results) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no CUDA device exists")
    args = parser.parse_args()

    import torch

    if torch.cuda.is_available():
        device = "cuda"
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    elif args.allow_cpu:
        device = "cpu"
        print("no CUDA device; --allow-cpu: running the same check on the CPU (fp32)")
    else:
        print(
            "serve_gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False);"
            " nothing to check."
        )
        return 0

    import ray
    from ray import serve

    from benchmarks.serve_load import prompts_of_tokens
    from serve.app import build_app

    model_dir = build_tiny_llama(
        Path(tempfile.mkdtemp(prefix="raylm-gpu-check-")),
        hidden=args.hidden,
        layers=args.layers,
        intermediate=int(args.hidden * 8 / 3) // 64 * 64,
        kv_heads=max(1, args.hidden // 128),  # grouped-query attention, as in current models
        context=1024,
        initializer_range=0.1,  # logits far apart: bf16 batch-shape noise cannot flip a greedy choice
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_of_tokens(tok, [8 + (200 * i) // max(1, args.clients - 1) for i in range(args.clients)])
    expected, ref_tok_s = reference(model_dir, prompts, args.new_tokens, device)
    print(f"(a) model.generate one request at a time: {ref_tok_s:,.0f} tok/s")

    key = "gpu-check-" + uuid.uuid4().hex
    os.environ["RAYLM_API_KEYS"] = key
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    section = {
        "num_gpus_per_replica": 1 if device == "cuda" else 0,
        "num_cpus_per_replica": 1,
        "max_batch_size": max(16, args.clients),
        "max_ongoing_requests": 4 * args.clients,
        "max_tokens_limit": args.new_tokens,
    }
    try:
        serve.run(
            build_app({"model_path": str(model_dir), "serve": section}), name="gpu-check", route_prefix="/gpu"
        )
        texts, tok_s = asyncio.run(
            served(f"http://127.0.0.1:{port}/gpu/v1", model_dir.name, key, prompts, args.new_tokens)
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"(b) endpoint, {args.clients} concurrent greedy streams: {tok_s:,.0f} tok/s"
        f" ({tok_s / ref_tok_s:.1f}x (a))"
    )
    mismatches = [i for i, (got, want) in enumerate(zip(texts, expected, strict=True)) if got != want]
    for i in mismatches:
        at = next((k for k, (a, b) in enumerate(zip(texts[i], expected[i], strict=False)) if a != b), None)
        print(
            f"  MISMATCH request {i}: first difference at character {at}\n    served:   {texts[i]!r}\n"
            f"    generate: {expected[i]!r}"
        )
    if mismatches:
        print(f"FAILED: {len(mismatches)}/{len(prompts)} batched greedy texts differ from model.generate")
        return 1
    print(f"OK: all {len(prompts)} batched greedy texts equal model.generate one at a time ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
