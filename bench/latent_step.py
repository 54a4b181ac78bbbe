"""Time of one IVT-LR training step (forward + backward) in JAX vs the official-style PyTorch loop and vs a
plain JAX step on a sequence of the same final length.

A random transformers `Qwen2VLForConditionalGeneration` (text hidden 256, 4 layers, 4 heads of 64, 2 KV
heads, vocabulary 1024; vision depth 2, embed 128) is saved to a temporary folder and loaded into Flax
with `from_pretrained`. The batch is in the official collator's layout (tests/oracle_ivtlr.py
`latent_batch`): one 224x224 image per row (64 merged image tokens), questions of different lengths
(so different left pads), `--latents` `<|latent|>` tokens per row, answers of 40-80 tokens.
Both sides train the same parameters: with `--train lora` (the default: the official setup, docs/method.md section 15)
LoRA r=64, alpha 16, dropout 0.05 on the 7 projections of the language model (peft on the torch side, in
train mode so its dropout is on; `add_lora` on the JAX side, with a dropout key), everything else frozen, so
neither side runs the vision tower's backward; with `--train full` every parameter. Three steps are timed:

- ivtlr: `jax.value_and_grad` of `ivtlr_loss` with respect to the trained parameters under `jax.jit`, as the
  trainer runs it (static `LatentShapes`: num_latents n, prefix_len = the first latent's index p and
  shared_prefix = p - 1; latent_grad="stop"; pixel_values stacked per image, [B, 256, 1176], as the
  collator stacks same-size images; the vision tower attends through `frame_attention`): the question slots once, the
  chain's prefill of the rest, n latent passes against the KV cache, then the forward + backward of the
  assembled sequence (length S + n*K) continuing from the question's cache.
- oracle: `oracle_ivtlr(official_compute=True)` (docs/method.md section 7, the way the official code runs it: n + 1
  full forwards over the growing sequence with eager attention, all attention matrices returned, every
  pass's LM-head logits kept and concatenated into the loss, whose rows for the passes are all -100,
  so the backward also runs through every pass, as in the official `IVTLR.forward`) +
  `loss.backward()` on the transformers model loaded with attn_implementation="eager"; gradients are
  zeroed before each call. The loss value is the same as without that extra work.
- plain: the same jitted JAX step with num_latents=0 (a plain forward + backward with the same chunked
  cross-entropy) on a batch of the same images and questions where the n latents are replaced by
  n*(K+1) ordinary text tokens labelled -100, so its length is the assembled one (S + n*K).

The goals: oracle/ivtlr >= 3x (the latent loop is fast) and ivtlr/plain <= 1.4x (the latent chain
costs little next to the training forward + backward it feeds). With `--breakdown` two more are timed:
the JAX chain alone (vision tower + prefill of the whole question + n latent passes, forward only; in
the step the question's slots are shared with the final pass, so this bounds the ivtlr overhead over
plain); and the torch step on the plain batch (`oracle_ivtlr` without latents + backward), which bounds
what the oracle's latent passes cost and so the best oracle/ivtlr possible.

Each JAX step's first call (trace + XLA compile + one run) is reported as "compile"; the torch step
gets one warm-up call. Then the median of `--repeats` rounds in which the calls alternate, so all see
the same machine load. The JAX loss is checked against the oracle's (fp32: relative diff ~1e-6; with
LoRA, B starts at zero, so the dropout masks, which differ between the sides, do not change the loss).
Compare ratios, not milliseconds, across machines. JAX runs on its default platform (printed).

With `--layouts` the ivtlr step is also timed with the vision tower attending per frame ([B, 256, 256]
blocks, no mask: the trainer's path for same-size images before issue #29, `bench.shared.per_frame_vision`)
in the same rounds, printing frame_attention/per-frame and the two losses' difference.

With `--unroll-layers` the model is loaded with scan_layers=False (layers unrolled: the faster choice for
a 4-layer model; the default scans them, as for 7B models).

    python bench/latent_step.py [--repeats 5] [--batch 4] [--latents 3] [--k 8] [--threads N]
                                [--train lora|full] [--rank 64] [--alpha 16] [--lora-dropout 0.05]
                                [--remat none|full|dots] [--unroll-layers] [--breakdown] [--layouts]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ivtlr_jax.latent import (LatentConfig, LatentShapes, image_inputs_of, ivtlr_loss,  # noqa: E402
                              first_latent_index, latent_layout, latent_passes, sequence_positions)
from ivtlr_jax.models.common.lora import LoRAConfig, add_lora, trainable_filter  # noqa: E402
from ivtlr_jax.train.step import split_trainable  # noqa: E402
from tests.oracle_ivtlr import oracle_ivtlr  # noqa: E402
from bench.timing import timed, interleaved_median_ms, cpu_seconds, other_load_note, warn_if_loaded  # noqa: E402
from bench.shared import (LATENT_ID, assembled_length_batch, build_models, latent_training_batch,  # noqa: E402
                          per_frame_vision, to_jax)


# ---- the timed steps -------------------------------------------------------------------------------
def train_step(graphdef, trainable, frozen, batch, dropout_key, cfg, shapes: LatentShapes):
    """(loss, gradients of the trainable parameters) of ivtlr_loss; shapes.num_latents=0 is a plain forward +
    backward. dropout_key: LoRA dropout in training mode (None: none). batch: same-size images stacked per
    image (`to_jax`), as the trainer's collator gives them."""
    def loss_of(trainable):
        model = nnx.merge(graphdef, trainable, frozen)
        return ivtlr_loss(model, batch, cfg, shapes, dropout_key=dropout_key)[0]
    return jax.value_and_grad(loss_of)(trainable)


