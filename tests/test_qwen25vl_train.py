"""Qwen2.5-VL through the training loop and evaluation: a tiny random Qwen2.5-VL (window-attention vision
tower) with a tiny Qwen2_5_VLProcessor on generated M3CoT-schema data, two curriculum stages on a
data x fsdp mesh, interrupted mid-stage (max_steps) and resumed: it ends with the parameters and the
exports of a run that never stopped. The final export is then evaluated on 4 test rows.

Kept small (8 train rows, 4 micro-steps, a 2-layer LM): the suite's time budget."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from ivtlr_jax.config import DataSection, EvalSection, LatentSection, ModelSection, load_config
from ivtlr_jax.train.loop import train
from tests.test_train_loop import assert_metrics_once_per_step, assert_same_export, final_params

quiet = lambda *_: None
NUM_TRAIN, NUM_TEST = 8, 4


def prepare_assets(root: Path) -> tuple[Path, Path]:
    """(data folder, model folder): generated data, a tiny BPE in a Qwen2_5_VLProcessor, and a tiny
    random Qwen2.5-VL with that vocabulary saved as a Hugging Face folder (model_type qwen2_5_vl)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from ivtlr_jax.data import (build_tiny_qwen2vl_processor, make_synthetic_m3cot, special_tokens,
                                synthetic_corpus, synthetic_rows)
    from ivtlr_jax.data.tokenizer import build_processor, save_processor

    data, model_dir = root / "data", root / "model"
    make_synthetic_m3cot(data, NUM_TRAIN, NUM_TEST, seed=1, image_size=84, fixed_choices=True)
    corpus = synthetic_corpus(synthetic_rows(NUM_TRAIN, 1, "train", 84, fixed_choices=True))
    qwen2 = build_tiny_qwen2vl_processor(model_dir, corpus, vocab_size=400)
    # the hub folders of Qwen2.5-VL name Qwen2_5_VLProcessor (the same tokenizer and image processor)
    processor = build_processor(Qwen2_5_VLProcessor, image_processor=qwen2.image_processor, tokenizer=qwen2.tokenizer,
                                video_processor=None, chat_template=qwen2.chat_template)
    save_processor(processor, model_dir)
    special = special_tokens(processor)
    # the model as transformers writes it (torch: no compilation to initialise it)
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=special.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                         eos_token_id=special.eos_token_id, bos_token_id=None, tie_word_embeddings=False),
        # images are resized to 280x280 = 10x10 merged tokens; windows of 3x3 merged tokens (84 pixels)
        # leave partial windows at two edges; block 1 attends over the whole image
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                           window_size=84, fullatt_block_indexes=[1]),
        tie_word_embeddings=False,
        **{key: getattr(special, key) for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")},
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(model_dir)
    return data, model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepare_assets(tmp_path_factory.mktemp("tiny_qwen25vl_assets"))


@pytest.fixture
def shared_compilations(tmp_path):
    """The commands' persistent compilation cache (`ivtlr_jax.compilation_cache`) in a folder of the test's:
    each `train` call jits its own step, so the interrupted run and its resumption load the programs the
    uninterrupted run compiled (the same executables), as a resumed `train.py` does. Restored afterwards."""
    from jax._src import compilation_cache as cc

    from ivtlr_jax.compilation_cache import enable_compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        assert enable_compilation_cache({"IVTLR_JAX_CACHE": str(tmp_path / "xla_cache")}) is not None
        cc.reset_cache()
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


def write_config(tmp: Path, assets, name: str) -> Path:
    data, model_dir = assets
    cfg = {
        "name": name,
        "save_path": str(tmp / "runs"),
        "seed": 5,
        "model": {"model_id": str(model_dir), "dtype": "float32", "param_dtype": "float32", "remat": "none",
                  "scan_layers": False},  # 2 layers: unrolled compiles faster
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(data), "length_buckets": [256, 320], "prefix_buckets": [256]},
        "curriculum": {"epochs_per_stage": 1, "max_latent_stage": 1},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 1},
        "lora": {"enabled": True, "rank": 2, "alpha": 4, "dropout": 0.1},
        "mesh": {"data": 2, "fsdp": 2, "tensor": 1},
        "train": {"num_epochs": 2, "batch_size_training": 1, "save_every_steps": 1},  # x 4 devices
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_qwen25vl_resumed_run_equals_uninterrupted_run_and_evaluates(assets, tmp_path, shared_compilations):
    from ivtlr_jax.eval.run import EvalConfig, evaluate

    straight = train(load_config(write_config(tmp_path / "a", assets, "straight")), log=quiet)
    # 8 rows / (1 row x 4 devices) = 2 micro-steps per epoch; stage 0 (no latents), stage 1 (one latent)
    assert straight.steps == 4 and len(straight.exports) == 2 and all(np.isfinite(straight.losses))

    cfg = load_config(write_config(tmp_path / "b", assets, "resumed"))
    first = train(cfg, max_steps=3, log=quiet)  # stopped in stage 1, after stage 0's export
    assert first.steps == 3 and not first.complete and len(first.exports) == 1
    lines = []
    resumed = train(cfg, log=lines.append)
    assert "resumed from" in "\n".join(lines) and resumed.trained_here == 1 and resumed.complete
    step_a, a = final_params(straight.run_dir)
    step_b, b = final_params(resumed.run_dir)
    assert step_a == step_b == 4 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    for stage in range(2):
        assert_same_export(straight.run_dir / f"stage_{stage}", resumed.run_dir / f"stage_{stage}")
    assert_metrics_once_per_step(resumed.run_dir / "metrics.jsonl", 4)
    export = resumed.run_dir / "stage_1"  # LoRA merged: transformers reads every weight of it, no more, no less
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    out = tmp_path / "eval.jsonl"
    eval_cfg = EvalConfig(DataSection(source=str(assets[0]), eval_split="test"), LatentSection(num_selected_patches=4),
                          ModelSection(dtype="float32", param_dtype="float32"),
                          EvalSection(num_latents=1, batch_size=4, max_new_tokens=6), limit=4)
    summary = evaluate(export, eval_cfg, out, log=quiet)
    assert summary["examples"] == 4 and 0.0 <= summary["accuracy_strict"] <= 1.0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(len(step) == 4 for r in records for step in r["selected_patches"])
