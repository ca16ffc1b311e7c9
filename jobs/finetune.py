"""Supervised fine-tuning job: chat pairs → the shared Ray Train + DeepSpeed loop → merged HF export.

`raylm finetune run.yaml [--set finetune.method=lora] [--resume]` (or `python -m cluster.run_stage
finetune --config run.yaml`). The model starts from `finetune.base`: a Hugging Face folder, or a raylm
run folder (its `export/pretrained`, exported from its newest pretraining checkpoint if need be);
by default this run's own pretrained export. Training goes through `jobs.train_loop` exactly like
pretraining (DeepSpeed engine, validation on the held-out pairs, metrics, complete-only checkpoints,
automatic resume); only the model builder, the loss and the data differ:

- causal LMs learn the assistant turns of the chat template (prompt tokens are labelled -100);
- `finetune.method: lora` wraps the attention projections with `peft` LoRA adapters and trains only
  those; the export merges them into the base weights, so serving sees a plain model;
- `finetune.task: seq2seq` trains an encoder-decoder (`AutoModelForSeq2SeqLM`, T5-style) on
  input → output pairs, from `base` or from the `finetune.seq2seq_model` config.

The result lands in `<run>/export/finetuned`; curves and checkpoints in `<run>/finetune/`.
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from data_pipelines.layout import RunLayout, Stage
from jobs.config import RunSections, ScheduleConfig
from jobs.sft_data import (
    IGNORE_INDEX,
    load_records,
    masked_lm_loss,
    pair_paths,
    sft_dataset,
    stop_token_ids,
)

log = logging.getLogger(__name__)
console = Console()
STAGE = Stage.FINETUNE


class FinetuneError(ValueError):
    """A fine-tuning setup problem the user can fix (the message names the config field)."""


# ---- losses and token counts (module level: they are pickled to the workers) ------------------------
def sft_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of packed rows, each example attending only to itself (see jobs/sft_data.py).

    Position ids and no attention mask make transformers build the block-diagonal mask; it does so
    only without a KV cache, so `use_cache=False` (an exported base model has the cache switched on).
    """
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss on the assistant tokens only (labels are -100 elsewhere)."""
    return masked_lm_loss(sft_logits(model, batch), batch["labels"])


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder-decoder's own loss: it shifts `labels` right to feed the decoder and ignores -100."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def count_sft_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens processed: encoder/prompt side plus learned targets for seq2seq."""
    tokens = int(batch["attention_mask"].sum())
    if batch["labels"].shape != batch["input_ids"].shape:
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return tokens


# ---- models -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def peft_config(self, seq2seq: bool) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
            bias="none",
        )


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FinetuneError(
            f"finetune.base: {folder} holds no *.safetensors weights (only safetensors are loaded)"
        )
    return files


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy a folder's safetensors weights into `model`, also when ZeRO-3 has partitioned its parameters.

    `from_pretrained` inside `deepspeed.zero.Init` would build empty partitioned tensors and load into
    nothing, so the weights are copied parameter by parameter through `GatheredParameters`, which
    re-partitions them from rank 0 (and is a no-op for ordinary, unpartitioned parameters).
    """
    import deepspeed
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for f in _weight_files(Path(folder)):
        handle = safe_open(str(f), framework="pt")
        tensors.update({k: handle for k in handle.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    missing = []
    for name, param in model.named_parameters():
        if name not in tensors:
            missing.append(name)
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.data.copy_(tensors[name].get_tensor(name).to(param.dtype))
    if missing:
        raise FinetuneError(
            f"finetune.base: {folder} lacks weights for {missing[:5]} ({len(missing)} in all)"
        )


def _tokenizer_ids(tokenizer_dir: str) -> dict[str, int]:
    from data_pipelines.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }


def model_config(base: str | None, seq2seq_model: dict[str, Any], tokenizer_dir: str) -> Any:
    """The transformers config to fine-tune: the base folder's, or a fresh encoder-decoder's."""
    from transformers import AutoConfig

    if base is not None:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
    else:
        kwargs = dict(seq2seq_model)
        model_type = kwargs.pop("model_type", "t5")
        ids = _tokenizer_ids(tokenizer_dir)
        kwargs = {**ids, "decoder_start_token_id": ids["pad_token_id"], **kwargs}
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError) as exc:
            raise FinetuneError(f"finetune.seq2seq_model: {exc}") from None
        if not config.is_encoder_decoder:
            raise FinetuneError(
                f"finetune.seq2seq_model: model_type {model_type!r} is not an encoder-decoder"
            )
    config.use_cache = False
    return config


def build_model(config: Any, base: str | None, lora: LoraSettings | None) -> torch.nn.Module:
    """The model every worker trains (called inside `zero.Init` under ZeRO-3): base weights, then LoRA."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    if base is not None:
        load_weights(model, base)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config(config.is_encoder_decoder))
    return model


