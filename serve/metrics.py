"""Prometheus metrics of the endpoint, recorded in the ingress from what the model replicas stream.

Why the ingress: every token of every model replica flows through it, so one registry sees requests,
errors, tokens, queue depth, time to first token and inter-token latency across all `LLMServer`
replicas without cross-process aggregation. With several ingress replicas each exposes its own
counters for its share of the traffic; Prometheus sums them (`sum by (...)`). Each ingress keeps its
own `CollectorRegistry` so two apps in one process never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("raylm_requests", "HTTP requests received", ["route"], registry=r)
        self.errors = Counter(
            "raylm_request_errors", "requests answered with an error", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("raylm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("raylm_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge(
            "raylm_queue_depth",
            "generation requests accepted and still waiting for their first token",
            registry=r,
        )
        self.streaming = Gauge("raylm_requests_running", "generation requests producing tokens", registry=r)
        self.ttft = Histogram(
            "raylm_time_to_first_token_seconds",
            "request arrival to first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "raylm_inter_token_latency_seconds",
            "time between generated tokens",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