def per_frame_train_step(graphdef, trainable, frozen, batch, dropout_key, cfg, shapes: LatentShapes):
    """`train_step` traced with the vision tower attending per frame (`per_frame_vision`): the baseline of
    `--layouts`. A function of its own, so that jit does not reuse `train_step`'s trace."""
    with per_frame_vision():
        return train_step(graphdef, trainable, frozen, batch, dropout_key, cfg, shapes)


STEP_STATICS = ("graphdef", "cfg", "shapes")
jax_train_step = jax.jit(train_step, static_argnames=STEP_STATICS)
jax_per_frame_train_step = jax.jit(per_frame_train_step, static_argnames=STEP_STATICS)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "n", "prefix_len"))
def jax_latent_chain(graphdef, trainable, frozen, batch, cfg, n, prefix_len):
    """Vision tower + prefill + n latent passes, forward only: (selected patches, latent states)."""
    model = nnx.merge(graphdef, trainable, frozen)
    embeds = model.embed_inputs(batch["input_ids"], **image_inputs_of(batch))
    p = first_latent_index(batch["input_ids"], cfg.latent_token_id)
    chain = latent_passes(model, cfg, embeds, batch, p, sequence_positions(model, cfg, batch, p), n=n,
                          prefix_len=prefix_len)
    return chain.selected, chain.latents


def oracle_train_step(hf, batch: dict, k: int) -> torch.Tensor:
    """The official-style step: zeroed gradients, n + 1 eager forwards (1 without latents), backward."""
    hf.zero_grad(set_to_none=True)
    loss = oracle_ivtlr(hf, "qwen2vl", batch, k, official_compute=True)[0]
    loss.backward()
    return loss.detach()


