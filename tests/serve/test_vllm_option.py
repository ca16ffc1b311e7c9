"""`serve.engine: vllm` builds a Ray Serve LLM config and app for the same folder (vLLM is not installed)."""

from __future__ import annotations

import importlib

import pytest

from serve.app import build_app, parse_args
from serve.config import ServeConfig
from serve.vllm_app import llm_config_kwargs


def test_llm_config_kwargs_follow_the_serve_section(tiny_model):
    cfg = ServeConfig(engine="vllm", min_replicas=1, max_replicas=3, max_queued_requests=7, max_batch_size=16)
    kwargs = llm_config_kwargs(str(tiny_model), cfg, context_len=256)
    assert kwargs["model_loading_config"] == {"model_id": tiny_model.name, "model_source": str(tiny_model)}
    assert kwargs["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    assert kwargs["deployment_config"]["max_queued_requests"] == 7
    assert kwargs["engine_kwargs"] == {"max_num_seqs": 16, "max_model_len": 256}
    # Ray's own LLMConfig model validates these kwargs (its internal module imports without vLLM).
    internal = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config")
    llm_config = internal.LLMConfig(**kwargs)
    assert llm_config.model_id == tiny_model.name


def test_build_app_with_vllm_engine(tiny_model):
    try:
        importlib.import_module("ray.serve.llm")
    except ImportError as exc:
        pytest.skip(f"ray.serve.llm cannot import without vLLM here: {exc}")
    from ray.serve import Application

    app = build_app({"model_path": str(tiny_model), "serve": {"engine": "vllm"}})
    assert isinstance(app, Application)


def test_build_app_args_are_validated(tiny_model):
    with pytest.raises(ValueError, match="unknown build_app args"):
        parse_args({"model_path": str(tiny_model), "modle": 1})
    with pytest.raises(Exception, match="max_replicas"):
        parse_args({"model_path": str(tiny_model), "serve": '{"max_replicas": 0}'})
    path, cfg = parse_args({"model_path": str(tiny_model), "serve": '{"max_n": 2}'})
    assert path == str(tiny_model) and cfg.max_n == 2
