"""Held-out evaluation of exported models: perplexity, exact match, token F1 and sample answers.

`raylm eval run.yaml` (or `python -m cluster.run_stage eval --config run.yaml`) scores every export of the
run that exists — the pretrained-only model and the fine-tuned one — on the same held-out data, so
the report can show what fine-tuning bought. Answers are decoded greedily, which makes the scores a
property of the model alone. Results land in `<run_dir>/eval/results.json` and `results.md`.

Exact match and token F1 follow the SQuAD definitions: both strings are lower-cased, stripped of
punctuation and whitespace-normalised; F1 is the harmonic mean of token precision and recall over
the bag of tokens.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipelines.layout import EXPORT_NAMES, RunLayout
from jobs.config import EvalConfig, RunSections
from jobs.sft_data import eval_pair_paths, load_records, pair_of, stop_token_ids

MODEL_NAMES = tuple(reversed(EXPORT_NAMES))  # before fine-tuning, then after
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


# ---- metrics -----------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: formatting must not decide a match."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalised tokens (as a bag)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def perplexity(model: Any, blocks: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, float]:
    """exp(mean next-token negative log-likelihood) over every block, each scored on its own.

    Blocks may differ in length; padding positions are excluded from both the sum and the count.
    """
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        chunk = [list(b) for b in blocks[start : start + batch_size] if len(b) >= 2]
        if not chunk:
            continue
        width = max(len(b) for b in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, b in enumerate(chunk):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        return {"perplexity": float("nan"), "nll_per_token": float("nan"), "tokens": 0}
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": total_tokens}


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    n = len(references)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n if n else float("nan"),
        "token_f1": sum(map(token_f1, predictions, references)) / n if n else float("nan"),
        "examples": n,
    }


# ---- models ------------------------------------------------------------------------------------------
def load_model(folder: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an exported folder; encoder-decoders load as seq2seq models."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from data_pipelines.tokenizer import load_tokenizer

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32)
    return model.eval(), load_tokenizer(folder)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to each conversation (chat template for decoders, joined turns for seq2seq)."""
    seq2seq = bool(model.config.is_encoder_decoder)
    stops = stop_token_ids(tokenizer)
    answers: list[str] = []
    tokenizer.padding_side = "left"
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        if seq2seq:
            texts = ["\n".join(m["content"] for m in conv) + tokenizer.eos_token for conv in chunk]
            limit = 512
        else:
            texts = [
                tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                for conv in chunk
            ]
            limit = max(8, model.config.max_position_embeddings - max_new_tokens)
        tokenizer.truncation_side = "left"
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="pt",
        )
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out if seq2seq else out[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def text_blocks(tokenizer: Any, texts: Sequence[str], block_len: int, max_tokens: int) -> list[list[int]]:
    """Held-out documents → blocks of at most `block_len` tokens (eos between documents), capped in total."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    return [stream[i : i + block_len] for i in range(0, len(stream), block_len)]


def evaluate_model(
    folder: str | Path, records: Sequence[dict[str, Any]], texts: Sequence[str], cfg: EvalConfig
) -> dict[str, Any]:
    """Every metric of one exported model on the held-out pairs and text."""
    started = time.perf_counter()
    model, tokenizer = load_model(folder)
    pairs = [pair_of(r) for r in records[: cfg.max_examples]]
    conversations, references = [c for c, _ in pairs], [a for _, a in pairs]
    predictions = generate_answers(model, tokenizer, conversations, cfg.max_new_tokens, cfg.batch_size)
    result: dict[str, Any] = {"path": str(folder), **score_answers(predictions, references)}
    if not model.config.is_encoder_decoder and texts:
        block = min(512, model.config.max_position_embeddings)
        result.update(perplexity(model, text_blocks(tokenizer, texts, block, cfg.max_ppl_tokens)))
    result["samples"] = [
        {"prompt": conv[-1]["content"], "reference": ref, "prediction": pred}
        for conv, ref, pred in list(zip(conversations, references, predictions, strict=True))[
            : cfg.num_samples
        ]
    ]
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


# ---- reporting ---------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """The evaluation table (one row per model) and the sample generations, as Markdown."""
    lines = [
        "| model | exact match | token F1 | perplexity | examples |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | {_fmt(r['exact_match'])} | {_fmt(r['token_f1'])} | "
            f"{_fmt(r.get('perplexity'), 2)} | {r['examples']} |"
        )
    for name, r in results["models"].items():
        if r["samples"]:
            lines += ["", f"**Sample answers — {name}**", ""]
            for s in r["samples"]:
                lines += [
                    f"- **Q:** {s['prompt']}",
                    f"  - reference: {s['reference']}",
                    f"  - answer: {s['prediction'] or '(empty)'}",
                ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(results, indent=2))
    md.write_text("# Evaluation\n\n" + results_markdown(results))
    return js, md


# ---- held-out data ------------------------------------------------------------------------------------
def _val_text(batch: Any) -> Any:
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(batch.column("reason"), ""), batch.column("val"))
    return batch.filter(keep).select(["text"])


def heldout_texts(cfg: Any, max_chars: int | None = None) -> list[str]:
    """Text for perplexity: `eval.text_paths`, else the corpus documents the data split held out.

    The validation split is decided per document by content hash (data_pipelines.cleaning.is_val), so
    these documents were never trained on, for any model trained on this run's data.
    """
    from data_pipelines.pipeline import documents, resolve_corpus

    max_chars = max_chars or cfg.eval.max_ppl_tokens * 8
    if cfg.eval.text_paths:
        data = cfg.data.model_copy(update={"paths": list(cfg.eval.text_paths), "val_fraction": 0.999999})
    else:
        data = cfg.data
    data, files = resolve_corpus(data, cfg.run_dir())
    texts, total = [], 0
    for batch in (
        documents(data, files)
        .map_batches(_val_text, batch_size=None, batch_format="pyarrow")
        .iter_batches(batch_size=256, batch_format="pyarrow")
    ):
        for text in batch.column("text").to_pylist():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


# ---- entry point -------------------------------------------------------------------------------------
def run(cfg: RunSections) -> dict[str, Any]:
    """Evaluate every export of the run on the held-out data; returns and writes the results."""
    from rich.console import Console

    console = Console()
    layout = RunLayout(Path(cfg.run_dir()))
    exports = {name: layout.export(name) for name in MODEL_NAMES}
    exports = {name: path for name, path in exports.items() if (path / "config.json").is_file()}
    if not exports:
        raise FileNotFoundError(f"nothing to evaluate: no exported model under {layout.exports_root}")
    records = load_records(eval_pair_paths(cfg))
    texts = heldout_texts(cfg)
    torch.manual_seed(0)
    results: dict[str, Any] = {"models": {}}
    for name, path in exports.items():
        with console.status(
            f"evaluating {name} model on {min(len(records), cfg.eval.max_examples)} held-out pairs"
        ):
            results["models"][name] = evaluate_model(path, records, texts, cfg.eval)
        r = results["models"][name]
        console.print(
            f"[bold]{name}[/]: exact match {_fmt(r['exact_match'])}, token F1 {_fmt(r['token_f1'])}, "
            f"perplexity {_fmt(r.get('perplexity'), 2)} ({r['seconds']} s)"
        )
    js, md = write_results(results, layout.eval_dir)
    console.print(f"results: {js} and {md}")
    return results
