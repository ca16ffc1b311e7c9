"""Bounded soak of the serving endpoint: more concurrent streaming clients than one replica admits.

One `LLMServer` replica with small `max_ongoing_requests` + `max_queued_requests`, and more clients than
both together, for a fixed time (at most 2 minutes, then it stops by itself). Every request is a
streamed completion with `ignore_eos`; an answer counts as complete only when its server-sent events
end with `data: [DONE]`, the usage chunk reports exactly `max_tokens` generated tokens and the choice
finished with `length`. Overflow must be answered 503 (OpenAI error shape); anything else is an error.

    python benchmarks/soak.py [--model HF_DIR] [--duration-s 60] [--clients 16] [--json out.json]

Loopback only: Serve's proxy listens on 127.0.0.1. Joins RAY_ADDRESS when set (the app is deleted at
the end), else starts an embedded Ray. Without --model it builds a tiny random Llama with a tokenizer
trained on the built-in demo corpus. Prints p50/p99 latency of complete answers, throughput, the
rejection rate and the error rate; exits 1 when any request that was not rejected ended incomplete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_DURATION_S = 120.0
APP = "soak"


@dataclass
class SoakReport:
    duration_s: float
    clients: int
    max_ongoing_requests: int
    max_queued_requests: int
    max_tokens: int
    requests: int = 0
    complete: int = 0
    rejected_503: int = 0
    incomplete: int = 0  # accepted (not 503) but no full answer: the error the soak looks for
    other_errors: dict[str, int] = field(default_factory=dict)  # status or exception name -> count
    latency_p50_s: float = float("nan")
    latency_p99_s: float = float("nan")
    generated_tokens_per_s: float = 0.0
    rejection_rate: float = 0.0
    error_rate: float = 0.0  # (incomplete + other errors) / requests

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.incomplete == 0 and not self.other_errors


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def complete_answer(events: list[str], max_tokens: int) -> bool:
    """SSE `data:` payloads of one streamed completion form a whole answer."""
    if not events or events[-1] != "[DONE]":
        return False
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return False
    usage = [c["usage"] for c in chunks if c.get("usage")]
    reasons = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")]
    return bool(usage) and usage[-1]["completion_tokens"] == max_tokens and reasons == ["length"]


async def _client(http: Any, url: str, body: dict, key: str, until: float, out: dict) -> None:
    """One client: stream completions back to back until `until`; a 503 is retried after a short pause."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < until:
        start = time.perf_counter()
        out["requests"] += 1
        accepted = False
        try:
            async with http.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code == 503:
                    error = json.loads(await resp.aread()).get("error") or {}
                    if error.get("message") and error.get("type"):
                        out["rejected"] += 1
                    else:
                        out["errors"]["503 without an OpenAI error body"] += 1
                    await asyncio.sleep(0.05)  # what a client told "retry later" does
                    continue
                if resp.status_code != 200:
                    out["errors"][f"HTTP {resp.status_code}"] += 1
                    continue
                accepted = True
                events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
        except (httpx.HTTPError, ValueError) as exc:
            if accepted:
                out["incomplete"] += 1  # the stream broke off
            else:
                out["errors"][type(exc).__name__] += 1
            continue
        if complete_answer(events, body["max_tokens"]):
            out["complete"] += 1
            out["latencies"].append(time.perf_counter() - start)
        else:
            out["incomplete"] += 1


async def _soak(url: str, model: str, key: str, duration_s: float, clients: int, max_tokens: int) -> dict:
    import httpx

    body = {
        "model": model,
        "prompt": "ROMEO: ",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out: dict[str, Any] = {
        "requests": 0,
        "complete": 0,
        "rejected": 0,
        "incomplete": 0,
        "errors": Counter(),
        "latencies": [],
    }
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    until = time.monotonic() + duration_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as http:
        await asyncio.wait_for(
            asyncio.gather(*(_client(http, url, body, key, until, out) for _ in range(clients))),
            timeout=duration_s + 90,  # a stuck stream fails the soak instead of hanging it
        )
    return out


def run_soak(
    base_url: str,
    model: str,
    api_key: str,
    duration_s: float,
    clients: int,
    max_tokens: int = 16,
    max_ongoing_requests: int = 0,
    max_queued_requests: int = 0,
) -> SoakReport:
    """Drive `base_url` (…/v1) for `duration_s` seconds with `clients` streaming clients."""
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}]; got {duration_s}")
    host = base_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise ValueError(f"the soak runs on loopback only; got host {host!r}")
    started = time.perf_counter()
    out = asyncio.run(_soak(f"{base_url}/completions", model, api_key, duration_s, clients, max_tokens))
    elapsed = time.perf_counter() - started
    report = SoakReport(
        duration_s=round(elapsed, 2),
        clients=clients,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        max_tokens=max_tokens,
        requests=out["requests"],
        complete=out["complete"],
        rejected_503=out["rejected"],
        incomplete=out["incomplete"],
        other_errors={k: v for k, v in out["errors"].items() if v},
    )
    report.latency_p50_s = pct(out["latencies"], 50)
    report.latency_p99_s = pct(out["latencies"], 99)
    report.generated_tokens_per_s = out["complete"] * max_tokens / elapsed
    if report.requests:
        report.rejection_rate = report.rejected_503 / report.requests
        report.error_rate = (report.incomplete + sum(report.other_errors.values())) / report.requests
    return report


