"""Tokens/s of the sharded IVT-LR train step (`make_train_step`) on a 4-device CPU mesh vs 1 device, and
vs the official-style PyTorch step, on the same random Qwen2-VL and the same batch.

A random transformers `Qwen2VLForConditionalGeneration` (text hidden 256, 4 layers, 4 heads of 64, 2 KV
heads, vocabulary 1024; vision depth 2, embed 128) is saved to a temporary folder and loaded into Flax with
`from_pretrained` (fp32) once per variant, and into transformers with eager attention. The batch is in the
official collator's layout (tests/oracle_ivtlr.py `latent_batch`): `--batch` rows (the global batch), one
224x224 image per row (64 merged image tokens), questions of different lengths (so different left pads),
`--latents` `<|latent|>` tokens per row, answers of 40-80 tokens; K = `--k`. Four steps are timed:

- jax lora mesh: `make_train_step` with explicit in/out shardings on a (data=4, fsdp=1, tensor=1) mesh of
  4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, set before jax is imported); LoRA
  r=`--rank` on the 7 official projections (dropout `--lora-dropout`, default 0.05 as the official
  runs), AdamW on the adapters. The rows are split over the data axis; the images are replicated (each
  replica runs the vision tower on all of them).
- jax lora 1 device: the same step on a 1-device mesh, same global batch.
- jax full 1 device: the same step, full fine-tuning (every parameter trained by AdamW, no LoRA).
- torch full: `oracle_ivtlr(official_compute=True)` (n + 1 eager full forwards over the growing
  sequence, attention matrices returned, every pass's logits in the loss as the official code does)
  + `loss.backward()` + global-norm clipping + AdamW over every parameter. The official
  IVT-LR trains LoRA; the oracle is a full-parameter backward, so "jax full 1 device" is the
  apples-to-apples JAX step for it, while "jax lora" vs "torch full" mixes a LoRA and a full backward.

All steps use loss_scale="token_mean" with the batch's supervised token count as denominator, so every
loss is the batch token mean the oracle computes; the first-call losses are compared (LoRA's B starts at
zero, so its first loss is the base model's too). latent_grad="stop" (official); static shapes
`LatentShapes(n, prefix_len = the first latent's index, shared_prefix=0)`; pixel_values stacked per image
([B, 256, 1176], as the collator stacks same-size images). Each
JAX step's first call (trace + XLA compile + one run) is reported as "compile"; the torch step gets one
warm-up call. Then `--repeats` rounds in which the calls alternate, so all see the
same machine load, and the median of each. Reported: supervised tokens/s (answer + EOS labels) and total
tokens/s (the real tokens of the assembled sequences: input tokens without padding + n*K inserted patches
per row), and the ratios. On a machine with fewer cores than mesh devices the mesh cannot beat 1 device:
the host devices share the cores and the vision tower runs on every replica; that run shows the sharded
step works and what partitioning costs. Absolute numbers depend on the machine and its load: compare
the ratios measured in the same process.

    python bench/train_step.py [--repeats 5] [--batch 8] [--latents 3] [--k 8] [--rank 8] [--lora-dropout 0.05]
                               [--threads N]
"""

from __future__ import annotations

import os

DEVICES = 4
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU mesh of host devices
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ivtlr_jax.config import OptimSection  # noqa: E402
from ivtlr_jax.latent import LatentConfig, LatentShapes, latent_layout  # noqa: E402
from ivtlr_jax.io import from_pretrained  # noqa: E402
from ivtlr_jax.models import ShardingRules, make_mesh  # noqa: E402
from ivtlr_jax.models.common.sharding import batch_shardings, state_shardings  # noqa: E402
from ivtlr_jax.models.common.lora import LoRAConfig, add_lora, trainable_filter  # noqa: E402
from ivtlr_jax.train.optim import make_optimizer  # noqa: E402
from ivtlr_jax.train.step import (StepConfig, init_optimizer, make_train_step,  # noqa: E402
                                  split_trainable, step_shardings)
from tests.oracle_ivtlr import IGNORE, oracle_ivtlr  # noqa: E402
from bench.timing import timed, interleaved_median_ms, cpu_seconds, other_load_note, warn_if_loaded  # noqa: E402
# the same mid-size model and batch as the latent-step benchmark
from bench.shared import LATENT_ID, latent_training_batch, mid_qwen2vl_folder, stacked_images  # noqa: E402

OPTIM = OptimSection(lr=1e-5, gradient_accumulation_steps=1)  # clip 0.7 + AdamW, as the runs


# ---- the steps ------------------------------------------------------------------------------------
class JaxStep:
    """One sharded train step and its (donated, so carried) trainable and optimizer state."""

    def __init__(self, folder, rules: ShardingRules, lora: LoRAConfig, batch: dict, cfg: StepConfig,
                 shapes: LatentShapes, denominator: float):
        model = from_pretrained(folder, rules=rules)
        if lora.enabled:
            add_lora(model, lora)
        graphdef, trainable, self.frozen = split_trainable(model, trainable_filter(lora))
        tx = make_optimizer(OPTIM)
        self.trainable = jax.device_put(trainable, state_shardings(trainable, rules))
        self.opt_state = init_optimizer(tx, self.trainable, rules)
        # same-size images stacked per image, as the collator's batches
        jbatch = {k: jnp.asarray(v) for k, v in stacked_images(batch).items() if k != "latent_token_id"}
        self.batch = jax.device_put(jbatch, batch_shardings(jbatch, rules))
        shardings = step_shardings(self.trainable, self.frozen, self.opt_state, self.batch, rules)
        self.step = make_train_step(graphdef, tx, cfg, rules=rules, shardings=shardings)
        self.shapes = shapes  # the step's static argument
        self.denominator = jnp.float32(denominator)
        self.trainable_count = sum(x.size for x in jax.tree.leaves(self.trainable))
        self.calls = 0

    def __call__(self) -> dict:
        key = jax.random.key(self.calls)
        self.calls += 1
        self.trainable, self.opt_state, metrics = self.step(self.trainable, self.frozen, self.opt_state, self.batch,
                                                            key, self.denominator, self.shapes)
        return jax.block_until_ready(metrics)


