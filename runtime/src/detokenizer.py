"""Incremental detokenization: text deltas as tokens arrive, without cutting multi-byte characters."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        # Decoding a short window that starts a few tokens back keeps word-boundary spaces right
        # (SentencePiece drops a leading space at the start of a decode).
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.prefix_offset, self.read_offset)
        after = self._decode(self.prefix_offset)
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        delta = after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