def build_tiny_model(out: Path) -> Path:
    """A 2-layer random Llama + raylm tokenizer trained on the built-in demo corpus (no downloads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipelines.config import DemoCorpusConfig, TokenizerConfig
    from data_pipelines.demo_corpus import corpus_documents
    from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(corpus_documents(DemoCorpusConfig()), TokenizerConfig(vocab_size=512), out)
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=344,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model_dir: Path, api_key: str, max_ongoing: int, max_queued: int) -> tuple[str, bool]:
    """Start or join Ray, run the app on one replica; returns (base URL …/v1, whether Ray is embedded)."""
    import ray
    from ray import serve

    from cluster.config import ClusterConfig
    from cluster.local_ray import ensure_ray
    from serve.app import build_app

    embedded = not os.environ.get("RAY_ADDRESS")
    ensure_ray(ClusterConfig())
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    http = serve.context._get_global_client().http_config
    if http.host not in ("127.0.0.1", "localhost"):
        ray.shutdown()
        raise SystemExit(f"Serve's proxy listens on {http.host}; the soak runs on loopback only")
    os.environ["RAYLM_API_KEYS"] = api_key
    section = {
        "min_replicas": 1,
        "max_replicas": 1,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        "max_batch_size": max_ongoing,
        "num_cpus_per_replica": 1,
    }
    serve.run(build_app({"model_path": str(model_dir), "serve": section}), name=APP, route_prefix=f"/{APP}")
    return f"http://127.0.0.1:{http.port}/{APP}/v1", embedded


def print_report(report: SoakReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"soak: {report.clients} clients, {report.duration_s:.0f} s, one replica "
        f"(max_ongoing {report.max_ongoing_requests} + queued {report.max_queued_requests})"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in [
        ("requests", report.requests),
        ("complete answers", report.complete),
        ("rejected with 503", report.rejected_503),
        ("accepted but incomplete", report.incomplete),
        ("other errors", sum(report.other_errors.values())),
        ("latency p50 (s)", f"{report.latency_p50_s:.3f}"),
        ("latency p99 (s)", f"{report.latency_p99_s:.3f}"),
        ("generated tokens/s", f"{report.generated_tokens_per_s:.1f}"),
        ("rejection rate", f"{report.rejection_rate:.1%}"),
        ("error rate", f"{report.error_rate:.2%}"),
    ]:
        table.add_row(name, str(value))
    Console().print(table)
    verdict = "every accepted request got a complete answer" if report.ok else "FAILED: see errors above"
    print(f"{verdict}; other errors: {report.other_errors or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: build a tiny one)")
    parser.add_argument("--duration-s", type=float, default=60.0, help=f"at most {MAX_DURATION_S:.0f}")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-ongoing", type=int, default=4, help="the replica's max_ongoing_requests")
    parser.add_argument("--max-queued", type=int, default=4, help="the replica's max_queued_requests")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.duration_s <= MAX_DURATION_S:
        parser.error(f"--duration-s must be in (0, {MAX_DURATION_S:.0f}]")
    if args.clients <= args.max_ongoing + args.max_queued:
        parser.error("--clients must exceed --max-ongoing + --max-queued (the soak is above capacity)")

    from ray import serve

    api_key = "sk-soak-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="raylm-soak-") as tmp:
        model = args.model or build_tiny_model(Path(tmp) / "tiny")
        url, embedded = deploy(model, api_key, args.max_ongoing, args.max_queued)
        try:
            report = run_soak(
                url,
                model.name,
                api_key,
                args.duration_s,
                args.clients,
                args.max_tokens,
                args.max_ongoing,
                args.max_queued,
            )
        finally:
            serve.delete(APP)
            if embedded:
                import ray

                serve.shutdown()
                ray.shutdown()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
