"""Deploy an exported model on Ray Serve and ask it questions through the official `openai` client.

`raylm pipeline` deploys the model its stages produced; `raylm chat` deploys one for a session. The
API key a client needs comes from `serve/auth.py`'s reading of the `serve` section, or is generated
for a local deploy and kept (mode 600) in the run folder.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import RunConfig
from cluster.progress import current_line
from cluster.stage_cache import PipelineError
from data_pipelines.layout import EXPORT_NAMES

SERVE_APP_NAME = "raylm"


def deploy_model(cfg: RunConfig) -> tuple[str, Path]:
    """(name, folder) of the model to serve: `serve.model_path`, else the fine-tuned, else the pretrained."""
    if cfg.serve.model_path:
        return "configured", Path(cfg.serve.model_path)
    run = cfg.layout()
    for name in EXPORT_NAMES:
        if (run.export(name) / "config.json").is_file():
            return name, run.export(name)
    raise PipelineError(f"nothing to deploy: no exported model under {run.exports_root}")


def verify_export(folder: Path) -> dict[str, Any]:
    """The folder is a loadable HF model: config, safetensors weights, tokenizer."""
    from transformers import AutoConfig

    missing = [
        f for f in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()
    ]
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if missing or not weights:
        raise PipelineError(f"export {folder} is incomplete: missing {missing or ['*.safetensors']}")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return {"path": str(folder), "model_type": config.model_type, "weights": weights}


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str | None
    key_source: str
    key_file: Path | None = None  # set when the key was generated into the run folder
    # the replicas' own HTTP servers (Serve direct ingress), one hop less per token than base_url
    direct_urls: tuple[str, ...] = ()

    @property
    def fastest_url(self) -> str:
        """A replica's own URL when the app has exactly one replica, else the proxy's (it balances)."""
        return self.direct_urls[0] if len(self.direct_urls) == 1 else self.base_url


def resolve_api_key(cfg: RunConfig, console: Console) -> tuple[str | None, str]:
    """The key clients should use. A configured key is used as is and never printed; with none
    configured, one is generated for this local deploy, saved 0600 in the run folder and shown once."""
    from serve.auth import load_keys

    if not cfg.serve.require_api_key:
        return None, "none (serve.require_api_key is false)"
    keys = load_keys(cfg.serve)
    if keys:
        source = (
            f"${cfg.serve.api_keys_env}" if os.environ.get(cfg.serve.api_keys_env) else cfg.serve.api_key_file
        )
        return keys[0], f"configured ({source})"
    key = "rlm-" + secrets.token_urlsafe(24)
    key_file = cfg.layout().serve_key
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    os.environ[cfg.serve.api_keys_env] = key  # build_app reads the keys here, in the driver
    console.print(
        f"[bold]generated an API key[/] for this local deploy (saved to {key_file}, mode 600):\n"
        f"  export OPENAI_API_KEY=$(cat {key_file})",
        soft_wrap=True,
    )
    return key, f"generated ({key_file})"


def serve_logging() -> dict[str, Any]:
    """Serve's logging config: no per-request access log lines unless the user asked for --verbose
    (request counts and latencies stay available at /metrics)."""
    from cluster.logs import verbose

    return {"enable_access_log": verbose()}


def deploy(cfg: RunConfig, folder: Path, console: Console, app_name: str = SERVE_APP_NAME) -> Endpoint:
    """Run the OpenAI-compatible Serve app on `folder` and wait until it answers."""
    from ray import serve

    from serve.app import build_app

    key, source = resolve_api_key(cfg, console)
    section = cfg.serve.model_dump(mode="json") | {"model_path": str(folder)}
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=serve_logging())
    app = build_app({"model_path": str(folder), "serve": section})
    current_line().update(f"starting {folder.name} on Ray Serve (replicas load the weights)")
    serve.run(app, name=app_name, route_prefix=cfg.serve.route_prefix, logging_config=serve_logging())
    base, direct = app_urls(app_name, cfg.serve.route_prefix)
    key_file = cfg.layout().serve_key if source.startswith("generated") else None
    return Endpoint(base, cfg.serve.model_name or folder.name, key, source, key_file, direct)


def app_urls(app_name: str, route_prefix: str) -> tuple[str, tuple[str, ...]]:
    """A running app's OpenAI base URL through Serve's proxy (the one that runs, if Serve was already
    up), and through each replica's own port (direct ingress; none when it is off)."""
    from ray import serve

    from serve.direct_ingress import WILDCARD_HOSTS, replica_urls

    http = serve.context._get_global_client().http_config
    host = "127.0.0.1" if http.host in WILDCARD_HOSTS else http.host
    prefix = f"{route_prefix.rstrip('/')}/v1"
    return f"http://{host}:{http.port}{prefix}", tuple(f"{url}{prefix}" for url in replica_urls(app_name))


def smoke_requests(endpoint: Endpoint, questions: list[str], max_tokens: int) -> list[dict[str, str]]:
    """Ask the endpoint through the official `openai` client, as any user would."""
    from openai import OpenAI

    client = OpenAI(
        base_url=endpoint.fastest_url, api_key=endpoint.api_key or "unused", max_retries=2, timeout=120
    )
    served = [m.id for m in client.models.list().data]
    model = endpoint.model if endpoint.model in served else served[0]
    answers = []
    for q in questions:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
        )
        answers.append({"question": q, "answer": reply.choices[0].message.content or ""})
    return answers


def smoke_questions(cfg: RunConfig, n: int = 3) -> list[str]:
    from jobs.sft_data import eval_pair_paths, load_records, pair_of

    records = load_records(eval_pair_paths(cfg))
    step = max(1, len(records) // n)
    return [pair_of(r)[0][-1]["content"] for r in records[::step][:n]]
