"""The text of a growing list of tokens, a few tokens at a time, for streaming.

Decoding the whole list again at every turn costs O(n^2) over an answer of n tokens. Here only a short window
is decoded per turn (as TGI and vLLM stream): the tokens since the last emitted text, after the tokens of the
turn before as context (so a tokenizer that drops a leading space at the start of what it decodes, as
SentencePiece does, drops it inside the context, not in the emitted text). Text is emitted once it ends in a
whole character (a byte-level token can hold part of one, which decodes to U+FFFD until the rest comes).
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 character to


class TextStream:
    """`add(tokens) -> the new text`; the emitted pieces join to the decode of all tokens (special tokens
    skipped, as the whole answer is decoded)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.context_start = 0  # the window decoded next starts here
        self.emitted_end = 0  # the tokens before this are in the emitted text

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in tokens)
        context = self._decode(self.tokens[self.context_start:self.emitted_end])
        window = self._decode(self.tokens[self.context_start:])
        if len(window) <= len(context) or window.endswith(INCOMPLETE) or not window.startswith(context):
            return ""
        self.context_start, self.emitted_end = self.emitted_end, len(self.tokens)
        return window[len(context):]
