"""Streaming text a few tokens at a time (serve/text_stream.TextStream): the pieces join to the decode of the
whole answer, for Qwen2's real byte-level BPE (multi-byte characters split across tokens) and for
SentencePiece-style tokenizers (a leading space dropped at the start of a decode), and each turn decodes a
window of the newest tokens, not the whole answer again. Expected text: the tokenizer's own decode of all tokens."""

from __future__ import annotations

import pytest

from ivtlr_jax.serve.text_stream import TextStream
from tests.test_real_tokenizer import package_files
from tests.test_tokenizer_files import sentencepiece_style

TEXTS = ["The answer is (B). 北极熊 lives in the Arctic 🐻‍❄️, über café!", "  two  spaces\nand\ta tab, then 😀😀 end",
         "Therefore, the answer is A"]


def qwen2_bpe():
    from transformers import Qwen2TokenizerFast

    files = package_files()
    return Qwen2TokenizerFast(vocab_file=str(files / "vocab.json"), merges_file=str(files / "merges.txt"))


def sentencepiece(kind: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=sentencepiece_style(kind))


class CountingTokenizer:
    """The tokenizer, counting the tokens each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens, **kwargs):
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kwargs)


@pytest.mark.parametrize("make", [qwen2_bpe, lambda: sentencepiece("prepend"), lambda: sentencepiece("metaspace")],
                         ids=["qwen2-bpe", "sp-prepend", "sp-metaspace"])
@pytest.mark.parametrize("turn", [1, 3, 8])
def test_streamed_pieces_join_to_the_whole_text(make, turn):
    tokenizer = make()
    for text in TEXTS:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        counting = CountingTokenizer(tokenizer)
        stream = TextStream(counting)
        pieces = [stream.add(tokens[i:i + turn]) for i in range(0, len(tokens), turn)]
        whole = tokenizer.decode(tokens, skip_special_tokens=True)
        assert "".join(pieces) == whole, (text, pieces)
        assert all("\ufffd" not in p for p in pieces)
        # a window per turn: each token is decoded a bounded number of times (about 4), not once per turn after it
        assert counting.decoded <= 4 * len(tokens) + 4 * turn, (counting.decoded, len(tokens))
