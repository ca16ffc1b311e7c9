"""Fine-tuning data: chat-template encoding, prompt masking, packing, and the Ray Data transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.sft_data import (
    IGNORE_INDEX,
    SftDataError,
    encode_causal,
    encode_chat,
    encode_seq2seq,
    load_records,
    masked_lm_loss,
    sft_dataset,
)

PAIR = [
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Open settings and choose reset password."},
]


def test_labels_are_ignored_exactly_on_prompt_positions(tokenizer):
    ids, labels = encode_chat(tokenizer, PAIR)
    prompt = tokenizer(
        tokenizer.apply_chat_template(PAIR[:1], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    whole = tokenizer(tokenizer.apply_chat_template(PAIR, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    assert ids == whole
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    learned = tokenizer.decode(ids[len(prompt) :])
    assert learned.startswith(PAIR[1]["content"]) and "<|end|>" in learned


def test_multi_turn_learns_every_assistant_turn_and_nothing_else(tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        *PAIR,
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, labels = encode_chat(tokenizer, conv)
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    text = tokenizer.decode(learned)
    assert "Open settings" in text and "You are welcome." in text
    assert "Be brief" not in text and "Thanks" not in text and "reset my password" not in text
    assert text.count("<|end|>") == 2


def test_prompt_positions_contribute_nothing_to_the_loss():
    """On a crafted batch, prompt positions' logits and labels can change freely: the loss does not."""
    torch.manual_seed(0)
    vocab, length = 11, 9
    labels = torch.randint(0, vocab, (2, length))
    labels[0, :4] = IGNORE_INDEX  # prompt of row 0: positions 0-3
    labels[1, :6] = IGNORE_INDEX  # prompt of row 1: positions 0-5
    logits = torch.randn(2, length, vocab)
    loss = masked_lm_loss(logits, labels)

    # Logits at position t predict label t+1: those predicting prompt labels are positions 0-2 and 0-4.
    changed = logits.clone()
    changed[0, :3] = torch.randn(3, vocab) * 10
    changed[1, :5] = torch.randn(5, vocab) * 10
    assert torch.equal(masked_lm_loss(changed, labels), loss)

    # Whatever tokens the prompt holds, once masked they are not targets.
    relabelled = labels.clone()
    relabelled[0, :4] = IGNORE_INDEX
    assert torch.equal(masked_lm_loss(logits, relabelled), loss)

    # And the loss is exactly the mean cross-entropy over the response positions alone.
    terms = [
        F.cross_entropy(logits[r, t - 1], labels[r, t])
        for r in range(2)
        for t in range(1, length)
        if labels[r, t] != IGNORE_INDEX
    ]
    assert torch.allclose(loss, torch.stack(terms).mean())

    # A response position does matter (the test can fail).
    moved = logits.clone()
    moved[0, 5] += torch.randn(vocab) * 10
    assert not torch.equal(masked_lm_loss(moved, labels), loss)


