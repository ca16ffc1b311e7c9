"""Typed configuration of the `serve` section (owned here); fields map one-to-one onto Ray Serve options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ServeConfig(BaseModel):
    """How a model folder is served: engine, autoscaling, backpressure, auth and request limits."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description="HF folder to serve (default: this run's export)")
    model_name: str | None = Field(None, description="name in /v1/models (default: folder name)")
    engine: Literal["hf", "vllm"] = "hf"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    autoscaling_look_back_period_s: float = Field(
        30, gt=0, description="window over which Serve averages ongoing requests for autoscaling"
    )
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(128, ge=-1, description="-1 = unbounded")
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float = Field(20, ge=0)
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    torch_threads_per_replica: int | None = Field(
        None, ge=1, description="intra-op threads of a model replica (default: its num_cpus, at least 1)"
    )
    max_batch_size: int = Field(32, ge=1, description="KV cache slots: sequences decoded together per step")
    prefill_chunk_tokens: int = Field(
        128,
        ge=0,
        description="prompt tokens prefilled per engine step, between decode steps (0 = whole prompts)",
    )
    max_prefill_delay_steps: int = Field(
        4, ge=0, description="decode steps a newcomer may wait so that several share one prefill forward"
    )
    stream_max_chunks_per_s: float = Field(
        200,
        gt=0,
        description="SSE chunks/s a replica sends at most, shared by its streams (a chunk carries every"
        " token since the stream's last one); a large value sends every token at once",
    )
    stream_interval_max_ms: float = Field(
        100, gt=0, description="longest a streamed token waits for its chunk when many streams run"
    )
    api_keys_env: str = Field("RAYLM_API_KEYS", description="env var holding comma-separated API keys")
    api_key_file: str | None = Field(None, description="file with one API key per line")
    require_api_key: bool = Field(True, description="false only for local experiments")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1)
    max_stop_sequences: int = Field(4, ge=0)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_limit(cls, v: int) -> int:
        if v == 0:  # Ray Serve rejects 0 at deploy time; fail here, before any work starts
            raise ValueError("must be -1 (unbounded) or a positive integer")
        return v

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self
