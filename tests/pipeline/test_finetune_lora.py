"""LoRA fine-tuning through the shared loop: train → merge → export reloads with `from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cluster.config import load_config
from jobs.checkpointing import newest_complete
from jobs.export import consolidated_state_dict
from jobs.train_loop import PROBE_FILE


def write_pairs(path: Path, n: int, offset: int = 0) -> str:
    with path.open("w") as f:
        for i in range(offset, offset + n):
            f.write(
                json.dumps({"prompt": f"Where is order {i}?", "response": f"Order {i} ships today."}) + "\n"
            )
    return str(path)


def test_lora_train_merge_export_reloads_with_merged_logits(ray_cluster, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from jobs.finetune import run

    train = write_pairs(tmp_path / "train.jsonl", 48)
    held_out = write_pairs(tmp_path / "eval.jsonl", 8, offset=100)
    cfg = load_config(
        None,
        [
            f"cluster.storage_path={tmp_path}",
            "cluster.run_name=lora",
            f"finetune.base={tiny_llama_dir}",
            "finetune.method=lora",
            "finetune.lora_r=4",
            "finetune.lora_alpha=8",
            f"finetune.paths=[{train}]",
            f"finetune.eval_paths=[{held_out}]",
            "finetune.max_steps=6",
            "finetune.lr=0.02",
            "finetune.warmup_steps=0",
            "finetune.micro_batch_size=4",
            "finetune.max_seq_len=64",
            "finetune.log_every=1",
            "finetune.eval_every=3",
            "finetune.checkpoint_every=3",
            "train.num_workers=2",
        ],
    )
    out = run(cfg, progress=False)

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    names = set(load_file(str(out / "model.safetensors")))
    assert not any("lora" in n or "base_layer" in n for n in names), "adapters must be merged, not saved"

    # The final checkpoint holds the logits the trained (unmerged, adapter-carrying) model gave on a
    # fixed input; the merged export must give the same.
    ckpt = newest_complete(tmp_path / "lora" / "finetune")
    probe = load_file(str(ckpt / PROBE_FILE))
    with torch.no_grad():
        merged_logits = exported(input_ids=probe["input_ids"]).logits
        base_logits = base(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(merged_logits, probe["logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3), "LoRA training changed nothing"

    # Merging by hand from the trained adapters: W' = W + (alpha / r) * B @ A on every target module,
    # and every other weight is exactly the base model's.
    state = consolidated_state_dict(ckpt)
    merged = exported.state_dict()
    for name, weight in base.state_dict().items():
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = "base_model.model." + name.removesuffix(".weight")
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            torch.testing.assert_close(merged[name], weight + (8 / 4) * b @ a, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(merged[name], weight), f"{name} is not a LoRA target but changed"
