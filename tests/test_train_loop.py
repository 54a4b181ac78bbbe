"""The training loop end to end on a tiny generated task: a run killed mid-epoch (SIGKILL) and resumed
ends with the same parameters as one that never stopped; run-folder safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from ivtlr_jax.config import load_config
from ivtlr_jax.demo import prepare
from ivtlr_jax.train.loop import RunFolderError, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_assets")
    prepare(root, seed=1, num_train=24, num_test=4)
    return root


def write_config(tmp: Path, assets: Path, name: str) -> Path:
    cfg = {
        "name": name,
        "save_path": str(tmp / "runs"),
        "seed": 3,
        "model": {"model_id": str(assets / "model"), "dtype": "float32", "param_dtype": "float32", "remat": "none"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(assets / "data"), "length_buckets": [256, 384, 512],
                 "prefix_buckets": [192, 256]},
        "curriculum": {"epochs_per_stage": 1, "max_latent_stage": 2},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 2},
        "lora": {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.1},
        "train": {"num_epochs": 3, "batch_size_training": 1, "save_every_steps": 1},  # x 4 devices
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_params(run_dir: Path) -> dict:
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    step = manager.latest_step()
    restored = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "trainable").absolute())
    manager.close()
    flat = {}

    def walk(node, prefix=()):
        for k, v in node.items():
            walk(v, (*prefix, k)) if isinstance(v, dict) else flat.__setitem__((*prefix, k), np.asarray(v))

    walk(restored)
    return step, flat


def test_killed_and_resumed_run_equals_uninterrupted_run(assets, tmp_path):
    straight = train(load_config(write_config(tmp_path, assets, "straight")), log=lambda *_: None)
    assert straight.steps == 3 * 6 and len(straight.exports) == 3  # 24 rows / (1 row x 4 devices), 3 stages

    cfg_path = write_config(tmp_path, assets, "killed")
    run_dir = tmp_path / "runs" / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as a checkpoint (of 2 micro-batches) has landed
        ckpts = run_dir / "checkpoints"
        if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_before and max(steps_before) < 18, steps_before  # really interrupted mid-run

    resumed = train(load_config(cfg_path), log=lambda *_: None)
    assert resumed.steps == straight.steps
    step_a, a = final_params(straight.run_dir)
    step_b, b = final_params(resumed.run_dir)
    assert step_a == step_b and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 18


def test_run_folder_with_other_content_or_config_is_refused(assets, tmp_path):
    cfg_path = write_config(tmp_path, assets, "guarded")
    run_dir = tmp_path / "runs" / "guarded"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty and is not a run folder"):
        train(load_config(cfg_path))
    (run_dir / "notes.txt").unlink()
    (run_dir / "config.yaml").write_text("name: something else\n")
    with pytest.raises(RunFolderError, match="different configuration"):
        train(load_config(cfg_path))
    assert (run_dir / "config.yaml").read_text() == "name: something else\n"  # nothing overwritten


def test_chameleon_trains_exports_and_evaluates(tmp_path):
    """The other family through the same loop: a tiny random Chameleon with a tiny ChameleonProcessor on
    the generated M3CoT-schema data (a cross pair), two stages, export, evaluation."""
    from flax import nnx

    from ivtlr_jax.data import (build_tiny_chameleon_processor, make_synthetic_m3cot, special_token_ids,
                                synthetic_corpus, synthetic_rows)
    from ivtlr_jax.data.tokenizer import save_processor
    from ivtlr_jax.eval.run import EvalConfig, evaluate
    from ivtlr_jax.models import Chameleon, ChameleonConfig
    from ivtlr_jax.models.export import save_hf

    data, model_dir = tmp_path / "data", tmp_path / "model"
    make_synthetic_m3cot(data, 8, 4, seed=2, image_size=32, fixed_choices=True)
    processor = build_tiny_chameleon_processor(model_dir, synthetic_corpus(synthetic_rows(8, 2, "train", 32, True)))
    # as in Chameleon's real tokenizer, the image codes have tokens of their own (never text targets,
    # whose logits the model suppresses)
    letters = lambda n: "".join(chr(65 + int(d)) for d in str(n))
    code_tokens = [f"IMGIMG{letters(c)}Z" for c in range(64)]
    processor.tokenizer.add_tokens(code_tokens)
    save_processor(processor, model_dir)
    ids = special_token_ids(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    code_ids = processor.tokenizer.convert_tokens_to_ids(code_tokens)
    config = ChameleonConfig.from_hf({
        "model_type": "chameleon", "vocab_size": ids["vocab_size"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": ids["eos_token_id"],
        "vq_config": {"embed_dim": 16, "num_embeddings": 64, "latent_channels": 16, "resolution": 32,
                      "base_channels": 32, "channel_multiplier": [1, 1, 2], "num_res_blocks": 1,
                      "attn_resolutions": []},
        "vocabulary_map": {"<image>": image_id, **dict(zip(code_tokens, code_ids))},
    })
    save_hf(Chameleon(config, rngs=nnx.Rngs(0)), model_dir)
    cfg_path = tmp_path / "cham.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "cham", "save_path": str(tmp_path / "runs"),
        "model": {"model_id": str(model_dir), "dtype": "float32", "param_dtype": "float32", "remat": "none"},
        "latent": {"num_selected_patches": 4},
        "data": {"dataset": "m3cot", "source": str(data), "length_buckets": [192, 256, 320],
                 "prefix_buckets": [128, 192]},
        "curriculum": {"epochs_per_stage": 1, "max_latent_stage": 1},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 1},
        "lora": {"enabled": True, "rank": 4, "alpha": 8},
        "train": {"num_epochs": 2, "batch_size_training": 1},
    }))
    result = train(load_config(cfg_path), log=lambda *_: None)
    assert result.steps == 4 and len(result.exports) == 2 and all(np.isfinite(result.losses))
    summary = evaluate(result.exports[-1], EvalConfig("m3cot", str(data), "test", num_latents=1, num_selected_patches=4,
                                                      batch_size=4, max_new_tokens=6), tmp_path / "eval.jsonl",
                       log=lambda *_: None)
    assert summary["examples"] == 4 and 0.0 <= summary["accuracy_strict"] <= 1.0
    # the official evaluation prompt: BOS and image markers before [Question]:, separator after the latents
    official_cfg = EvalConfig("m3cot", str(data), "test", num_latents=1, num_selected_patches=4, batch_size=4,
                              max_new_tokens=6, prompt_format="official")
    official = evaluate(result.exports[-1], official_cfg, tmp_path / "eval_official.jsonl", log=lambda *_: None)
    assert official["examples"] == 4 and official["prompt_format"] == "official"
    records = [json.loads(line) for line in (tmp_path / "eval_official.jsonl").read_text().splitlines()]
    assert all("\nA.{" in r["prompt"] and r["prompt"].rstrip().endswith("Answer:") for r in records)
    assert all(len(step) == 4 for r in records for step in r["selected_patches"])


def test_lookahead_hands_over_the_value_or_the_error_later():
    from ivtlr_jax.train.loop import Lookahead

    calls = []
    ready = Lookahead(lambda i: calls.append(i) or i * 10, 3)
    assert calls == [3] and ready.result() == 30  # computed at once, handed over later
    failed = Lookahead(lambda i: [][i], 5)  # an IndexError while preparing is not raised yet
    with pytest.raises(IndexError):
        failed.result()
