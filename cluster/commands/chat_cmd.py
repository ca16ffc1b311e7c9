"""`raylm chat TARGET`: talk to a model in the terminal; answers stream in through the official `openai`
client and the conversation is kept, so every request carries the turns before it.

TARGET is a Hugging Face model folder or a run YAML; `--base-url URL` talks to any running
OpenAI-compatible endpoint instead. For a run file, chat first asks the run's own endpoint
(`serve.port` on this host, up while `raylm pipeline --keep-serving` or `raylm serve` runs) and, when
nothing answers there, serves the run's model itself for the session, exactly as for a model folder:
a Serve application on the embedded (or joined) Ray, with a one-off API key, deleted when chat exits.
Ctrl-D quits, Ctrl-C interrupts an answer, `/reset` forgets the conversation.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.commands._common import SetOpt, console, err_console, fail, load_or_exit
from cluster.config import RunConfig

Target = Annotated[
    Path | None,
    typer.Argument(
        help="a Hugging Face model folder or a run YAML (omit with --base-url)", show_default=False
    ),
]
BaseUrl = Annotated[
    str | None, typer.Option("--base-url", help="a running endpoint, e.g. http://127.0.0.1:8000/v1")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="OPENAI_API_KEY", help="API key of the endpoint ($OPENAI_API_KEY)"),
]


# ---- the conversation --------------------------------------------------------------------------------
@dataclass
class Turn:
    answer: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float


@dataclass
class ChatSession:
    """The conversation so far and how to ask for the next answer."""

    client: Any  # openai.OpenAI
    model: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    dropped_turns: int = 0

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        self.history.clear()

    def _create(self) -> Any:
        """Start a streamed completion; when the conversation outgrows the model's context, forget the
        oldest exchange and try again."""
        import openai

        options = {
            k: v
            for k, v in (("max_tokens", self.max_tokens), ("temperature", self.temperature))
            if v is not None
        }
        while True:
            try:
                return self.client.chat.completions.create(
                    model=self.model,
                    messages=self.messages(),
                    stream=True,
                    stream_options={"include_usage": True},
                    **options,
                )
            except openai.BadRequestError as exc:
                if exc.code != "context_length_exceeded" or len(self.history) < 3:
                    raise
                del self.history[:2]
                self.dropped_turns += 1

    def ask(self, text: str, write: Callable[[str], None]) -> Turn:
        """Send `text` after the conversation so far, `write` the answer as it streams, keep both.

        An answer that fails or is interrupted is not kept, and neither is its question."""
        self.history.append({"role": "user", "content": text})
        started = time.perf_counter()
        parts: list[str] = []
        usage = None
        try:
            with self._create() as stream:  # closing it ends the HTTP stream, also on Ctrl-C
                for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            write(choice.delta.content)
        except BaseException:
            self.history.pop()
            raise
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return Turn(
            answer,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
            time.perf_counter() - started,
        )


def usage_line(turn: Turn) -> str:
    if turn.prompt_tokens is None:
        return f"{turn.seconds:.1f} s"
    rate = (turn.completion_tokens or 0) / max(turn.seconds, 1e-6)
    return f"prompt {turn.prompt_tokens} tokens · answer {turn.completion_tokens} tokens · {rate:,.0f} tok/s"


def repl(session: ChatSession) -> None:
    """Read a line, stream the answer, repeat; Ctrl-D ends it."""
    import openai

    with suppress(ImportError):  # not on every platform; input() works without it
        import readline  # noqa: F401  (line editing and history for input())
    out = console.file

    def write(delta: str) -> None:
        out.write(delta)
        out.flush()

    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            console.print("\nbye")
            return
        except KeyboardInterrupt:
            console.print()
            continue
        if not text:
            continue
        if text == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/]")
            continue
        dropped = session.dropped_turns
        write("model> ")
        try:
            turn = session.ask(text, write)
        except KeyboardInterrupt:
            console.print("\n[dim](interrupted; this exchange is not kept)[/]")
            continue
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            console.print(f"\n[red]error {exc.status_code}:[/] {body.get('message', exc)}", highlight=False)
            continue
        console.print(f"\n[dim]({usage_line(turn)})[/]", highlight=False)
        if session.dropped_turns > dropped:
            console.print("[dim](the oldest exchange no longer fit the model's context and was dropped)[/]")


# ---- where the model is ------------------------------------------------------------------------------
@dataclass
class ChatEndpoint:
    base_url: str
    api_key: str
    close: Callable[[], None] = lambda: None  # stops an endpoint this command started


def run_key(cfg: RunConfig) -> str | None:
    """A key the run's endpoint accepts: configured ($RAYLM_API_KEYS, serve.api_key_file) or the one
    `raylm pipeline` generated into the run folder."""
    from serve.auth import load_keys

    configured = cfg.serve
    if configured.api_key_file and not Path(configured.api_key_file).expanduser().is_file():
        configured = configured.model_copy(update={"api_key_file": None})  # only looking for a key here
    keys = load_keys(configured)
    if cfg.layout().serve_key.is_file():
        keys += load_keys(configured.model_copy(update={"api_key_file": str(cfg.layout().serve_key)}))
    return keys[0] if keys else None


def running_endpoint(cfg: RunConfig, api_key: str | None) -> ChatEndpoint | None:
    """The run's endpoint on this host if one answers at serve.port, else None."""
    from openai import APIConnectionError, APIStatusError, OpenAI

    base = f"http://127.0.0.1:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/v1"
    key = api_key or run_key(cfg) or "unused"
    try:
        OpenAI(base_url=base, api_key=key, max_retries=0, timeout=3).models.list()
    except APIStatusError:
        pass  # something answers there (a refused key is reported when the chat starts)
    except APIConnectionError:  # includes timeouts
        return None
    return ChatEndpoint(base, key)


