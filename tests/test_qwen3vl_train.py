"""Qwen3-VL through `train.py`: a tiny random Qwen3-VL (DeepStack into 2 of its 2 decoder layers) with a tiny
Qwen3VLProcessor (16-pixel patches) on generated M3CoT-schema data, two curriculum stages (no latents,
then one) on a data x fsdp mesh of 4 host devices, with `latent.patch_deepstack: false`; the stage exports
load in transformers as they are and carry that choice to infer.py and the Predictor (ivtlr-ask, ivtlr-serve);
the run folder exports as a PEFT adapter (convert/flax_to_hf.py --peft) equal to the merged stage export.

Kept small (8 train rows, 4 micro-steps, a 2-layer LM, one training run for the module): the suite's time budget."""

import dataclasses
import json
import warnings
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import hf_tiny
from tests.convert_helpers import tensors_of
from tests.test_qwen25vl_convert import hf_logits
from tests.test_qwen25vl_train import write_config

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 8, 4


def prepare_assets(root: Path) -> tuple[Path, Path]:
    """(data folder, model folder): generated data, a tiny BPE in a Qwen3VLProcessor, and a tiny random
    Qwen3-VL with that vocabulary saved as a Hugging Face folder (model_type qwen3_vl)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from ivtlr_jax.data import make_synthetic_m3cot, special_tokens, synthetic_corpus, synthetic_rows

    data, model_dir = root / "data", root / "model"
    make_synthetic_m3cot(data, NUM_TRAIN, NUM_TEST, seed=1, image_size=84, fixed_choices=True)
    corpus = synthetic_corpus(synthetic_rows(NUM_TRAIN, 1, "train", 84, fixed_choices=True))
    processor = hf_tiny.build_qwen3vl_processor(model_dir, corpus)  # images are resized to 320x320
    ids = dataclasses.asdict(special_tokens(processor))
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run config file, run folder, environment) of one train.py run with latent.patch_deepstack: false."""
    tmp = tmp_path_factory.mktemp("qwen3vl_train")
    config = write_config(tmp, prepare_assets(tmp / "assets"), "qwen3vl_tiny")  # Qwen2.5-VL's run
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "latent": {**raw["latent"], "patch_deepstack": False}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, tmp / "runs" / "qwen3vl_tiny", env


