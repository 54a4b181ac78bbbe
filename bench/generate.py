"""Throughput of batched jitted IVT-LR generation (`ivtlr_generate`) vs the official-style PyTorch
generation, one example at a time, on the same random Qwen2-VL.

A random transformers `Qwen2VLForConditionalGeneration` (text hidden 256, 4 layers, 4 heads of 64, 2 KV
heads, vocabulary 1024 keeping hf_tiny's special ids 290-295; vision depth 2, embed 128) is saved to a
temporary folder and loaded into Flax with `from_pretrained` (fp32) and back into transformers with eager
attention (the oracle needs the attention matrices). Prompts: ~40 text tokens around one 224x224 image
(64 merged image tokens), then `--latents` `<|latent|>` tokens; K = `--k` patches per latent; greedy, no
EOS, so every row generates exactly `--new-tokens` tokens.

- jax: `ivtlr_generate` on the first B prompts left-padded together, for each B of `--batches`: vision
  tower + prefill + the n latent passes against the KV cache, then `lax.while_loop` decoding from the
  same cache. The first call per B (trace + XLA compile + one run) is reported as "compile".
- torch (the official-style baseline, batch 1): `oracle_ivtlr` (tests/oracle_ivtlr.py: the n latent
  forwards over the growing sequence with all attention matrices, then the final full forward, as the
  official code runs before generating), then greedy decoding with transformers' KV cache: the language
  model over the assembled embeddings with use_cache=True, then one token at a time with the returned
  cache. Before timing, its tokens are checked against `oracle_generate` (which re-runs the full sequence
  every step) on the first prompt. One prompt per timed call, cycling through the first prompts; one
  warm-up call.

The timed calls alternate (jax B=1, jax B=8, ..., torch) for `--repeats` rounds and the median of each
is taken, so all see the same machine load. Reported: examples/s and generated tokens/s of each, and
jax examples/s / torch examples/s per batch size (goal: >= 10x at batch 8 on CPU). The greedy tokens of
the JAX batch-1 run on the first prompt are compared with the torch baseline's, and row 0 of every JAX
batch with the batch-1 run. Absolute numbers depend on the machine and its load: compare the ratios
measured in the same process, not examples/s, across machines. JAX runs on its default platform
(printed; set JAX_PLATFORMS=cpu to force the CPU).

With `--unroll-layers` the model is loaded with scan_layers=False (layers unrolled, the faster choice
for a 4-layer model; the default scans them, as for 7B models).

    python bench/generate.py [--repeats 10] [--batches 1,8,32] [--new-tokens 32] [--latents 3] [--k 8]
                             [--threads N] [--unroll-layers]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ivtlr_jax.data.collate import left_padded_positions  # noqa: E402
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate  # noqa: E402
from ivtlr_jax.latent import LatentConfig  # noqa: E402
from tests import hf_tiny  # noqa: E402
from tests.oracle_ivtlr import oracle_generate, oracle_ivtlr  # noqa: E402
from bench.timing import timed, interleaved_median_ms, cpu_seconds, other_load_note, warn_if_loaded  # noqa: E402
from bench.shared import IMAGE_SIZE, LATENT_ID, build_models, stacked_images  # noqa: E402  (same model)

QUESTION_TEXT = (36, 45)  # [low, high) text tokens per question, split before / after the image


# ---- prompts ----------------------------------------------------------------------------------------
def make_prompts(count: int, latents: int, seed: int = 0) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(one unpadded batch-of-one dict per prompt, all pixel_values, all image_grid_thw)."""
    rng = np.random.default_rng(seed)
    pixel_values, grid = hf_tiny.image_inputs([IMAGE_SIZE] * count, seed=seed)
    patches = grid.prod(-1)
    starts = np.concatenate([[0], np.cumsum(patches)])
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    singles = []
    for i in range(count):
        words = int(rng.integers(*QUESTION_TEXT))
        before = int(rng.integers(2, words - 1))
        row = (text(before) + [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * int(patches[i] // 4)
               + [hf_tiny.VISION_END] + text(words - before) + [LATENT_ID] * latents)
        ids = np.asarray([row])
        singles.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "position_ids": np.arange(len(row))[None],
                        "pixel_values": pixel_values[starts[i]:starts[i + 1]], "image_grid_thw": grid[i:i + 1]})
    return singles, pixel_values, grid


def left_padded(singles: list[dict], pixel_values: np.ndarray, grid: np.ndarray) -> dict:
    """The prompts left-padded to a common length (so their latents align), as ivtlr_generate wants; the
    same-size images stacked per image ([B, 256, 1176], as the collator stacks them)."""
    ids, mask = hf_tiny.pad_rows([s["input_ids"][0].tolist() for s in singles], left_pad=True)
    b = len(singles)
    return stacked_images({"input_ids": ids, "attention_mask": mask,
                           "position_ids": left_padded_positions(mask),
                           "pixel_values": pixel_values[: int(grid[:b].prod(-1).sum())], "image_grid_thw": grid[:b]})


