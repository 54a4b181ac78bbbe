"""Evaluate a trained model on M3CoT / ScienceQA with batched, jitted IVT-LR generation.

    python infer.py --config configs/qwen2vl_m3cot.yaml --checkpoint runs/qwen2vl_m3cot/stage_3 \
        [--split test] [--limit N] [--batch-size 8] [--out FILE] [--save-attention DIR]
        [--prompt-format train|official]

--checkpoint is a model folder (a stage export of train.py, a converted or a Hugging Face folder).
Writes one JSON line per example to --out (default: <checkpoint>/eval_<split>.jsonl) and a summary
next to it; re-running with the same --out skips the examples already written. --prompt-format official
uses the official evaluation scripts' prompts (REFERENCE.md 4-5) instead of the training format.
"""

import argparse
import json
from pathlib import Path

from ivtlr_jax.config import load_config
from ivtlr_jax.eval.run import EvalConfig, evaluate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True, help="model folder to evaluate")
    p.add_argument("--split", default=None, help="default: data.eval_split of the config")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latents", type=int, default=3, help="<|latent|> tokens after the question (official: 3)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", default=None)
    p.add_argument("--save-attention", default=None, help="folder for per-example PNGs of the selected patches")
    p.add_argument("--prompt-format", choices=("train", "official"), default="train",
                   help="train: the training prompt (default); official: the official evaluation scripts' prompt")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    split = args.split or cfg.data.eval_split
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{split}.jsonl"
    eval_cfg = EvalConfig(cfg.data.dataset, cfg.data.source, split, num_latents=args.latents,
                          num_selected_patches=cfg.latent.num_selected_patches, patch_order=cfg.latent.patch_order,
                          rope=cfg.latent.rope, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          limit=args.limit, scan_layers=cfg.model.scan_layers, prompt_format=args.prompt_format)
    summary = evaluate(args.checkpoint, eval_cfg, out, save_attention=args.save_attention)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
