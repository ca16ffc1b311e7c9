"""Consolidate a training checkpoint (DeepSpeed ZeRO shards) into a Hugging Face model folder.

`raylm export SRC OUT` (or `python -m cluster.run_stage export --config run.yaml`: the run's pretraining
into `<run>/export/pretrained`) where SRC is a checkpoint folder, a stage folder holding
`checkpoint_*` folders (`runs/demo/pretrain`), a run folder (`runs/demo`, its pretrain stage), or a
run name looked up under `cluster.storage_path`. Only complete checkpoints are used. The output
(config.json, generation_config.json, model*.safetensors, tokenizer files) loads with
`AutoModelForCausalLM.from_pretrained(OUT)` and is all that serving needs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from data_pipelines.layout import Stage
from jobs.checkpointing import HF_SUBDIR, incompleteness, newest_complete, read_meta

log = logging.getLogger(__name__)
DEFAULT_STAGE = Stage.PRETRAIN


class ExportError(Exception):
    """SRC does not name a usable checkpoint; the message says what was looked for."""


def resolve_checkpoint(
    src: str | Path, storage_path: str | Path = "runs", stage: str = DEFAULT_STAGE
) -> Path:
    """The complete checkpoint SRC names (see the module docstring for the accepted forms)."""
    p = Path(src)
    if (p / "raylm_meta.json").exists() or p.name.startswith("checkpoint_"):
        reason = incompleteness(p)
        if reason:
            raise ExportError(f"{p} is not a complete checkpoint: {reason}")
        return p
    for stage_dir in (p, p / stage, Path(storage_path) / str(src) / stage):
        if stage_dir.is_dir() and any(stage_dir.glob("checkpoint_*")):
            found = newest_complete(stage_dir)
            if found is None:
                raise ExportError(f"{stage_dir} holds checkpoints but none is complete")
            return found
    raise ExportError(
        f"{src}: not a checkpoint folder, a stage folder with checkpoint_* folders, a run folder, or a run "
        f"name under {storage_path}"
    )


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from the ranks' shards (any ZeRO stage)."""
    meta = read_meta(ckpt)
    if meta["zero_stage"] == 0:
        path = ckpt / meta["tag"] / "mp_rank_00_model_states.pt"
        states = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=meta["tag"])


def load_checkpoint_model(ckpt: str | Path) -> torch.nn.Module:
    """The checkpoint's model as a transformers module in fp32, weights consolidated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Path(ckpt)
    config = AutoConfig.from_pretrained(ckpt / HF_SUBDIR, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ExportError(f"{ckpt}: weights do not match the model (missing {missing}, extra {unexpected})")
    model.tie_weights()
    return model.eval()


def export(
    src: str | Path, out: str | Path, storage_path: str | Path = "runs", max_shard_size: str = "2GB"
) -> Path:
    """Write the HF folder for SRC's newest complete checkpoint to OUT (replacing OUT)."""
    from transformers import GenerationConfig

    ckpt = resolve_checkpoint(src, storage_path)
    model = load_checkpoint_model(ckpt)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for f in (ckpt / HF_SUBDIR).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    log.info("exported %s (step %s) to %s", ckpt, read_meta(ckpt)["step"], out)
    return out
