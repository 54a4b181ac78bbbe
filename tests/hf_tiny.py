"""Tiny random transformers models and inputs for parity tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch

from ivtlr_jax.generate import SamplingConfig, ivtlr_generate
from ivtlr_jax.latent import LatentConfig

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293
TEXT_VOCAB = 280  # ordinary text ids are drawn below this
NO_LATENT = 285  # a latent token id that no prompt built here holds (above the text ids, below the special ones)


def greedy_generate(model, ids, mask, *, max_new_tokens: int, **image_inputs) -> np.ndarray:
    """Greedy decoding of left-padded prompts without latents -> tokens [B, max_new_tokens], to compare
    with transformers' `generate`: `ivtlr_generate`'s decode loop (no latent passes on such prompts), with
    the positions transformers gives a prompt (M-RoPE where the model has it)."""
    rope = "mrope" if hasattr(model, "rope_index") else "1d"
    latent = LatentConfig(NO_LATENT, num_selected_patches=1, rope=rope)
    batch = {"input_ids": ids, "attention_mask": mask, **image_inputs}
    return np.asarray(ivtlr_generate(model, batch, latent, SamplingConfig(max_new_tokens)).tokens)


def max_abs_diff(a, b, mask=None) -> float:
    """Largest |a - b| in fp32, over the True positions of mask (leading axes) when given."""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float((d if mask is None else d[np.asarray(mask).astype(bool)]).max())


def hf_greedy_generate(model, ids, mask, pixel_values, grid, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy `generate` of exactly max_new_tokens for a Qwen VL model -> [B, max_new_tokens]."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixel_values),
            image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)),
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return out[:, ids.shape[1]:].numpy()


def two_row_image_prompts(grid, left_pad=False, seed=3):
    """ids, mask of two rows for three images of `grid` (merged 2x2): row 0 holds images 0 and 1 between
    text, row 1 image 2; images are consumed in batch order."""
    rng = np.random.default_rng(seed)
    n = (np.asarray(grid).prod(-1) // 4).tolist()
    span = lambda k: [VISION_START] + [IMAGE_TOKEN] * k + [VISION_END]
    text = lambda k: list(rng.integers(0, TEXT_VOCAB, k))
    return pad_rows([text(3) + span(n[0]) + text(2) + span(n[1]) + text(4), text(1) + span(n[2]) + text(2)],
                    left_pad)


def jitted_qwen_pieces(model) -> dict:
    """A Qwen VL model's pieces under jit (grids traced): `features`, `forward` (with hidden states) and
    `rope_index`, one compile per input shape."""
    import jax

    return dict(
        features=jax.jit(lambda pv, grid: model.image_features(pv, grid)),
        forward=jax.jit(lambda ids, mask, pv, grid: model(ids, mask, pv, grid, output_hidden_states=True)),
        rope_index=jax.jit(lambda ids, mask, grid: model.rope_index(ids, mask, grid)),
    )


def _qwen_text_config(tie_word_embeddings, num_hidden_layers, text_overrides) -> dict:
    """The tiny Qwen2 language model both Qwen VL configs use (M-RoPE over 2+3+3 frequency pairs)."""
    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
    )
    return text | dict(text_overrides, tie_word_embeddings=tie_word_embeddings)


QWEN_SPECIAL_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)


def qwen2vl_config(tie_word_embeddings=False, **text_overrides):
    from transformers import Qwen2VLConfig

    text = _qwen_text_config(tie_word_embeddings, 3, text_overrides)
    return Qwen2VLConfig(
        tie_word_embeddings=tie_word_embeddings,
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        **QWEN_SPECIAL_TOKENS,
    )


def build_qwen2vl(folder, seed: int = 0, tie_word_embeddings=False, **text_overrides):
    """Save a tiny random Qwen2VLForConditionalGeneration to `folder`; return it in eval mode (fp32)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(qwen2vl_config(tie_word_embeddings, **text_overrides)).eval()
    model.save_pretrained(folder)
    return model


