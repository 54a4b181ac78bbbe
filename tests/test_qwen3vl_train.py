"""Qwen3-VL through `train.py`: a tiny random Qwen3-VL (DeepStack into 2 of its 2 decoder layers) with a tiny
Qwen3VLProcessor (16-pixel patches) on generated M3CoT-schema data, two curriculum stages (no latents,
then one) on a data x fsdp mesh of 4 host devices; the stage exports load in transformers as they are.

Kept small (8 train rows, 4 micro-steps, a 2-layer LM): the suite's time budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_qwen25vl_train import write_config

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 8, 4


def prepare_assets(root: Path) -> tuple[Path, Path]:
    """(data folder, model folder): generated data, a tiny BPE in a Qwen3VLProcessor, and a tiny random
    Qwen3-VL with that vocabulary saved as a Hugging Face folder (model_type qwen3_vl)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ivtlr_jax.data import (build_tiny_qwen2vl_processor, make_synthetic_m3cot, special_token_ids,
                                synthetic_corpus, synthetic_rows)
    from ivtlr_jax.data.tokenizer import build_processor, save_processor

    data, model_dir = root / "data", root / "model"
    make_synthetic_m3cot(data, NUM_TRAIN, NUM_TEST, seed=1, image_size=84, fixed_choices=True)
    corpus = synthetic_corpus(synthetic_rows(NUM_TRAIN, 1, "train", 84, fixed_choices=True))
    qwen2 = build_tiny_qwen2vl_processor(model_dir, corpus, vocab_size=400)
    # Qwen3-VL's image processing: patches of 16 pixels, mean and std 0.5 (images are resized to 320x320)
    images = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      min_pixels=64 * 64, max_pixels=320 * 320)
    processor = build_processor(Qwen3VLProcessor, image_processor=images, tokenizer=qwen2.tokenizer,
                                video_processor=None, chat_template=qwen2.chat_template)
    save_processor(processor, model_dir)
    ids = special_token_ids(processor)
    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=ids["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                              mrope_interleaved=True),
                         eos_token_id=ids["eos_token_id"], bos_token_id=None, tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=False,
        **{key: ids[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")},
    )
    Qwen3VLForConditionalGeneration(config).save_pretrained(model_dir)
    return data, model_dir


def test_train_py_trains_qwen3vl_and_its_exports_load_in_transformers(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    config = write_config(tmp_path, prepare_assets(tmp_path / "assets"), "qwen3vl_tiny")  # Qwen2.5-VL's run
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "qwen3vl_tiny"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    # 8 rows / (1 row x 4 devices) = 2 micro-steps per epoch; stage 0 (no latents), stage 1 (one latent)
    assert len(losses) == 4 and np.all(np.isfinite(losses)), metrics
    for stage in (0, 1):  # LoRA merged: transformers reads every weight of each export, no more, no less
        _, info = Qwen3VLForConditionalGeneration.from_pretrained(run_dir / f"stage_{stage}",
                                                                  output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