# ---- locating inputs ----------------------------------------------------------------------------------
def resolve_base(cfg: RunSections) -> Path | None:
    """The HF folder fine-tuning starts from (None: a fresh seq2seq model from its config)."""
    ft = cfg.finetune
    if ft.base is None and ft.task == "seq2seq":
        return None
    base = Path(ft.base) if ft.base else Path(cfg.run_dir())
    if (base / "config.json").is_file():
        return base
    layout = RunLayout(base)
    exported = layout.pretrained
    if (exported / "config.json").is_file():
        return exported
    if layout.stage_dir(Stage.PRETRAIN).is_dir():
        from jobs.export import ExportError, export

        try:
            return export(layout.stage_dir(Stage.PRETRAIN), exported)
        except ExportError as exc:
            raise FinetuneError(f"finetune.base: cannot export {base}: {exc}") from None
    what = f"finetune.base: {ft.base}" if ft.base else f"finetune.base (default: this run, {base})"
    raise FinetuneError(
        f"{what} is neither a Hugging Face folder (config.json) nor a raylm run with a pretrained model; "
        "run `raylm train` first or point finetune.base at a model folder"
    )


def tokenizer_dir_for(cfg: RunSections, base: Path | None) -> str:
    """The base model's own tokenizer, else `tokenizer.path`, else this run's (trained if need be)."""
    if base is not None and (base / "tokenizer.json").is_file():
        return str(base)
    if cfg.tokenizer.path:
        return cfg.tokenizer.path
    from data_pipelines.pipeline import ensure_tokenizer, resolve_corpus

    data, files = resolve_corpus(cfg.data, cfg.run_dir())
    return ensure_tokenizer(data, cfg.tokenizer, cfg.run_dir(), files)


# ---- the stage ----------------------------------------------------------------------------------------
def finetune_train_config(cfg: RunSections) -> Any:
    """The `train` section with the fine-tuning schedule; LoRA stays at ZeRO <= 2 (see note below).

    peft initialises its adapters after the base layers exist; under ZeRO-3's `zero.Init` those
    initialisers would write into empty partitions, so LoRA runs with stage 2 (the frozen base is
    small next to the optimizer state it no longer needs).
    """
    ft = cfg.finetune
    update = {name: getattr(ft, name) for name in ScheduleConfig.model_fields}
    update["num_workers"] = ft.num_workers or cfg.train.num_workers
    if ft.method == "lora" and cfg.train.zero_stage == 3:
        update |= {"zero_stage": 2, "offload_params": False}
    return cfg.train.model_copy(update=update)


