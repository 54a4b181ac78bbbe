"""Evaluation of a model folder on M3CoT / ScienceQA: batched jitted generation, scoring (REFERENCE.md
section 4), one JSON line per example, a summary, optional pictures of the selected patches.

Prompts are `question + <|latent|> x num_latents` in the training format (the default; REFERENCE 4/5),
left-padded to a length bucket so that batches compile once per bucket. Re-running with the same
output file skips the examples already written (resumable).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data import load_examples, load_processor, materialize, special_token_ids
from ..data.collate import smallest_bucket
from ..generate import SamplingConfig, ivtlr_generate
from ..latent import LatentConfig
from ..models import from_pretrained, read_config
from .scoring import m3cot_official_correct, m3cot_strict_prediction, scienceqa_prediction
from .viz import draw_selection

FAMILY_OF = {"qwen2_vl": "qwen2vl", "chameleon": "chameleon"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    dataset: str
    source: str
    split: str = "test"
    num_latents: int = 3
    num_selected_patches: int = 32
    patch_order: str = "score"
    rope: str = "1d"
    batch_size: int = 8
    max_new_tokens: int = 512
    limit: int | None = None
    length_buckets: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    scan_layers: bool = True  # see DecoderLM
    prompt_format: str = "train"  # or "official": the official evaluation scripts' prompts (data.load_examples)


def left_pad(prompts: list[list[int]], pad_id: int, buckets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to a length bucket: (input_ids, attention_mask, position_ids)."""
    longest = max(map(len, prompts))
    length = smallest_bucket(longest, buckets) or longest
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)


def stack_images(images: list[dict]) -> dict:
    keys = images[0].keys()
    return {k: np.concatenate([im[k] if k != "pixel_values" or im[k].ndim != 3 else im[k][None] for im in images])
            for k in keys}


def evaluate(model_dir: str | Path, cfg: EvalConfig, out_file: str | Path, *, save_attention: str | Path | None = None,
             log=print) -> dict:
    model_dir = Path(model_dir)
    family_obj, _, _ = read_config(model_dir)
    family = FAMILY_OF[family_obj.config_cls.model_type]
    processor = load_processor(model_dir)
    tok = getattr(processor, "tokenizer", processor)
    ids = special_token_ids(processor)
    model = from_pretrained(model_dir, scan_layers=cfg.scan_layers)
    latent = LatentConfig(ids["latent_id"], cfg.num_selected_patches, cfg.patch_order, rope=cfg.rope)
    sampling = SamplingConfig(cfg.max_new_tokens, eos_token_id=ids["eos_token_id"], pad_token_id=ids["eos_token_id"])

    examples, report = load_examples(cfg.dataset, cfg.source, cfg.split, processor, family, limit=cfg.limit,
                                     max_length=10**9, prompt_format=cfg.prompt_format)
    out_file = Path(out_file)
    done = set()
    if out_file.exists():
        done = {json.loads(line)["id"] for line in out_file.read_text().splitlines() if line.strip()}
    todo = [ex for ex in examples if ex.id not in done]
    log(f"evaluating {model_dir} on {cfg.dataset}/{cfg.split}: {len(examples)} examples ({report}), "
        f"{len(done)} already in {out_file}")
    if save_attention:
        Path(save_attention).mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    start = time.perf_counter()
    gen_tokens = 0
    with open(out_file, "a") as f:
        for i in tqdm(range(0, len(todo), cfg.batch_size), desc="eval", disable=None):
            chunk = todo[i : i + cfg.batch_size]
            prompts = [ex.question_ids + [latent.latent_token_id] * cfg.num_latents + ex.prompt_suffix for ex in chunk]
            input_ids, mask, pos = left_pad(prompts, ids["eos_token_id"], cfg.length_buckets)
            images = [materialize(ex.image) for ex in chunk]
            batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, **stack_images(images)}
            out = ivtlr_generate(model, batch, latent, sampling)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            selected = np.asarray(out.selected)
            for row, ex in enumerate(chunk):
                generated = tok.decode(tokens[row, : lengths[row]], skip_special_tokens=True)
                prompt_text = tok.decode(ex.question_ids + ex.prompt_suffix, skip_special_tokens=True)
                record = score(cfg.dataset, ex, prompt_text, generated)
                offset = input_ids.shape[1] - len(prompts[row])
                image_positions = [j for j, t in enumerate(ex.question_ids) if t == model.config.image_token_id]
                steps = [[image_positions.index(int(s) - offset) for s in selected[step, row]]
                         for step in range(selected.shape[0])]
                record.update(selected_patches=steps, generated_tokens=int(lengths[row]))
                gen_tokens += int(lengths[row])
                f.write(json.dumps(record) + "\n")
                if save_attention:
                    save_picture(ex, images[row], steps, family, Path(save_attention) / f"{ex.id}.png")
            f.flush()
    elapsed = time.perf_counter() - start
    summary = summarize(out_file, cfg.dataset)
    summary.update(time_per_example_s=elapsed / max(len(todo), 1),
                   generated_tokens_per_s=gen_tokens / max(elapsed, 1e-9), prompt_format=cfg.prompt_format)
    out_file.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def score(dataset: str, ex, prompt_text: str, generated: str) -> dict:
    meta = ex.meta
    record = {"id": ex.id, "prompt": prompt_text, "generated": generated, "choices": meta.get("choices"),
              "domain": meta.get("domain") or meta.get("subject"), "topic": meta.get("topic")}
    if dataset == "m3cot":
        gold = str(meta["answer"]).strip().upper()
        strict = m3cot_strict_prediction(generated)
        record.update(gold=gold, prediction=strict, correct=strict == gold,
                      correct_official=m3cot_official_correct(prompt_text + generated, gold))
    else:
        gold = int(meta["answer"])
        pred = scienceqa_prediction(generated)
        record.update(gold=gold, prediction=pred, correct=pred == gold, correct_official=pred == gold)
    return record


def summarize(out_file: Path, dataset: str) -> dict:
    records = [json.loads(line) for line in Path(out_file).read_text().splitlines() if line.strip()]
    by_domain = defaultdict(list)
    for r in records:
        by_domain[str(r.get("domain"))].append(r["correct"])
    n = max(len(records), 1)
    return {
        "dataset": dataset,
        "examples": len(records),
        "accuracy_strict": sum(r["correct"] for r in records) / n,
        "accuracy_official": sum(r["correct_official"] for r in records) / n,
        "accuracy_by_domain": {d: sum(v) / len(v) for d, v in sorted(by_domain.items())},
        "avg_generated_tokens": sum(r["generated_tokens"] for r in records) / n,
    }


def save_picture(ex, image: dict, steps: list[list[int]], family: str, path: Path) -> None:
    """The image as the model saw it, with each step's selected patches."""
    from ..data import decode_image

    raw = getattr(ex.image, "_data", None)  # a LazyImage keeps the encoded bytes
    if family == "qwen2vl":
        _, gh, gw = (int(v) for v in image["image_grid_thw"][0])
        grid, size = (gh // 2, gw // 2), (gw * 14, gh * 14)
    else:
        side = image["pixel_values"].shape[-1]
        grid, size = (side // 16, side // 16), (side, side)
    picture = np.asarray(decode_image(raw).convert("RGB").resize(size)) if raw is not None else \
        np.full((size[1], size[0], 3), 127, np.uint8)
    draw_selection(picture, grid, steps).save(path)