# ---- timing ----------------------------------------------------------------------------------------
def bench(args) -> list[str]:
    hf, model = build_models(args.remat, scan_layers=not args.unroll_layers)
    lora = LoRAConfig(enabled=args.train == "lora", rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout)
    dropout_key = None
    if lora.enabled:  # the official setup: adapters on the 7 projections, everything else frozen
        import peft

        add_lora(model, lora)
        peft.get_peft_model(hf, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules)))
        hf.train()  # LoRA dropout on, as the official training runs (the model has no other dropout)
        dropout_key = jax.random.key(0) if lora.dropout > 0 else None
    graphdef, trainable, frozen = split_trainable(model, trainable_filter(lora))
    torch_trained = sum(t.numel() for t in hf.parameters() if t.requires_grad)
    jax_trained = sum(x.size for x in jax.tree.leaves(trainable))
    assert torch_trained == jax_trained, (torch_trained, jax_trained)
    cfg = LatentConfig(LATENT_ID, args.k)
    batch = latent_training_batch(args.batch, args.latents)
    plain = assembled_length_batch(batch, args.latents, args.k)
    n, p = latent_layout(batch["input_ids"], LATENT_ID)
    s, s_plain = batch["input_ids"].shape[1], plain["input_ids"].shape[1]
    assert s_plain == s + n * args.k
    j_batch, j_plain = to_jax(batch), to_jax(plain)  # 224x224 images: [B, 256, 1176]
    ivtlr_shapes, plain_shapes = LatentShapes(n, p, p - 1), LatentShapes(0, s_plain)
    wait = jax.block_until_ready

    calls = {
        "ivtlr": lambda: wait(jax_train_step(graphdef, trainable, frozen, j_batch, dropout_key, cfg, ivtlr_shapes)),
        "oracle": lambda: oracle_train_step(hf, batch, args.k),
        "plain": lambda: wait(jax_train_step(graphdef, trainable, frozen, j_plain, dropout_key, cfg, plain_shapes)),
    }
    if args.breakdown:
        calls["chain"] = lambda: wait(jax_latent_chain(graphdef, trainable, frozen, j_batch, cfg, n, p))
        calls["torch plain"] = lambda: oracle_train_step(hf, plain, args.k)
    if args.layouts:  # the same step with the vision tower attending per frame
        calls["ivtlr per-frame"] = lambda: wait(jax_per_frame_train_step(graphdef, trainable, frozen, j_batch,
                                                                          dropout_key, cfg, ivtlr_shapes))
    compile_s, (jax_loss, _) = timed(calls["ivtlr"])
    per_frame_compile = timed(calls["ivtlr per-frame"]) if args.layouts else None
    plain_compile_s, _ = timed(calls["plain"])
    chain_compile_s = timed(calls["chain"])[0] if args.breakdown else None
    _, oracle_loss = timed(calls["oracle"])  # warm-up
    if args.breakdown:
        calls["torch plain"]()  # warm-up
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    ms = interleaved_median_ms(calls, args.repeats)
    load_note = other_load_note(cpu_start, time.perf_counter() - wall_start)

    jax_loss, oracle_loss = float(jax_loss), float(oracle_loss)
    lines = [
        f"batch {args.batch} x {s} tokens (first latent at {p}, {n} latents, K={args.k}) -> assembled {s_plain}; "
        f"remat {args.remat}; layers {'unrolled' if args.unroll_layers else 'scanned'}; "
        + (f"LoRA r={lora.rank} alpha={lora.alpha:g} dropout {lora.dropout:g} on {len(lora.target_modules)} projections"
           if lora.enabled else "full fine-tuning") + f" ({jax_trained:,} trained parameters on both sides)",
        f"loss: jax {jax_loss:.7f}, oracle {oracle_loss:.7f}, "
        f"rel diff {abs(jax_loss - oracle_loss) / abs(oracle_loss):.1e}",
        f"compile: ivtlr step {compile_s:.1f} s, plain step {plain_compile_s:.1f} s",
        f"ivtlr step {ms['ivtlr']:.1f} ms | oracle (torch, official-style) {ms['oracle']:.1f} ms "
        f"-> {ms['oracle'] / ms['ivtlr']:.1f}x faster (goal >= 3x) | plain step on assembled sequence "
        f"{ms['plain']:.1f} ms -> {ms['ivtlr'] / ms['plain']:.2f}x of plain (goal <= 1.4x)",
    ]
    if args.layouts:
        lines.append(layouts_line(ms, compile_s, per_frame_compile, jax_loss))
    if args.breakdown:
        lines.append(f"breakdown: jax latent chain alone (vision + prefill + {n} passes, forward) "
                     f"{ms['chain']:.1f} ms (compile {chain_compile_s:.1f} s); "
                     f"ivtlr - plain = {ms['ivtlr'] - ms['plain']:.1f} ms | "
                     f"torch plain step {ms['torch plain']:.1f} ms: oracle/torch plain "
                     f"{ms['oracle'] / ms['torch plain']:.2f}x, "
                     f"torch plain/jax plain {ms['torch plain'] / ms['plain']:.2f}x")
    return lines + [load_note] if load_note else lines


def layouts_line(ms: dict, compile_s: float, per_frame_compile: tuple, loss: float) -> str:
    """The ivtlr step's two vision attention paths, timed alternating in this run: per frame (the baseline,
    the trainer's before issue #29) and `frame_attention` (the trainer's)."""
    base_compile_s, (base_loss, _) = per_frame_compile
    base = ms["ivtlr per-frame"]
    return (f"layouts: ivtlr step, images stacked [B, Np, 1176]: per-frame attention {base:.1f} ms "
            f"(compile {base_compile_s:.1f} s) | frame_attention (the default) {ms['ivtlr']:.1f} ms "
            f"(compile {compile_s:.1f} s) -> frame_attention/per-frame {ms['ivtlr'] / base:.2f}; "
            f"loss rel diff {abs(float(base_loss) - loss) / abs(loss):.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latents", type=int, default=3, help="latents per row (n)")
    parser.add_argument("--k", type=int, default=8, help="selected patches per latent (K <= 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--train", choices=("lora", "full"), default="lora",
                        help="lora: the official setup (adapters on the 7 projections, the rest frozen); "
                             "full: every parameter")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (official: 64)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (official: 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (official: 0.05)")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--unroll-layers", action="store_true", help="load the model with scan_layers=False")
    parser.add_argument("--layouts", action="store_true",
                        help="also time the ivtlr step with the vision tower attending per frame (the old default)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the JAX latent chain alone and the torch plain step")
    args = parser.parse_args(argv)
    # the oracle ranks patches with float() of attention probabilities that require grad
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    if args.latents < 1 or not 1 <= args.k <= 64:
        parser.error("need --latents >= 1 and 1 <= --k <= 64 (a 224x224 image has 64 image tokens)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warn_if_loaded("before the run")
    print(f"jax devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; repeats: {args.repeats}")
    for line in bench(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
