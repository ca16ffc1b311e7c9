"""The Serve application builder: `serve run serve.app:build_app model_path=...`, `serve deploy`, RayService.

`args` = {"model_path": str, "serve": <serve section as a dict, or a JSON string from the command line>}.
The app is one autoscaled deployment, `LLMServer`: the model, its batching engine and the OpenAI routes
(`serve.ingress.OpenAIServer`), so each token makes one hop (replica → proxy). Its options come from
`serve.options`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import serve
from ray.serve import Application

from serve.auth import load_key_digests
from serve.config import ServeConfig
from serve.ingress import OpenAIServer
from serve.options import deployment_options

log = logging.getLogger(__name__)


def parse_args(args: dict[str, Any]) -> tuple[str, ServeConfig]:
    """Validate builder args; unknown keys and bad serve fields raise ValueError naming them."""
    unknown = set(args) - {"model_path", "serve"}
    if unknown:
        raise ValueError(f"unknown build_app args {sorted(unknown)}; allowed: model_path, serve")
    section = args.get("serve") or {}
    if isinstance(section, str):
        section = json.loads(section)
    cfg = ServeConfig.model_validate(section)
    model_path = args.get("model_path") or cfg.model_path
    if not model_path:
        raise ValueError("build_app needs model_path (a Hugging Face model folder)")
    return str(model_path), cfg


def build_app(args: dict[str, Any]) -> Application:
    model_path, cfg = parse_args(args)
    if cfg.engine == "vllm":
        from serve.vllm_app import build_vllm_app

        return build_vllm_app(model_path, cfg)
    digests = load_key_digests(cfg)
    if cfg.require_api_key and not digests:
        raise ValueError(
            f"serve.require_api_key is true but ${cfg.api_keys_env} and serve.api_key_file hold no key;"
            " set one, or serve.require_api_key=false for local use only"
        )
    deployment = serve.deployment(OpenAIServer, **deployment_options(cfg))
    return deployment.bind(model_path, cfg.model_dump(mode="json"), digests)