class TorchStep:
    """The official-style step: zeroed gradients, `oracle_ivtlr`, backward, clipping, AdamW (every parameter)."""

    def __init__(self, hf, batch: dict, k: int):
        self.hf, self.batch, self.k = hf, batch, k
        self.optimizer = torch.optim.AdamW(hf.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                           weight_decay=OPTIM.weight_decay)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = oracle_ivtlr(self.hf, "qwen2vl", self.batch, self.k, official_compute=True)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), OPTIM.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())


# ---- timing -----------------------------------------------------------------------------------------
# ---- the benchmark ------------------------------------------------------------------------------------
def bench(args) -> list[str]:
    batch = latent_training_batch(args.batch, args.latents)
    n, p = latent_layout(batch["input_ids"], LATENT_ID)
    supervised = int(np.sum(batch["labels"][:, 1:] != IGNORE))  # what the step's cross-entropy counts
    total = int(batch["attention_mask"].sum()) + args.batch * n * args.k  # real tokens of the assembled rows
    cfg = StepConfig(LatentConfig(LATENT_ID, args.k), group_size=args.batch // DEVICES, loss_scale="token_mean")
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=args.lora_dropout)
    mesh_rules = ShardingRules(make_mesh(data=DEVICES, fsdp=1, tensor=1))
    one_rules = ShardingRules(make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1]))

    with mid_qwen2vl_folder() as (folder, hf):
        common = (batch, cfg, LatentShapes(n, p), supervised)
        steps = {
            f"jax lora {DEVICES} devices": JaxStep(folder, mesh_rules, lora, *common),
            "jax lora 1 device": JaxStep(folder, one_rules, lora, *common),
            "jax full 1 device": JaxStep(folder, one_rules, LoRAConfig(enabled=False), *common),
        }
    calls = dict(steps) | {"torch full": TorchStep(hf, batch, args.k)}
    compile_s, first_loss = {}, {}
    for name, step in steps.items():
        compile_s[name], metrics = timed(step)
        first_loss[name] = float(metrics["loss"])
        assert int(metrics["tokens"]) == supervised, (int(metrics["tokens"]), supervised)
    first_loss["torch full"] = calls["torch full"]()  # warm-up
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    ms = interleaved_median_ms(calls, args.repeats)
    load_note = other_load_note(cpu_start, time.perf_counter() - wall_start)

    ref = first_loss["torch full"]
    mesh_name = f"jax lora {DEVICES} devices"
    lines = [
        f"batch {args.batch} x {batch['input_ids'].shape[1]} tokens (first latent at {p}, {n} latents, K={args.k}); "
        f"{supervised} supervised tokens, {total} total (assembled, no padding); LoRA r={args.rank} "
        f"dropout {args.lora_dropout}: "
        f"{steps[mesh_name].trainable_count:,} trainable vs {steps['jax full 1 device'].trainable_count:,} full",
        "first-call loss (before any update): " + ", ".join(f"{k} {v:.7f}" for k, v in first_loss.items())
        + f"; max rel diff to torch {max(abs(v - ref) for v in first_loss.values()) / abs(ref):.1e}",
        "compile (trace + XLA compile + one run): " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()),
    ]
    for name, t in ms.items():
        lines.append(f"{name}: {t:.0f} ms/step -> {supervised * 1e3 / t:.0f} supervised tokens/s, "
                     f"{total * 1e3 / t:.0f} total tokens/s")
    lines += [
        f"mesh vs 1 device (LoRA): {ms['jax lora 1 device'] / ms[mesh_name]:.2f}x the 1-device throughput "
        f"({DEVICES} host devices on {os.cpu_count()} cores)",
        f"jax full 1 device vs torch full (apples to apples: both full-parameter backward + AdamW): "
        f"{ms['torch full'] / ms['jax full 1 device']:.1f}x",
        f"jax lora 1 device vs torch full (LoRA vs full backward): {ms['torch full'] / ms['jax lora 1 device']:.1f}x; "
        f"jax lora {DEVICES} devices vs torch full: {ms['torch full'] / ms[mesh_name]:.1f}x",
        f"LoRA step / full step throughput in jax (1 device): {ms['jax full 1 device'] / ms['jax lora 1 device']:.2f}x",
    ]
    return lines + [load_note] if load_note else lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help=f"global batch (rows), a multiple of {DEVICES}")
    parser.add_argument("--latents", type=int, default=3, help="latents per row (n)")
    parser.add_argument("--k", type=int, default=8, help="selected patches per latent (K <= 64)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (official: 0.05)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = parser.parse_args(argv)
    # the oracle ranks patches with float() of attention probabilities that require grad
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    if args.batch < DEVICES or args.batch % DEVICES:
        parser.error(f"--batch must be a positive multiple of {DEVICES} (the data axis)")
    if args.latents < 1 or not 1 <= args.k <= 64:
        parser.error("need --latents >= 1 and 1 <= --k <= 64 (a 224x224 image has 64 image tokens)")
    if len(jax.devices()) < DEVICES:
        sys.exit(f"need {DEVICES} devices, found {jax.devices()}: XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} "
                 "(set --xla_force_host_platform_device_count before jax is imported)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warn_if_loaded("before the run")
    print(f"jax devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; repeats: {args.repeats}",
          flush=True)
    for line in bench(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