def serve_for_session(cfg: RunConfig, folder: Path, log_dir: str) -> ChatEndpoint:
    """Serve `folder` on loopback under a one-off key until the chat ends; the libraries' output
    goes to a log file under `log_dir` (unless --verbose)."""
    import ray
    from ray import serve

    from cluster.deploy import deploy
    from cluster.local_cluster import free_port
    from cluster.local_ray import ensure_ray
    from cluster.logs import library_output_to, log_file_for, verbose
    from cluster.pipeline import with_absolute_storage
    from cluster.progress import StageDisplay

    cfg = with_absolute_storage(cfg)
    key = "rlm-chat-" + secrets.token_urlsafe(18)
    env = cfg.serve.api_keys_env
    os.environ[env] = ",".join(k for k in (key, os.environ.get(env)) if k)  # build_app reads keys here
    app_name = f"raylm-chat-{os.getpid()}"
    section = {"host": "127.0.0.1", "port": free_port(), "route_prefix": f"/{app_name}"}
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=section)})
    embedded = not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    log_path = log_file_for(log_dir, "chat")

    def quiet():
        return (
            nullcontext()
            if verbose()
            else library_output_to(log_path, console, stderr_consoles=(err_console,))
        )

    if not verbose():
        console.print(
            f"[dim]library output (Ray, Serve) → {log_path} (--verbose: here)[/]",
            highlight=False,
            soft_wrap=True,
        )
    with quiet(), StageDisplay(console) as display, display.stage("endpoint", "starting Ray"):
        ensure_ray(cfg.cluster, log_to_driver=verbose())
        endpoint = deploy(cfg, folder, console, app_name=app_name)

    def close() -> None:
        with quiet():
            serve.delete(app_name)
            if embedded:
                ray.shutdown()
        console.print("[dim]the chat's endpoint has stopped[/]")

    return ChatEndpoint(endpoint.fastest_url, key, close)


def open_endpoint(target: Path, overrides: list[str] | None, api_key: str | None) -> ChatEndpoint:
    import tempfile

    from cluster.deploy import deploy_model
    from cluster.stage_cache import PipelineError

    if target.is_dir():
        if not (target / "config.json").is_file():
            fail(f"{target} is not a Hugging Face model folder (no config.json)")
        cfg = load_or_exit(None, overrides)
        return serve_for_session(cfg, target, str(Path(tempfile.gettempdir()) / "raylm-chat"))
    cfg = load_or_exit(target, overrides)
    running = running_endpoint(cfg, api_key)
    if running is not None:
        return running
    try:
        _, folder = deploy_model(cfg)
    except PipelineError as exc:
        fail(f"{exc}; run `raylm pipeline {target}` first")
    return serve_for_session(cfg, folder, cfg.run_dir())


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def chat(
    target: Target = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    model: Annotated[str | None, typer.Option("--model", help="model id (default: the first served)")] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system message to start with")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="longest answer in tokens")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0 = greedy")] = None,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Ray and Serve output here")] = False,
) -> None:
    """Chat with a model in the terminal: a model folder, a run YAML, or --base-url of a running endpoint.

    Answers stream as they are generated; the conversation is kept (each request carries the earlier
    turns). Ctrl-D quits, Ctrl-C interrupts an answer, /reset starts over.
    """
    import openai

    from cluster.logs import set_verbose

    set_verbose(verbose)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or `kill` still stops our endpoint
        signal.signal(sig, _exit_on_signal)
    if base_url:
        endpoint = ChatEndpoint(base_url.rstrip("/"), api_key or "unused")
    elif target is not None:
        endpoint = open_endpoint(target, set_, api_key)
    else:
        fail("give a model folder, a run YAML, or --base-url URL of a running endpoint")
    try:
        client = openai.OpenAI(
            base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=1, timeout=300
        )
        try:
            served = [m.id for m in client.models.list().data]
        except openai.AuthenticationError:
            fail(f"{endpoint.base_url} refused the API key: pass --api-key or set OPENAI_API_KEY")
        except openai.APIStatusError as exc:
            fail(f"{endpoint.base_url}/models answered {exc.status_code}: not an OpenAI-compatible endpoint?")
        except openai.APIConnectionError:
            fail(f"nothing answers at {endpoint.base_url}")
        if model and model not in served:
            fail(f"{endpoint.base_url} serves {served}, not {model!r}")
        session = ChatSession(client, model or served[0], system, max_tokens, temperature)
        console.print(
            f"chatting with [bold]{session.model}[/] at {endpoint.base_url} · Ctrl-D quits, /reset forgets",
            highlight=False,
        )
        repl(session)
    finally:
        endpoint.close()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
