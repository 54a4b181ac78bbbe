"""Tiny local processors for the demo and the tests, and a processor loader that works without
torchvision.

- `build_tiny_qwen2vl_processor(folder, corpus)`: a byte-level BPE (Qwen2's pre-tokenizer) trained on
  `corpus` with the `tokenizers` library, Qwen2-VL's special tokens appended after the learnt vocab
  (in Qwen's order) and IVT-LR's three latent tokens after those (added like the official
  `tokenizer.add_tokens`), the PIL Qwen2-VL image processor (a 280x280 image -> 20x20 patches -> 100
  image tokens) and the Qwen2-VL chat template with its default system turn; saved into `folder` in
  the layout of the Qwen2-VL hub folder.
- `build_tiny_chameleon_processor(folder, corpus)`: the same for Chameleon (`<image>`, `<s>`, `</s>`,
  `<racm3:break>`, `<eoss>`, `<reserved08706>`), a small square image and `image_seq_length`.
- `load_processor(path)`: `AutoProcessor.from_pretrained`, except that transformers cannot build a
  `Qwen2VLProcessor` without torchvision (its video processor needs it, and the processor's
  class check fails even for video_processor=None); then the processor is built from its tokenizer,
  PIL image processor and chat template, with no video processor (this project never uses video).
  The tokenizer runs the folder's tokenizer.json as it is (as transformers 4.51.3 does): where the class
  transformers 5 picks rebuilds its own pipeline, the file is loaded as a PreTrainedTokenizerFast.
  Never trust_remote_code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Qwen2-VL-7B-Instruct's chat template (chat_template.json of the hub folder)
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>")
CHAMELEON_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>", "<image>", "<racm3:break>", "<eoss>", "<reserved08706>")
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def _train_bpe(corpus: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder -> (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _qwen2_tokenizer(vocab, merges, specials, eos, pad, bos=None, sep=None):
    """Qwen2Tokenizer over the learnt vocab; `specials` appended in order as special tokens, then
    the three latent tokens as ordinary added tokens (as the official scripts' `add_tokens`)."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=None, pad_token=None, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.eos_token, tok.pad_token = eos, pad
    if bos is not None:
        tok.bos_token = bos
    if sep is not None:
        tok.sep_token = sep
    tok.add_tokens(list(LATENT_TOKENS))
    return tok


def build_processor(cls, *, chat_template=None, **parts):
    """Construct a transformers processor from its parts, tolerating attributes that are None (a
    Qwen2-VL processor without a video processor when torchvision is missing)."""
    from transformers.processing_utils import ProcessorMixin

    processor = cls.__new__(cls)

    def check(name, arg):
        return None if arg is None else ProcessorMixin.check_argument_for_proper_class(processor, name, arg)

    processor.check_argument_for_proper_class = check  # instance attribute shadows the method during __init__
    try:
        processor.__init__(chat_template=chat_template, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def save_processor(processor, folder) -> Path:
    """save_pretrained, or (when a sub-processor is None, which save_pretrained cannot handle) the
    pieces in the hub layout: tokenizer files, preprocessor_config.json, chat_template.jinja."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if all(getattr(processor, a, None) is not None for a in processor.get_attributes()):
        processor.save_pretrained(str(folder))
        return folder
    name = type(processor).__name__
    processor.tokenizer._set_processor_class(name)
    processor.tokenizer.save_pretrained(str(folder))
    processor.image_processor.save_pretrained(str(folder))
    config_file = folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["processor_class"] = name  # as in the hub folder: lets AutoProcessor find the processor class
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if isinstance(processor.chat_template, str):
        (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    return folder


def build_tiny_qwen2vl_processor(folder, corpus: list[str], vocab_size: int = 640):
    """Train a tiny byte-level BPE on `corpus` and wrap it into a Qwen2VLProcessor saved in `folder`
    (loadable with `load_processor(folder)`, and with AutoProcessor where torchvision is installed).
    Ids: learnt vocab [0, V), then Qwen2-VL's special tokens, then the three latent tokens."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab, merges = _train_bpe(corpus, vocab_size)
    tokenizer = _qwen2_tokenizer(vocab, merges, QWEN2VL_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=280 * 280)
    processor = build_processor(Qwen2VLProcessor, image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=None, chat_template=QWEN2VL_CHAT_TEMPLATE)
    save_processor(processor, folder)
    return load_processor(folder)


def build_tiny_chameleon_processor(folder, corpus: list[str], vocab_size: int = 640, image_size: int = 32,
                                   image_seq_length: int = 64):
    """Train a tiny byte-level BPE on `corpus` and wrap it into a ChameleonProcessor saved in `folder`
    (image_size x image_size images, `<image>` x image_seq_length). Ids: learnt vocab, then the
    Chameleon special tokens, then the latent tokens."""
    from transformers import ChameleonProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    vocab, merges = _train_bpe(corpus, vocab_size)
    tokenizer = _qwen2_tokenizer(vocab, merges, CHAMELEON_SPECIAL_TOKENS, eos="</s>", pad="<pad>", bos="<s>",
                                 sep="<reserved08706>")
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size})
    processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   image_seq_length=image_seq_length)
    save_processor(processor, folder)
    return load_processor(folder)