def test_train_py_trains_qwen3vl_and_its_exports_load_in_transformers(trained):
    from transformers import Qwen3VLForConditionalGeneration

    _, run_dir, _ = trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    # 8 rows / (1 row x 4 devices) = 2 micro-steps per epoch; stage 0 (no latents), stage 1 (one latent)
    assert len(losses) == 4 and np.all(np.isfinite(losses)), metrics
    for stage in (0, 1):  # LoRA merged: transformers reads every weight of each export, no more, no less
        _, info = Qwen3VLForConditionalGeneration.from_pretrained(run_dir / f"stage_{stage}",
                                                                  output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_the_runs_deepstack_choice_reaches_its_export_ask_and_infer(trained, tmp_path):
    """latent.patch_deepstack: false is written into the stage export's ivtlr_settings.json, so the
    Predictor (ivtlr-ask, ivtlr-serve) uses it, and infer.py evaluates with it (recorded in its setup)."""
    from ivtlr_jax.predict import Predictor

    config, run_dir, env = trained
    assert json.loads((run_dir / "stage_1" / "ivtlr_settings.json").read_text())["patch_deepstack"] is False
    assert Predictor.from_folder(run_dir / "stage_1").latent.patch_deepstack is False
    out = tmp_path / "eval_test.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--config", str(config), "--checkpoint",
                           str(run_dir / "stage_1"), "--limit", "2", "--max-new-tokens", "2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 2
    assert json.loads((tmp_path / "eval_test.setup.json").read_text())["patch_deepstack"] is False


def test_qwen3vl_run_exports_a_peft_adapter_equal_to_the_merged_export(trained, tmp_path):
    """convert/flax_to_hf.py --peft on the run folder: base/ + adapter/ that PEFT loads on Qwen3-VL (names
    as PEFT's own model built from the adapter's config, the vision tower not adapted), giving the logits
    and, merged by PEFT, the weights of the last stage export (LoRA merged by us)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from ivtlr_jax.models.common.lora import OFFICIAL_TARGETS

    config, run_dir, env = trained
    out = tmp_path / "peft"
    proc = subprocess.run([sys.executable, str(ROOT / "convert" / "flax_to_hf.py"), "--checkpoint", str(run_dir),
                           "--out", str(out), "--peft"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda path: Qwen3VLForConditionalGeneration.from_pretrained(path).eval()
    fresh = get_peft_model(load(out / "base"), LoraConfig.from_pretrained(out / "adapter"))
    expected = {k.replace(".default.", ".") for k in fresh.state_dict() if ".lora_" in k}
    assert set(tensors_of(out / "adapter")) == expected and len(expected) == 2 * len(OFFICIAL_TARGETS) * 2
    assert not [k for k in expected if "visual" in k]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load(out / "base"), out / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    merged = load(run_dir / "stage_1")  # the last checkpoint is the end of stage 1
    ids, mask, pv, grid = image_batch(merged.config)
    got = hf_logits(peft_model, (ids, mask, pv, grid), merged.config.image_token_id)
    ref = hf_logits(merged, (ids, mask, pv, grid), merged.config.image_token_id)
    assert np.abs(got - ref)[mask.astype(bool)].max() <= 1e-5
    peft_weights = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged_weights = {k: v.numpy() for k, v in merged.state_dict().items()}
    assert sorted(peft_weights) == sorted(merged_weights)
    for name, w in merged_weights.items():
        np.testing.assert_allclose(peft_weights[name], w, atol=1e-6, rtol=0, err_msg=name)


def image_batch(config, seed=0):
    """Two right-padded rows `text, <vision_start>, <image_pad> x n, <vision_end>, text` in the run's
    vocabulary, with images of 4x4 and 8x10 patches."""
    rng = np.random.default_rng(seed)
    pv, grid = hf_tiny.qwen3vl_image_inputs(hf_tiny.QWEN3VL_IMAGE_SIZES, seed)
    text = lambda k: list(rng.integers(3, config.vision_start_token_id, k))
    rows = [text(a) + [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
            + text(b) for n, (a, b) in zip((grid.prod(-1) // 4).tolist(), [(5, 7), (3, 2)])]
    return hf_tiny.pad_rows(rows) + (pv, grid)


def test_a_qwen3vl_run_stopped_mid_stage_resumes_to_the_uninterrupted_run(trained, tmp_path):
    """`train.py --max-steps 3` (stopped in stage 1, after stage 0's export), then the same command without it:
    the parameters and both stage exports equal the uninterrupted run's, bit for bit, and each micro-step is
    recorded once."""
    from tests.test_train_loop import assert_metrics_once_per_step, assert_same_export, final_params

    config, straight, env = trained
    raw = yaml.safe_load(config.read_text())
    resumed_config = tmp_path / "resumed.yaml"
    resumed_config.write_text(yaml.safe_dump({**raw, "name": "resumed", "save_path": str(tmp_path / "runs")}))
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(resumed_config)]
    first = subprocess.run(command + ["--max-steps", "3"], env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0 and "resumed from" in second.stdout + second.stderr, second.stderr[-3000:]
    resumed = tmp_path / "runs" / "resumed"
    (step_a, a), (step_b, b) = final_params(straight), final_params(resumed)
    assert step_a == step_b == 4 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    for stage in range(2):
        assert_same_export(straight / f"stage_{stage}", resumed / f"stage_{stage}")
    assert_metrics_once_per_step(resumed / "metrics.jsonl", 4)