def loop_spec(cfg: RunSections, base: Path | None, tokenizer_dir: str) -> Any:
    from jobs.train_loop import LoopSpec

    ft = cfg.finetune
    config = model_config(str(base) if base else None, ft.seq2seq_model, tokenizer_dir)
    seq2seq = bool(config.is_encoder_decoder)
    if ft.task == "causal" and seq2seq:
        raise FinetuneError(f"finetune.task: base {base} is an encoder-decoder; set finetune.task: seq2seq")
    if ft.task == "seq2seq" and not seq2seq:
        raise FinetuneError(f"finetune.task: base {base} is a decoder-only model; set finetune.task: causal")
    if not seq2seq and ft.max_seq_len > config.max_position_embeddings:
        raise FinetuneError(
            f"finetune.max_seq_len ({ft.max_seq_len}) exceeds the base model's context "
            f"({config.max_position_embeddings})"
        )
    lora = None
    if ft.method == "lora":
        lora = LoraSettings(ft.lora_r, ft.lora_alpha, ft.lora_dropout, tuple(ft.lora_target_modules))
    return LoopSpec(
        stage=STAGE,
        run_dir=str(Path(cfg.run_dir()).resolve()),
        train=finetune_train_config(cfg),
        build_model=functools.partial(build_model, config, str(base) if base else None, lora),
        seq_len=ft.max_seq_len,
        loss_fn=seq2seq_loss if seq2seq else sft_loss,
        count_tokens=count_sft_tokens,
        columns=("input_ids", "labels", "attention_mask") + (() if seq2seq else ("position_ids",)),
        tokenizer_dir=tokenizer_dir,
        config_hash=cfg.section_hash("finetune"),
        extra_meta={"method": ft.method, "task": ft.task, "base": str(base) if base else None},
        shuffle=cfg.data.shuffle,
        shuffle_blocks=True,  # sft_dataset materialises the encoded rows
    )


def generation_config(tokenizer_dir: str, seq2seq: bool) -> Any:
    """Greedy-by-default generation that stops at the end of the assistant turn (`<|end|>`) or eos."""
    from transformers import GenerationConfig

    from data_pipelines.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    kwargs = {
        "eos_token_id": stop_token_ids(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    if seq2seq:
        kwargs["decoder_start_token_id"] = tok.pad_token_id
    return GenerationConfig(**kwargs)


def export_finetuned(spec: Any, ckpt: Path, out: Path) -> Path:
    """Consolidate the ZeRO shards into the training model, merge LoRA adapters, save an HF folder."""
    from jobs.export import consolidated_state_dict

    model = spec.build_model()  # outside zero.Init: an ordinary module with the same parameter names
    state = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    if set(missing) & params or unexpected:
        raise FinetuneError(
            f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})"
        )
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.generation_config = generation_config(spec.tokenizer_dir, bool(model.config.is_encoder_decoder))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    from data_pipelines.tokenizer import load_tokenizer

    load_tokenizer(spec.tokenizer_dir).save_pretrained(out)
    return out


def run(cfg: RunSections, resume: bool = False, progress: bool = True) -> Path:
    """The whole stage: resolve base and data, train through the shared loop, export; returns the export."""
    from jobs.metrics import plot_loss_curve, read_metrics, summary_table
    from jobs.train_loop import final_checkpoint, fit

    ft = cfg.finetune
    base = resolve_base(cfg)
    base = base.resolve() if base else None  # workers run elsewhere: no cwd-relative paths
    tokenizer_dir = str(Path(tokenizer_dir_for(cfg, base)).resolve())
    spec = loop_spec(cfg, base, tokenizer_dir)
    train_paths, eval_paths = pair_paths(cfg)
    train_records, eval_records = load_records(train_paths), load_records(eval_paths)
    console.print(
        f"fine-tuning ({ft.method}, {ft.task}) from [bold]{base or 'a fresh ' + ft.task + ' model'}[/] "
        f"on {len(train_records)} pairs, validating on {len(eval_records)} held-out pairs"
    )
    seq2seq = ft.task == "seq2seq"
    make = functools.partial(
        sft_dataset,
        tokenizer_dir=tokenizer_dir,
        seq_len=ft.max_seq_len,
        packing=ft.packing,
        seq2seq=seq2seq,
        target_len=ft.max_target_len,
    )
    train = spec.train
    consumed = train.max_steps * train.grad_accum_steps * train.micro_batch_size * train.num_workers
    datasets = {"train": make(train_records, min_rows=consumed, seed=ft.seed), "val": make(eval_records)}
    fit(spec, datasets, resume=resume, progress=progress)
    records = read_metrics(spec.out_dir)
    if records:
        plot_loss_curve(records, spec.out_dir / "loss_curve.png")
        console.print(summary_table(records, f"fine-tune · {cfg.run_name}"))
    out = export_finetuned(spec, final_checkpoint(spec), RunLayout(Path(spec.run_dir)).finetuned)
    console.print(f"exported fine-tuned model to [bold]{out}[/]")
    return out
