"""Train a byte-level BPE or character-level tokenizer locally and save it as a transformers folder.

The saved folder is what every later stage loads with `AutoTokenizer.from_pretrained`, so the special
tokens (document boundaries, padding, chat roles) and the chat template are fixed here, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_pipelines.config import TokenizerConfig

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES)
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS, END_OF_TURN]

# A turn is "<|role|>content<|end|>\n"; generation continues after "<|assistant|>" and stops at <|end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _bpe(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _char(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    return tok, trainer


def wrap_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a `tokenizers` object, with raylm's special tokens and chat template."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> Path:
    """Train on `texts` (cleaned documents) and save a fast-tokenizer folder at `out_dir`."""
    tok, trainer = _bpe(cfg) if cfg.kind == "bpe" else _char(cfg)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrap_fast(tok).save_pretrained(out)
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a local tokenizer folder; never reaches a hub."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenizer_hash(path: str | Path) -> str:
    """Identity of a tokenizer folder: token shards record it so stale shards are never reused."""
    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()[:16]
