"""The embedded default job, run by `make demo`: no download, a few minutes on 2 CPU cores.

1. `--prepare` (done automatically when missing): a generated M3CoT-schema dataset whose answers depend
   on the image, a tiny tokenizer + Qwen2-VL processor trained on it, and a tiny random Qwen2-VL with
   that vocabulary, written as a Hugging Face folder (outputs/tiny/);
2. IVT-LR training through all curriculum stages with `configs/tiny.yaml` (the same code path as
   `python train.py --config configs/tiny.yaml`);
3. evaluation of the last stage's exported model on the test split (the same code as `infer.py`),
   with accuracy against chance.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from flax import nnx

from .compilation_cache import enable_compilation_cache
from .config import load_config
from .data import (build_tiny_qwen2vl_processor, make_synthetic_m3cot, special_tokens, synthetic_corpus,
                   synthetic_rows)
from .eval.run import eval_config_from_run, evaluate
from .models import Qwen2VL, Qwen2VLConfig
from .io import save_hf
from .run_folder import RunFolder
from .train.loop import train
from .train.preemption import PREEMPTED_EXIT_STATUS, Preempted

ROOT = Path("outputs/tiny")
NUM_TRAIN, NUM_TEST, NUM_CHOICES = 384, 64, 4


def prepare(root: Path = ROOT, seed: int = 0, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST) -> None:
    data, model_dir = root / "data", root / "model"
    make_synthetic_m3cot(data, num_train, num_test, seed, fixed_choices=True)
    corpus = synthetic_corpus(synthetic_rows(num_train, seed, "train", fixed_choices=True))
    processor = build_tiny_qwen2vl_processor(model_dir, corpus)
    special = special_tokens(processor)
    config = Qwen2VLConfig.from_hf({
        "model_type": "qwen2_vl",
        "vocab_size": special.vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "image_token_id": special.image_token_id,
        "video_token_id": special.video_token_id,
        "vision_start_token_id": special.vision_start_token_id,
        "vision_end_token_id": special.vision_end_token_id,
        "eos_token_id": special.eos_token_id,
        "vision_config": {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 128},
    })
    save_hf(Qwen2VL(config, rngs=nnx.Rngs(seed)), model_dir)
    example = write_example(data, root)
    print(f"prepared {data} ({num_train} train / {num_test} test rows) and {model_dir} "
          f"(vocabulary {special.vocab_size}); an image to ask about: {example}")


def write_example(data: Path, root: Path) -> Path:
    """The first test row's image as `example.png`, for README's quick start (`ivtlr-ask`, `ivtlr-serve`)."""
    import pyarrow.parquet as pq

    row = pq.read_table(data / "test.parquet").slice(0, 1).to_pylist()[0]
    (root / "example.png").write_bytes(row["image"]["bytes"])
    return root / "example.png"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--prepare", action="store_true", help="only (re)create the tiny model and dataset")
    p.add_argument("--overwrite", action="store_true", help="start from scratch (delete outputs/tiny)")
    args = p.parse_args(argv)
    if args.overwrite and ROOT.exists():
        shutil.rmtree(ROOT)
    if args.prepare or not (ROOT / "model" / "config.json").exists():
        prepare()
        if args.prepare:
            return
    enable_compilation_cache(log=print)  # as train.py and infer.py: a re-run compiles nothing
    cfg = load_config(args.config)
    try:
        print(train(cfg).summary())
    except Preempted as e:  # SIGTERM / Ctrl-C while training: checkpointed; the demo without --overwrite resumes
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_STATUS)
    exports = RunFolder(cfg.run_dir).stage_exports()
    final = exports[max(exports)]  # the last stage's export
    out = cfg.run_dir / "eval_test.jsonl"
    if out.exists():
        out.unlink()
    # the run config's data, latent settings and dtype (configs/tiny.yaml: float32)
    summary = evaluate(final, eval_config_from_run(cfg, eval=dict(batch_size=16, max_new_tokens=48)), out,
                       save_attention=cfg.run_dir / "attention", events=cfg.log)
    print(f"evaluation records in {out}, summary in {out.with_suffix('.summary.json')}, patch pictures in "
          f"{cfg.run_dir / 'attention'}, TensorBoard files in {cfg.run_dir / 'tensorboard'}")
    print(f"accuracy after the last stage: {summary['accuracy_strict']:.3f} (strict), "
          f"{summary['accuracy_official']:.3f} (official scoring); chance {1 / NUM_CHOICES:.3f}")
    from .report import main as report

    report([str(cfg.run_dir)])  # the per-stage table, and <run>/report.png (loss, gradient norm, tokens/s)
    print(f"ask it about an image: .venv/bin/ivtlr-ask --checkpoint {final} --image {ROOT / 'example.png'} "
          f"\"What colour is the large circle?\" --choice red --choice green --choice blue --choice yellow "
          f"(README: Ask and serve)")


if __name__ == "__main__":
    main()