# ---- the torch baseline ---------------------------------------------------------------------------
def torch_generate(hf, single: dict, k: int, new_tokens: int) -> list[int]:
    """Official-style generation of one unpadded prompt: `oracle_ivtlr` (latent passes + the final full
    forward), then greedy decoding with transformers' KV cache."""
    lm, table = hf.model.language_model, hf.model.get_input_embeddings()
    batch = dict(single, labels=single["input_ids"], latent_token_id=LATENT_ID)
    with torch.no_grad():
        _, _, embeds, mask = oracle_ivtlr(hf, "qwen2vl", batch, k)
        length = embeds.shape[1]
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(length)[None], use_cache=True)
        token = hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1)  # [1]
        tokens = [int(token)]
        for step in range(1, new_tokens):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            position = torch.tensor([[length + step - 1]])
            out = lm(inputs_embeds=table(token[:, None]), attention_mask=mask, position_ids=position, cache=out.cache,
                     use_cache=True)
            token = hf.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            tokens.append(int(token))
    return tokens


# ---- timing ---------------------------------------------------------------------------------------
def bench(args, batches: list[int]) -> list[str]:
    hf, model = build_models(scan_layers=not args.unroll_layers)  # the benches' model (bench/shared.py)
    latent = LatentConfig(LATENT_ID, args.k)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)  # no EOS: every row runs the full length
    torch_pool = min(max(batches), 8)  # prompts the torch baseline cycles through
    singles, pixel_values, grid = make_prompts(max(batches), args.latents)
    jax_batches = {b: left_padded(singles[:b], pixel_values, grid) for b in batches}

    # the cached torch baseline equals the full-recompute oracle
    oracle_single = dict(singles[0], latent_token_id=LATENT_ID)
    reference = oracle_generate(hf, "qwen2vl", oracle_single, args.k, args.new_tokens)
    baseline_tokens = torch_generate(hf, singles[0], args.k, args.new_tokens)
    lines = [f"prompts: {singles[0]['input_ids'].shape[1]}-{max(s['input_ids'].shape[1] for s in singles)} tokens "
             f"({args.latents} latents, K={args.k}, 64 image tokens), {args.new_tokens} new tokens, no EOS; "
             f"layers {'unrolled' if args.unroll_layers else 'scanned'}",
             f"check: torch KV-cache baseline tokens == oracle_generate (full recompute) on prompt 0: "
             f"{baseline_tokens == reference}"]

    def jax_call(b):
        return lambda: jax.block_until_ready(ivtlr_generate(model, jax_batches[b], latent, sampling))

    cursor = {"i": 0}

    def torch_call():
        single = singles[cursor["i"] % torch_pool]
        cursor["i"] += 1
        return torch_generate(hf, single, args.k, args.new_tokens)

    calls = {f"jax B={b}": jax_call(b) for b in batches} | {"torch B=1": torch_call}
    compile_s, outputs = {}, {}
    for b in batches:
        compile_s[b], outputs[b] = timed(calls[f"jax B={b}"])
    calls["torch B=1"]()  # warm-up
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    ms = interleaved_median_ms(calls, args.repeats)
    load_note = other_load_note(cpu_start, time.perf_counter() - wall_start)

    first = min(batches)
    jax_first = np.asarray(outputs[first].tokens[0]).tolist()
    lines.append(f"check: jax B={first} greedy tokens == torch baseline on prompt 0: {jax_first == baseline_tokens}"
                 + ("" if jax_first == baseline_tokens else f" (jax {jax_first}, torch {baseline_tokens})"))
    same_row = all(np.asarray(outputs[b].tokens[0]).tolist() == jax_first for b in batches)
    lines.append(f"check: row 0 of every jax batch == the B={first} run: {same_row}")
    lines.append("compile (trace + XLA compile + one run): "
                 + ", ".join(f"B={b} {compile_s[b]:.1f} s" for b in batches))
    torch_eps = 1e3 / ms["torch B=1"]
    lines.append(f"torch B=1 (official-style, KV cache): {ms['torch B=1']:.1f} ms/example -> "
                 f"{torch_eps:.2f} examples/s, "
                 f"{torch_eps * args.new_tokens:.1f} generated tokens/s")
    for b in batches:
        eps = b * 1e3 / ms[f"jax B={b}"]
        goal = " (goal >= 10x at B=8)" if b == 8 else ""
        lines.append(f"jax B={b}: {ms[f'jax B={b}']:.1f} ms/call -> {eps:.2f} examples/s, "
                     f"{eps * args.new_tokens:.1f} generated tokens/s -> {eps / torch_eps:.1f}x torch{goal}")
    return lines + [load_note] if load_note else lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated JAX batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row (no EOS)")
    parser.add_argument("--latents", type=int, default=3, help="<|latent|> tokens per prompt (n)")
    parser.add_argument("--k", type=int, default=8, help="selected patches per latent (K <= 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--unroll-layers", action="store_true", help="load the model with scan_layers=False")
    args = parser.parse_args(argv)
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--batches {args.batches!r}: expected comma-separated integers")
    if not batches or min(batches) < 1:
        parser.error("--batches needs positive batch sizes")
    if args.latents < 1 or not 1 <= args.k <= 64 or args.new_tokens < 1:
        parser.error("need --latents >= 1, 1 <= --k <= 64 (a 224x224 image has 64 image tokens), --new-tokens >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warn_if_loaded("before the run")
    print(f"jax devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; repeats: {args.repeats}",
          flush=True)
    for line in bench(args, batches):
        print(line, flush=True)


if __name__ == "__main__":
    main()
