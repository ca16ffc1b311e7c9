"""Text-to-text: a tiny T5 built from a config, fine-tuned through the shared loop, learns a toy mapping
(copy a few-letter string)."""

from __future__ import annotations

import itertools
import json
import random

from cluster.config import load_config
from jobs.metrics import read_metrics

LETTERS = "abcde"


def test_tiny_t5_learns_to_copy_letter_strings(ray_cluster, tokenizer_dir, tmp_path):
    from jobs.evaluate import generate_answers, load_model, score_answers
    from jobs.finetune import run

    triples = [" ".join(t) for t in itertools.product(LETTERS, repeat=3)]
    random.Random(0).shuffle(triples)
    pairs = [{"input": t, "output": t} for t in triples]
    train, held_out = pairs[:100], pairs[100:]
    for name, rows in (("train", train), ("eval", held_out)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    model = "{model_type: t5, d_model: 64, d_ff: 128, num_layers: 2, num_heads: 4, d_kv: 16}"
    cfg = load_config(
        None,
        [
            f"cluster.storage_path={tmp_path}",
            "cluster.run_name=t5",
            f"tokenizer.path={tokenizer_dir}",
            "finetune.task=seq2seq",
            f"finetune.seq2seq_model={model}",
            f"finetune.paths=[{tmp_path / 'train.jsonl'}]",
            f"finetune.eval_paths=[{tmp_path / 'eval.jsonl'}]",
            "finetune.max_steps=200",
            "finetune.lr=3e-3",
            "finetune.warmup_steps=20",
            "finetune.micro_batch_size=25",
            "finetune.max_seq_len=16",
            "finetune.max_target_len=12",
            "finetune.log_every=20",
            "finetune.eval_every=100",
            "finetune.checkpoint_every=200",
            "finetune.num_workers=1",
        ],
    )
    out = run(cfg, progress=False)

    losses = [r["loss"] for r in read_metrics(tmp_path / "t5" / "finetune") if r["event"] == "train"]
    assert losses[-1] < 0.15 * losses[0], losses

    t5, tok = load_model(out)
    assert t5.config.is_encoder_decoder

    def score(rows):
        questions = [[{"role": "user", "content": p["input"]}] for p in rows]
        answers = generate_answers(t5, tok, questions, max_new_tokens=12)
        return score_answers(answers, [p["output"] for p in rows]), answers

    seen, answers = score(train[:25])
    # an untrained model scores ~0; trained, it scored 0.48 in one run on the loaded 2-core machine
    assert seen["exact_match"] >= 0.4, list(zip(answers, train, strict=False))[:5]
    # Strings it never saw: the right letters come out (the order of unseen strings needs a bigger
    # model or more steps than a unit test affords; an untrained model scores ~0 here).
    unseen, answers = score(held_out)
    assert unseen["token_f1"] >= 0.8, list(zip(answers, held_out, strict=True))[:5]