def image_inputs(sizes, seed=0):
    """pixel_values [Np, 1176] and image_grid_thw [n, 3] from the real Qwen2-VL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    out = Qwen2VLImageProcessorPil()(images=images, return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def qwen2vl_image_batch(seed=0, left_pad=False, sizes=((56, 56), (84, 56)), text_lens=((5, 7), (3, 2)),
                        processed=None):
    """Rows `text, <vision_start>, <image_pad> x n, <vision_end>, text`, one image per row, padded.
    processed: (sizes, seed) -> (pixel_values, image_grid_thw) (default `image_inputs`, 14-pixel patches)."""
    rng = np.random.default_rng(seed)
    pixel_values, grid = (processed or image_inputs)(sizes, seed)
    n_tokens = (grid.prod(-1) // 4).tolist()
    rows = [
        list(rng.integers(0, TEXT_VOCAB, pre)) + [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END]
        + list(rng.integers(0, TEXT_VOCAB, post))
        for n, (pre, post) in zip(n_tokens, text_lens)
    ]
    return pad_rows(rows, left_pad) + (pixel_values, grid)


def text_batch(lengths=(9, 6), seed=1, left_pad=False):
    rng = np.random.default_rng(seed)
    return pad_rows([list(rng.integers(0, TEXT_VOCAB, n)) for n in lengths], left_pad)


def pad_rows(rows, left_pad=False):
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left_pad else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def hf_forward(model, ids, mask, pixel_values=None, grid=None, **kw):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    if pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
                      mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)))
    with torch.no_grad():
        return model(**kwargs)


# ---- Chameleon ----------------------------------------------------------------------------------
CHAMELEON_IMAGE = 399  # `<image>`
CHAMELEON_CODES = 64  # codebook size; codes map to BPE ids 300 + code
CHAMELEON_TOKENS_PER_IMAGE = 64  # 32x32 image, two downsamples -> 8x8


def chameleon_vocabulary_map(codes=CHAMELEON_CODES, first_id=300, image_id=CHAMELEON_IMAGE):
    letters = lambda n: "".join(chr(ord("A") + int(d)) for d in str(n))
    vocab = {"<image>": image_id, "<s>": 1, "</s>": 2}
    # deliberately not in code order, so the mapping is exercised (7 is prime to the power-of-2 sizes)
    for code in reversed(range(codes)):
        vocab[f"IMGIMG{letters(code)}Z"] = first_id + (code * 7) % codes
    return vocab


def chameleon_config(swin_norm=False, vq=None, **text):
    from transformers import ChameleonConfig

    vq_config = dict(embed_dim=16, num_embeddings=CHAMELEON_CODES, latent_channels=16, resolution=32,
                     base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[16])
    vq_config.update(vq or {})
    kwargs = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    kwargs.update(text)
    vocab_map = chameleon_vocabulary_map(vq_config["num_embeddings"], first_id=300,
                                         image_id=kwargs["vocab_size"] - 1)
    return ChameleonConfig(swin_norm=swin_norm, vocabulary_map=vocab_map, bos_token_id=1, eos_token_id=None,
                           pad_token_id=None, vq_config=vq_config, **kwargs)


def build_chameleon(folder, seed=0, swin_norm=False, vq=None, **text):
    from transformers import ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(chameleon_config(swin_norm, vq, **text)).eval()
    model.save_pretrained(folder)
    return model


def chameleon_image_batch(seed=0, left_pad=False, text_lens=((5, 7), (3, 2)), size=32,
                          tokens_per_image=CHAMELEON_TOKENS_PER_IMAGE, image_id=CHAMELEON_IMAGE):
    """Rows `text, <image> x tokens_per_image, text`, one size x size image per row (pixels in [-1, 1])."""
    rng = np.random.default_rng(seed)
    pixel_values = rng.uniform(-1, 1, (len(text_lens), 3, size, size)).astype(np.float32)
    rows = [list(rng.integers(3, TEXT_VOCAB, pre)) + [image_id] * tokens_per_image
            + list(rng.integers(3, TEXT_VOCAB, post)) for pre, post in text_lens]
    return pad_rows(rows, left_pad) + (pixel_values,)


def chameleon_forward(model, ids, mask, pixel_values=None, **kw):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.tensor(pixel_values)
    with torch.no_grad():
        return model(**kwargs)


# ---- Qwen2.5-VL ---------------------------------------------------------------------------------
# windows of 56 pixels = 2x2 merged tokens = 4x4 patches (the released models: 112 = 8x8 patches), so
# that the tiny images below have several windows, partial ones at their edges
QWEN25VL_IMAGE_SIZES = ((84, 84), (112, 140))  # 6x6 and 8x10 patches: 3x3 and 4x5 merged tokens


def qwen25vl_config(tie_word_embeddings=False, **text_overrides):
    from transformers import Qwen2_5_VLConfig

    text = _qwen_text_config(tie_word_embeddings, 2, text_overrides)
    return Qwen2_5_VLConfig(
        tie_word_embeddings=tie_word_embeddings,
        text_config=text,
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, window_size=56,
                           fullatt_block_indexes=[1],  # blocks 0 and 2 windowed, block 1 full
                           initializer_range=0.1),  # peaked attention: a wrong window shows
        **QWEN_SPECIAL_TOKENS,
    )


def build_qwen25vl(folder, seed: int = 0, tie_word_embeddings=False, **text_overrides):
    """Save a tiny random Qwen2_5_VLForConditionalGeneration to `folder`; return it in eval mode (fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(tie_word_embeddings, **text_overrides)).eval()
    with torch.no_grad():  # random norm weights, so that a wrong norm (or a missing one) shows
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


