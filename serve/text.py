"""Token ids → streamed text: incremental detokenization and stop strings.

Byte-level BPE splits multi-byte characters across tokens, and some decoders drop a leading space when
a token is decoded alone; decoding a window that starts a few tokens back (the vLLM "prefix/read
offset" trick) and holding back text ending in U+FFFD makes every streamed piece a correct suffix of
the full decode. Text that could be the start of a stop string is held back too, so a client never
sees a stop string, not even half of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decode one token at a time; `push` returns only the new, complete characters."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, *tokens: int) -> str:
        """New complete text after `tokens` (one decode per call, however many tokens it brings)."""
        self.ids.extend(tokens)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), once no token follows."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


@dataclass
class ChoiceText:
    """The text of one choice as tokens arrive: what was sent, what is held back, and why it ended."""

    detok: IncrementalDetokenizer
    stop: list[str]
    stop_token_ids: frozenset[int]
    text: str = ""
    sent: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    _holdback: int = field(init=False)

    def __post_init__(self) -> None:
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def extend(self, tokens: list[int], engine_reason: str | None) -> str:
        """Account for a chunk of tokens (the engine ended with the last one if `engine_reason`).

        One decode per chunk; with stop strings, token by token, so the usage count stops exactly
        at the token that completed a stop string.
        """
        if self.stop and tokens:
            out = ""
            for k, token in enumerate(tokens):
                out += self.push(token, engine_reason if k == len(tokens) - 1 else None)
                if self.finish_reason is not None:
                    break
            return out
        self.tokens += len(tokens)
        kept = [t for t in tokens if t not in self.stop_token_ids]
        if kept:
            self.text += self.detok.push(*kept)
        return self._end(engine_reason)

    def push(self, token: int, engine_reason: str | None) -> str:
        """Account for `token` (`engine_reason`: why the engine ends here, if it does); return new text."""
        self.tokens += 1
        if token not in self.stop_token_ids:
            self.text += self.detok.push(token)
        return self._end(engine_reason)

    def _end(self, engine_reason: str | None) -> str:
        """Release held-back text, apply stop strings, and return what can be sent now."""
        if engine_reason is not None:  # no token follows: release an incomplete character at the end
            self.text += self.detok.flush()
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.text, engine_reason = self.text[:at], "stop"
        if engine_reason is not None:
            self.finish_reason = engine_reason
            return self._take(len(self.text))
        return self._take(len(self.text) - self._holdback)

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
