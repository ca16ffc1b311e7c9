"""GPU option: serve the same HF folder with vLLM through Ray Serve LLM (`serve.engine: vllm`).

The `serve` section maps onto `LLMConfig.deployment_config` with the same `serve.options` mapping as the
built-in engine, so autoscaling and backpressure mean the same thing on either engine. `ray.serve.llm`
needs vLLM (or SGLang) at import time, so it is imported only when this engine is chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.config import ServeConfig
from serve.options import deployment_options


def llm_config_kwargs(model_path: str, cfg: ServeConfig, context_len: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for `model_path` under the `serve` section."""
    opts = deployment_options(cfg)
    deployment_config = {k: v for k, v in opts.items() if k not in ("name", "ray_actor_options")}
    # Ray's LLM app has its own router deployment in front, so Serve's limits apply one-to-one here
    # (the built-in engine's replica admits requests itself and widens Serve's limits instead).
    deployment_config["max_ongoing_requests"] = cfg.max_ongoing_requests
    deployment_config["max_queued_requests"] = cfg.max_queued_requests
    engine_kwargs: dict[str, Any] = {"max_num_seqs": cfg.max_batch_size}
    if context_len:
        engine_kwargs["max_model_len"] = context_len
    return {
        "model_loading_config": {
            "model_id": cfg.model_name or Path(model_path.rstrip("/")).name,
            "model_source": model_path,
        },
        "deployment_config": deployment_config,
        "engine_kwargs": engine_kwargs,
        # vLLM takes one GPU per engine replica unless tensor parallelism is configured.
        "placement_group_config": {
            "bundles": [{"CPU": cfg.num_cpus_per_replica, "GPU": max(cfg.num_gpus_per_replica, 1)}]
        },
    }


def build_vllm_app(model_path: str, cfg: ServeConfig, context_len: int | None = None) -> Any:
    """The Ray Serve LLM OpenAI app (`build_openai_app`); raises ImportError when vLLM is missing."""
    from ray.serve.llm import LLMConfig, build_openai_app

    llm_config = LLMConfig(**llm_config_kwargs(model_path, cfg, context_len))
    return build_openai_app({"llm_configs": [llm_config]})