# ---- Qwen3-VL ----------------------------------------------------------------------------------
# patches of 16 pixels; a 6x6 table of learned position embeddings, so that the images below (4x4, 6x8
# and 8x10 patches) resample it down, equal and up; DeepStack after vision blocks 0 and 1 (of 3) into
# decoder layers 0 and 1 (of 3), so the last layer gets none
QWEN3VL_IMAGE_SIZES = ((64, 64), (128, 160))  # 4x4 and 8x10 patches: 2x2 and 4x5 merged tokens


def qwen3vl_image_inputs(sizes, seed=0):
    """pixel_values [Np, 1536] and image_grid_thw [n, 3] from the Qwen2-VL image processor with Qwen3-VL's
    16-pixel patches (Qwen3-VL's processor settings)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    out = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)(
        images=images, return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def qwen3vl_config(tie_word_embeddings=False, **text_overrides):
    from transformers import Qwen3VLConfig

    text = _qwen_text_config(tie_word_embeddings, 3, dict(head_dim=16, **text_overrides))
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    return Qwen3VLConfig(
        tie_word_embeddings=tie_word_embeddings,
        text_config=text,
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, num_position_embeddings=36,
                           deepstack_visual_indexes=[0, 1], initializer_range=0.1),
        **QWEN_SPECIAL_TOKENS,
    )


def build_qwen3vl(folder, seed: int = 0, tie_word_embeddings=False, **text_overrides):
    """Save a tiny random Qwen3VLForConditionalGeneration to `folder`; return it in eval mode (fp32)."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(qwen3vl_config(tie_word_embeddings, **text_overrides)).eval()
    with torch.no_grad():  # random norm weights and biases, so that a wrong norm (or a missing one) shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "norm" in name and name.endswith(".bias") or name.endswith("patch_embed.proj.bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def build_qwen3vl_processor(folder, corpus: list[str], vocab_size: int = 400, max_pixels: int = 320 * 320):
    """A tiny Qwen3VLProcessor saved in `folder` (and returned): a BPE trained on `corpus` (the tiny
    Qwen2-VL processor's tokenizer and chat template) and Qwen3-VL's image processing: patches of 16 pixels,
    mean and std 0.5, images between 64x64 and `max_pixels` pixels (the fixed square: 320x320)."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ivtlr_jax.data import build_tiny_qwen2vl_processor
    from ivtlr_jax.data.tokenizer import build_processor, save_processor

    qwen2 = build_tiny_qwen2vl_processor(folder, corpus, vocab_size=vocab_size)
    images = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      min_pixels=64 * 64, max_pixels=max_pixels)
    processor = build_processor(Qwen3VLProcessor, image_processor=images, tokenizer=qwen2.tokenizer,
                                video_processor=None, chat_template=qwen2.chat_template)
    save_processor(processor, folder)
    return processor
