"""Supervised fine-tuning data: prompt/response pairs or chat messages → fixed-length training rows.

Records are rendered through the tokenizer's own chat template, so fine-tuning sees exactly the text
the serving endpoint will build from a chat request. Only assistant turns are learned: every other
position carries the label -100, which the loss ignores. Examples are either packed several to a row
(little padding, fast on CPU) or padded one to a row. The tokenising and packing run as a Ray Data
`map_batches` transform, producing the columns `input_ids`, `labels`, `attention_mask` and
`position_ids` that the shared training loop reads with `iter_torch_batches`.

A packed row must train each example exactly as if it were alone: `position_ids` restart at 0 for
every example (and for the padding tail), and the model is called with those position ids and no
2-D attention mask. transformers then reads each restart as a sequence boundary and builds a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`, for eager and sdpa; flash
attention gets the same boundaries as variable-length sequences), so no token attends to another
example and every example sees the positions it will see at serving time.

Encoder-decoder models get the same treatment without a chat template: `input_ids` is the source
text, `labels` the target text, each ended by eos.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from data_pipelines.layout import RunLayout

IGNORE_INDEX = -100
RECORD_COLUMN = "record"
COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")
RECORD_SHAPES = (
    "a record is {'prompt','response'}, {'input','output'} or {'messages': [{'role','content'}, ...]}"
)


class SftDataError(ValueError):
    """A fine-tuning data file the user must fix; the message names the file and line."""


# ---- reading ---------------------------------------------------------------------------------------
def _normalise(record: Any, where: str) -> dict[str, Any]:
    """One record as {'messages': [...]}; pairs become a user turn and an assistant turn."""
    if not isinstance(record, dict):
        raise SftDataError(f"{where}: expected a JSON object; {RECORD_SHAPES}")
    if "messages" in record:
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise SftDataError(
                f"{where}: 'messages' must be a non-empty list of {{'role','content'}} strings"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise SftDataError(f"{where}: 'messages' has no assistant turn to learn from")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for src, tgt in (("prompt", "response"), ("input", "output")):
        if src in record or tgt in record:
            if not (isinstance(record.get(src), str) and isinstance(record.get(tgt), str)):
                raise SftDataError(f"{where}: '{src}' and '{tgt}' must both be strings")
            return {
                "messages": [
                    {"role": "user", "content": record[src]},
                    {"role": "assistant", "content": record[tgt]},
                ]
            }
    raise SftDataError(f"{where}: unknown record with keys {sorted(record)}; {RECORD_SHAPES}")


def _read_text(path: str) -> str:
    """Local paths and pyarrow URIs (s3://, gs://, file://) alike."""
    if "://" not in path:
        return Path(path).read_text(encoding="utf-8")
    fs, inner = pafs.FileSystem.from_uri(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def load_records(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Every record of the jsonl files, normalised to chat messages; a bad line fails naming file:line.

    SFT sets are small (thousands of pairs), so they are read and validated on the driver before any
    work is scheduled: a typo fails in a second, not inside a Ray task.
    """
    records = []
    for path in paths:
        try:
            text = _read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise SftDataError(f"{path}: cannot read fine-tuning data: {exc}") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SftDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            records.append(_normalise(raw, f"{path}:{lineno}"))
    if not records:
        raise SftDataError(f"no fine-tuning records found in {list(paths)}")
    return records


def pair_of(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Split a normalised record into (conversation up to the last assistant turn, that turn's text)."""
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# ---- encoding --------------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: assistant turns learned, everything else -100.

    Each assistant turn's tokens are the difference between the template rendered up to and including
    that turn and the template rendered up to the generation prompt before it; the role markers are
    special tokens, so these prefixes tokenise identically inside the whole conversation.
    """
    ids: list[int] = []
    labels: list[int] = []

    def extend(text: str, learn: bool) -> None:
        full = _ids(tokenizer, text)
        if full[: len(ids)] != ids:
            raise SftDataError("chat template does not render conversations prefix by prefix")
        new = full[len(ids) :]
        ids.extend(new)
        labels.extend(new if learn else [IGNORE_INDEX] * len(new))

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(
                tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), False
            )
        extend(
            tokenizer.apply_chat_template(messages[: i + 1], tokenize=False), message["role"] == "assistant"
        )
    return ids, labels


@dataclass
class Rows:
    """Fixed-length rows being filled; `add` puts an example in the current row or starts a new one."""

    seq_len: int
    pad_id: int
    packing: bool

    def __post_init__(self) -> None:
        self.rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, position ids

    def add(self, ids: list[int], labels: list[int]) -> None:
        ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            return  # truncation left nothing to learn
        if self.packing and self.rows and len(self.rows[-1][0]) + len(ids) <= self.seq_len:
            row = self.rows[-1]
        else:
            row = ([], [], [])
            self.rows.append(row)
        row[0].extend(ids)
        row[1].extend(labels)
        row[2].extend(range(len(ids)))  # each example starts at position 0, as when served alone

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self.rows)
        # The padding tail is one more sequence (positions from 0): never attended to by real tokens.
        out = {
            "input_ids": np.full((n, self.seq_len), self.pad_id, dtype=np.int64),
            "labels": np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64),
            "attention_mask": np.zeros((n, self.seq_len), dtype=np.int64),
            "position_ids": np.zeros((n, self.seq_len), dtype=np.int64),
        }
        for r, (ids, labels, positions) in enumerate(self.rows):
            out["input_ids"][r, : len(ids)] = ids
            out["labels"][r, : len(labels)] = labels
            out["attention_mask"][r, : len(ids)] = 1
            out["position_ids"][r, : len(ids)] = positions
            out["position_ids"][r, len(ids) :] = np.arange(self.seq_len - len(ids))
        return out


def encode_causal(
    tokenizer: Any, records: Iterable[dict[str, Any]], seq_len: int, packing: bool
) -> dict[str, np.ndarray]:
    """Chat records → rows of `seq_len` tokens (packed several per row, or one per row)."""
    rows = Rows(seq_len, tokenizer.pad_token_id, packing)
    for record in records:
        rows.add(*encode_chat(tokenizer, record["messages"]))
    return rows.arrays()


def encode_seq2seq(
    tokenizer: Any, records: Iterable[dict[str, Any]], source_len: int, target_len: int
) -> dict[str, np.ndarray]:
    """Pairs → encoder `input_ids`/`attention_mask` of `source_len` and decoder `labels` of `target_len`.

    The source is every turn before the answer joined by newlines (for a plain pair: the input).
    """
    rec = list(records)
    n, pad, eos = len(rec), tokenizer.pad_token_id, tokenizer.eos_token_id
    out = {
        "input_ids": np.full((n, source_len), pad, dtype=np.int64),
        "attention_mask": np.zeros((n, source_len), dtype=np.int64),
        "labels": np.full((n, target_len), IGNORE_INDEX, dtype=np.int64),
    }
    for r, record in enumerate(rec):
        context, answer = pair_of(record)
        src = (_ids(tokenizer, "\n".join(m["content"] for m in context)) + [eos])[-source_len:]
        tgt = (_ids(tokenizer, answer) + [eos])[:target_len]
        out["input_ids"][r, : len(src)] = src
        out["attention_mask"][r, : len(src)] = 1
        out["labels"][r, : len(tgt)] = tgt
    return out


class EncodeBatch:
    """Ray Data transform (a callable class, so each actor loads the tokenizer once)."""

    def __init__(self, tokenizer_dir: str, seq_len: int, packing: bool, seq2seq: bool, target_len: int):
        from data_pipelines.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.seq_len, self.packing, self.seq2seq, self.target_len = seq_len, packing, seq2seq, target_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [json.loads(s) for s in batch[RECORD_COLUMN]]
        if self.seq2seq:
            return encode_seq2seq(self.tokenizer, records, self.seq_len, self.target_len)
        return encode_causal(self.tokenizer, records, self.seq_len, self.packing)


def sft_dataset(
    records: list[dict[str, Any]],
    tokenizer_dir: str,
    seq_len: int,
    packing: bool = True,
    seq2seq: bool = False,
    target_len: int = 64,
    batch_records: int = 64,
    min_rows: int = 0,
    seed: int = 0,
    max_bytes: int = 512 * 2**20,
):
    """A materialised Ray Dataset of training rows for the records (see module docstring).

    SFT sets are small, so the encoded rows are computed once and kept in the object store: every
    pass of the training loop then reads them instead of re-running the tokenizer. A set shorter than
    `min_rows` (what the run will consume) is repeated, each copy's blocks of `batch_records` examples
    in a different order, up to `max_bytes`, so the loop does not restart a tiny epoch every few steps
    (each restart re-plans the dataset split across workers, seconds on a small machine).
    """
    import ray

    ds = ray.data.from_items([{RECORD_COLUMN: json.dumps(r)} for r in records])
    ds = ds.map_batches(
        EncodeBatch,
        fn_constructor_args=(tokenizer_dir, seq_len, packing, seq2seq, target_len),
        batch_size=batch_records,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    ).materialize()
    rows = ds.count()
    if rows == 0:
        raise SftDataError("no training rows: truncation cut every answer away (raise finetune.max_seq_len)")
    row_bytes = 8 * (2 * seq_len + (target_len if seq2seq else 2 * seq_len))  # int64 columns
    copies = min(-(-min_rows // rows), max(1, max_bytes // (row_bytes * rows)))
    if copies > 1:
        ds = ds.union(*(ds.randomize_block_order(seed=seed + i) for i in range(1, copies)))
    return ds


# ---- loss --------------------------------------------------------------------------------------------
def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Position t predicts token t+1, so logits drop their last step and labels their first; positions
    labelled -100 (prompt, padding) contribute nothing, neither to the sum nor to the count.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(torch.long)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


# ---- pieces fine-tuning and evaluation share (here, below both, so neither imports the other) ---------
def pair_paths(cfg: Any) -> tuple[list[str], list[str]]:
    """(training, held-out) jsonl paths: `finetune.paths`/`eval_paths`, else the demo corpus's pairs."""
    from data_pipelines.demo_corpus import write_demo_corpus

    train, held_out = list(cfg.finetune.paths), list(cfg.finetune.eval_paths)
    if not train or not held_out:
        demo = write_demo_corpus(cfg.data.demo, RunLayout(Path(cfg.run_dir())).demo_corpus)
        train = train or [str(demo.sft_train)]
        held_out = held_out or [str(demo.sft_eval)]
    return train, held_out


def eval_pair_paths(cfg: Any) -> list[str]:
    """`eval.paths`, else fine-tuning's held-out pairs, else the demo corpus's held-out phrasings."""
    if cfg.eval.paths:
        return list(cfg.eval.paths)
    return pair_paths(cfg)[1]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Generation ends at the end of the assistant turn or at eos, whichever the model emits."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.insert(0, end)
    return ids
