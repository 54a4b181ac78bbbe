"""A model folder's tokenizer.json runs as it is, whatever its kind (as transformers 4.51.3 loads it):
transformers 5 picks the class tokenizer_config.json names, and its LlamaTokenizer rebuilds a
SentencePiece-style pipeline of its own (a ScienceQA row lost the leading space after the `<image>` run).
Stand-ins are built with the `tokenizers` library; expected ids are that library's own encoding of the
file, not the code under test."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ivtlr_jax.data import load_examples, load_processor
from ivtlr_jax.data.tokenizer import CHAMELEON_SPECIAL_TOKENS, LATENT_TOKENS, build_tiny_chameleon_processor
from tests.test_data import img, png, write_scienceqa

CORPUS = ["Which of these states is farthest north?", "Therefore, the answer is 1", "Lecture: maps show places.",
          "The solution is clear. Look at the map"]
TEXTS = ["<image><image> Which of these states?", " The answer is 1\n", "Lecture: maps <|latent|> show",
         "Look at the map\n"]


def sentencepiece_style(kind: str) -> Tokenizer:
    """A byte-fallback BPE laid out as SentencePiece conversions are: "prepend", Llama-2's (a normalizer
    prepends and replaces spaces by ▁, no pre-tokenizer); "metaspace", a Metaspace pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if kind == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(CHAMELEON_SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(list(LATENT_TOKENS))
    return tok


@pytest.fixture(scope="module", params=["byte-level", "prepend", "metaspace"])
def chameleon_folder(request, tmp_path_factory):
    """A tiny Chameleon folder whose tokenizer_config.json names LlamaTokenizer (as Chameleon's does), with a
    byte-level or a SentencePiece-style tokenizer.json."""
    folder = tmp_path_factory.mktemp("cham")
    build_tiny_chameleon_processor(folder, CORPUS, vocab_size=300, image_size=32, image_seq_length=2)
    if request.param != "byte-level":
        sentencepiece_style(request.param).save(str(folder / "tokenizer.json"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    config_file.write_text(json.dumps(config))
    return folder


def test_the_tokenizer_encodes_as_its_file(chameleon_folder):
    file = Tokenizer.from_file(str(chameleon_folder / "tokenizer.json"))
    tokenizer = load_processor(chameleon_folder).tokenizer
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == file.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and tokenizer.sep_token == "<reserved08706>"


def test_a_scienceqa_row_keeps_its_spaces(chameleon_folder, tmp_path):
    file = Tokenizer.from_file(str(chameleon_folder / "tokenizer.json"))
    ids = lambda text: file.encode(text, add_special_tokens=False).ids  # noqa: E731
    src = write_scienceqa(tmp_path / "sqa.parquet", [dict(question=" Which of these states is farthest north?",
                                                          choices=["a", "b"], answer=1, image=img(png()),
                                                          solution="The solution is clear. Look at the map")])
    (ex,), _ = load_examples("scienceqa", str(src), "test", load_processor(chameleon_folder), "chameleon")
    question = "[Question]:{<image><image> Which of these states is farthest north?}\n[Options]:\n(A).{a}\n(B).{b}"
    assert ex.question_ids == ids(question)
    assert ex.step_ids == [ids("The solution is clear\n"), ids("Look at the map\n")]
