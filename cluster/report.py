"""`<run>/report.md`: one page a person reads after `raylm pipeline` — what ran, on what data, how the
model scores before and after fine-tuning, and where it is served.

Everything is read back from the run folder (stage records, shard manifest, metrics PNGs, evaluation
results), so the report is the same whether the stages ran now or were skipped as current. API keys
never appear in it: only where the key file is.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.config import RunConfig, dump_config
from cluster.deploy import SERVE_APP_NAME
from data_pipelines.layout import RunLayout, Stage

if TYPE_CHECKING:
    from cluster.pipeline import PipelineResult

CURVES = ((Stage.PRETRAIN, "Pretraining"), (Stage.FINETUNE, "Fine-tuning"))


def _data_section(cfg: RunConfig, run_dir: Path) -> list[str]:
    from data_pipelines.pipeline import shards_dir_of

    lines = ["## Data", ""]
    inputs_file = RunLayout(run_dir).inputs_record
    if inputs_file.is_file():
        inputs = json.loads(inputs_file.read_text())
        source = (
            "built-in demo corpus (synthetic support dialogues and FAQ)" if inputs["demo"] else "configured"
        )
        lines += [f"- corpus: {source}, {inputs['num_inputs']} file(s), {inputs['bytes']:,} bytes"]
    manifest_file = Path(shards_dir_of(cfg.data, str(run_dir))) / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        s = manifest["stats"]
        dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("dropped", {}).items()) if v) or "none"
        lines += [
            f"- documents: {s['documents_read']:,} read, {s['documents_kept']:,} kept "
            f"({s['train_documents']:,} train / {s['val_documents']:,} validation); dropped: {dropped}",
            f"- tokens: {s['tokens']:,} in {s['blocks']:,} blocks of {manifest['seq_len']} "
            f"({s['train_blocks']:,} train / {s['val_blocks']:,} validation)",
        ]
    else:
        lines += ["- tokens: streamed into pretraining (data.mode: stream); see the pretraining metrics"]
    tok = RunLayout(run_dir).stage_record(Stage.TOKENIZER)
    if tok.is_file():
        detail = json.loads(tok.read_text()).get("detail", {})
        if detail:
            lines += [
                f"- tokenizer: {cfg.tokenizer.kind}, {detail.get('vocab_size')} tokens, {detail.get('path')}"
            ]
    return lines + [""]


def _curves_section(run_dir: Path) -> list[str]:
    lines = ["## Loss curves", ""]
    found = False
    for stage, title in CURVES:
        png = RunLayout(run_dir).stage_dir(stage) / "loss_curve.png"
        if png.is_file():
            lines += [f"**{title}**", "", f"![{title} loss]({stage}/loss_curve.png)", ""]
            found = True
    return lines if found else lines + ["(no training curves in this run folder)", ""]


def _eval_section(run_dir: Path) -> list[str]:
    md = RunLayout(run_dir).eval_dir / "results.md"
    if not md.is_file():
        return ["## Evaluation", "", "(not evaluated)", ""]
    body = md.read_text().split("\n", 2)[-1].strip()  # drop the file's own title
    return ["## Evaluation (held-out questions, greedy decoding)", "", body, ""]


def _endpoint_section(cfg: RunConfig, result: Any) -> list[str]:
    lines = ["## Endpoint", ""]
    ep = result.endpoint
    if result.gate:
        lines += [f"- evaluation gate: {result.gate.removeprefix('evaluation gate: ')}"]
    if ep is None:
        return lines + ["- not deployed", ""]
    lines += [
        f"- OpenAI-compatible base URL: `{ep.base_url}` (model `{ep.model}`; Serve's proxy, across replicas)",
        *(f"- a replica's own port (Serve direct ingress, no proxy hop): `{url}`" for url in ep.direct_urls),
        f"- API key: {ep.key_source}",
        *(f"- {sentence}" for sentence in endpoint_lifetime(result)),
        "",
        "```bash",
        f'curl {ep.base_url}/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\',
        f'  -H \'Content-Type: application/json\' -d \'{{"model": "{ep.model}", '
        '"messages": [{"role": "user", "content": "Does PhotoVault have a free trial?"}]}\'',
        "```",
        "",
    ]
    if result.answers:
        lines += ["**Smoke requests (openai client)**", ""]
        for a in result.answers:
            answer = " ".join(a["answer"].split()) or "(empty)"
            lines += [f"- **Q:** {a['question']}", f"  - **A:** {answer}"]
        lines.append("")
    return lines


def write_report(cfg: RunConfig, result: Any) -> Path:
    """Write `<run>/report.md` from the run folder and this invocation's result; returns its path."""
    run_dir = Path(cfg.run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# raylm run `{cfg.cluster.run_name}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} · run folder `{run_dir.resolve()}` · "
        f"this invocation took {result.seconds:.0f} s",
        "",
        "## Stages",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    for o in result.outcomes:
        lines.append(
            f"| {o.stage} | {o.status} | {o.seconds:.0f} |" if o.seconds else f"| {o.stage} | {o.status} | |"
        )
    lines.append("")
    lines += _data_section(cfg, run_dir)
    lines += _curves_section(run_dir)
    lines += _eval_section(run_dir)
    lines += _endpoint_section(cfg, result)
    lines += ["## Configuration", "", "```yaml", dump_config(cfg).rstrip(), "```", ""]
    out = RunLayout(run_dir).report
    out.write_text("\n".join(lines))
    return out


def endpoint_lifetime(result: PipelineResult) -> list[str]:
    """Plain sentences for the terminal and report.md: does the endpoint outlive the command, and
    which command brings it back. Commands are in backticks."""
    ep = result.endpoint
    if ep is None:
        return []
    args = result.invocation.config_args
    serve_args = [*args, "--set", f"serve.api_key_file={ep.key_file}"] if ep.key_file else args
    again = f"`{shlex.join(['raylm', 'serve', *serve_args])}`"
    chat = f"`{shlex.join(['raylm', 'chat', *args])}`"
    if not result.embedded:
        return [
            f"The endpoint {ep.base_url} keeps running on the Ray cluster this command joined "
            f"(Serve application `{SERVE_APP_NAME}`); chat with it: "
            f"`raylm chat --base-url {ep.base_url}`.",
        ]
    if result.invocation.keep_serving:
        when = "was served until the command was interrupted (--keep-serving), then stopped with it"
    else:
        when = "stopped when the command ended"
    return [
        f"The endpoint {ep.base_url} ran on this command's embedded Ray and {when}.",
        f"Bring it back: {again}; or chat with the model: {chat} (it starts its own endpoint).",
        f"To keep it up after the pipeline: `{shlex.join(['raylm', 'pipeline', *args])} --keep-serving`.",
    ]