def load_processor(path):
    """The processor of a model folder or hub id (AutoProcessor; without torchvision, a Qwen2-VL
    processor is assembled from its tokenizer, PIL image processor and chat template). Its tokenizer
    runs the folder's tokenizer.json as it is, as transformers 4.51.3 does (`tokenizer_as_in_file`)."""
    path = str(path)
    processor = _load_processor(path)
    tokenizer = tokenizer_as_in_file(path, getattr(processor, "tokenizer", processor))
    if tokenizer is None:
        return processor
    return tokenizer if not hasattr(processor, "tokenizer") else _load_processor(path, tokenizer=tokenizer)


def _load_processor(path: str, **parts):
    """AutoProcessor.from_pretrained(path, **parts), or the Qwen-VL processor built from its pieces."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(path, **parts)
    except Exception:
        if is_torchvision_available():
            raise
        cls = _qwen_vl_processor_class(path)
        if cls is None:
            raise
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_dict, _ = cls.get_processor_dict(path)
    chat_template = processor_dict.get("chat_template")
    tokenizer = parts.get("tokenizer") or AutoTokenizer.from_pretrained(path)
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    image_processor = AutoImageProcessor.from_pretrained(path)
    return build_processor(cls, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                           chat_template=chat_template)


# the parts of a tokenizer.json that make its encoding, besides the vocabulary and merges
PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "decoder")


def tokenizer_as_in_file(path: str, tokenizer):
    """None when `tokenizer` runs the pipeline of the folder's tokenizer.json (or there is none); else the
    file as it is, with the special tokens of tokenizer_config.json (PreTrainedTokenizerFast). transformers 5
    picks the class tokenizer_config.json names and some classes rebuild their own normalizer and
    pre-tokenizer (LlamaTokenizer on a SentencePiece-style file drops the leading space of a text after
    a special token); transformers 4.51.3 ran the file."""
    from transformers import PreTrainedTokenizerFast

    resolved = _resolved_file(path, "tokenizer.json")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if resolved is None or backend is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        in_file = _pipeline(json.load(f))
    if _pipeline(json.loads(backend.to_str())) == in_file:
        return None
    return PreTrainedTokenizerFast.from_pretrained(path)


def _pipeline(tokenizer_json: dict) -> list:
    """What makes a tokenizer.json's encoding besides its vocabulary: the pipeline parts and the model's options."""
    options = {k: v for k, v in tokenizer_json.get("model", {}).items() if k not in ("vocab", "merges")}
    return [tokenizer_json.get(part) for part in PIPELINE_PARTS] + [options]


def _resolved_file(path: str, fname: str) -> str | None:
    """The local copy of a file of a model folder or hub id; None when it has none (or cannot be reached)."""
    from transformers.utils import cached_file

    try:
        return cached_file(path, fname, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - a missing or unreachable file only means "not this one"
        return None


def _qwen_vl_processor_class(path: str):
    """The Qwen-VL processor class named by the folder's configs, or None for any other processor."""
    import transformers

    names = []
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = _resolved_file(path, fname)
        if resolved:
            with open(resolved, encoding="utf-8") as f:
                names.append(json.load(f).get("processor_class"))
    for name in names:
        if name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"):
            return getattr(transformers, name)
    return None


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The token ids a model config, the trainer and the decoders need (None where the tokenizer lacks one)."""

    vocab_size: int  # len(tokenizer): the rows the embedding and LM head must have
    eos_token_id: int | None  # also the pad id of training and evaluation batches (docs/method.md section 3)
    pad_token_id: int | None  # the tokenizer's own pad token
    image_token_id: int | None  # the image placeholder
    video_token_id: int | None
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    start_latent_id: int | None  # <|start-latent|>, <|end-latent|>, <|latent|>: added by the trainer
    end_latent_id: int | None
    latent_id: int | None


def special_tokens(processor) -> SpecialTokens:
    """The processor's `SpecialTokens`: vocabulary size, EOS / pad, the image placeholder and vision markers,
    and the latent tokens."""
    tok = getattr(processor, "tokenizer", processor)
    unk = tok.unk_token_id

    def tid(token):
        i = tok.convert_tokens_to_ids(token)
        return None if i is None or (unk is not None and i == unk and token != tok.unk_token) else int(i)

    return SpecialTokens(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        image_token_id=tid(getattr(processor, "image_token", "<|image_pad|>")),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        start_latent_id=tid("<|start-latent|>"),
        end_latent_id=tid("<|end-latent|>"),
        latent_id=tid("<|latent|>"),
    )