def test_loss_on_model_ignores_prompt_tokens(tiny_llama_dir, tokenizer):
    """Through a real model: the loss of an encoded row equals CE over the assistant tokens only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = encode_causal(tokenizer, [{"messages": PAIR}], seq_len=64, packing=False)
    ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
    mask = torch.tensor(rows["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF's own shifted, masked CE
    assert torch.allclose(masked_lm_loss(logits, labels), ref, atol=1e-5)


def test_packing_keeps_examples_whole_and_padding_one_per_row(tokenizer):
    records = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": f"answer {i}."},
            ]
        }
        for i in range(10)
    ]
    single = [encode_chat(tokenizer, r["messages"]) for r in records]
    lengths = [len(ids) for ids, _ in single]
    seq_len = max(lengths) * 3
    packed = encode_causal(tokenizer, records, seq_len, packing=True)
    padded = encode_causal(tokenizer, records, seq_len, packing=False)
    assert padded["input_ids"].shape == (10, seq_len)
    assert packed["input_ids"].shape[0] < 10
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum() == sum(lengths)
    # The concatenation of the packed rows' real tokens is the examples in order, none split.
    flat = np.concatenate(
        [row[mask == 1] for row, mask in zip(packed["input_ids"], packed["attention_mask"], strict=True)]
    )
    assert flat.tolist() == [t for ids, _ in single for t in ids]
    flat_labels = np.concatenate(
        [row[mask == 1] for row, mask in zip(packed["labels"], packed["attention_mask"], strict=True)]
    )
    assert flat_labels.tolist() == [t for _, labels in single for t in labels]
    assert (packed["labels"][packed["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (packed["input_ids"][packed["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_seq2seq_rows(tokenizer):
    rows = encode_seq2seq(tokenizer, [{"messages": PAIR}], source_len=32, target_len=24)
    src = rows["input_ids"][0][rows["attention_mask"][0] == 1].tolist()
    tgt = rows["labels"][0][rows["labels"][0] != IGNORE_INDEX].tolist()
    assert src[-1] == tgt[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(src[:-1]) == PAIR[0]["content"]
    assert tokenizer.decode(tgt[:-1]) == PAIR[1]["content"]


def test_records_are_read_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "a?", "response": "b."})
        + "\n\n"
        + json.dumps({"input": "x", "output": "y"})
        + "\n"
        + json.dumps({"messages": PAIR})
        + "\n"
    )
    records = load_records([str(good)])
    assert [r["messages"][-1]["content"] for r in records] == ["b.", "y", PAIR[1]["content"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a?", "response": "b."}) + "\n{not json\n")
    with pytest.raises(SftDataError, match=r"bad.jsonl:2: not valid JSON"):
        load_records([str(bad)])
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "a?", "answer": "b."}) + "\n")
    with pytest.raises(SftDataError, match=r"wrong.jsonl:1: 'prompt' and 'response' must both be strings"):
        load_records([str(wrong)])


def test_ray_data_transform_produces_training_columns(ray_cluster, tokenizer_dir, tokenizer):
    records = [
        {
            "messages": [
                {"role": "user", "content": f"where is order {i}?"},
                {"role": "assistant", "content": f"order {i} ships today."},
            ]
        }
        for i in range(40)
    ]
    rows = sft_dataset(records, str(tokenizer_dir), seq_len=48, packing=True, batch_records=16).take_all()
    assert rows and set(rows[0]) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert all(len(r["input_ids"]) == 48 for r in rows)
    expected = sum(len(encode_chat(tokenizer, r["messages"])[0]) for r in records)
    assert sum(int(np.sum(r["attention_mask"])) for r in rows) == expected


def test_packed_example_logits_equal_its_logits_alone(tiny_llama_dir, tokenizer):
    """Inside a packed row each example attends only to itself, at positions from 0: its logits match
    a forward pass of that example alone (fp32 on CPU; 1e-5 absorbs the different matmul shapes).
    The old packing (one all-ones mask, continuous positions) is checked to differ, so this can fail."""
    from transformers import AutoModelForCausalLM

    from jobs.finetune import sft_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Where is my order?", "Track it."), ("Can I get a refund?", "Yes, in thirty days."),
                     ("Reset my password?", "Open settings.")]
    ]
    examples = [encode_chat(tokenizer, r["messages"])[0] for r in records]
    seq_len = sum(map(len, examples)) + 5  # all three in one row, plus a padding tail
    rows = encode_causal(tokenizer, records, seq_len, packing=True)
    assert rows["input_ids"].shape == (1, seq_len)
    starts = np.cumsum([0] + [len(e) for e in examples])
    assert rows["position_ids"][0].tolist() == [p for e in examples for p in range(len(e))] + list(range(5))
    batch = {k: torch.tensor(v) for k, v in rows.items()}
    with torch.no_grad():
        packed = sft_logits(model, batch)[0]
        naive = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        for ids, start in zip(examples, starts, strict=False):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=0, atol=1e-5)
            if start > 0:  # the old packing lets later examples see earlier ones
                assert (naive[start : start + len(ids)] - alone).abs().max() > 1e-3
