"""One-GPU check of the 7B training and inference path at reduced depth: a random Qwen2-VL with the 7B
widths and a few layers, the official IVT-LR setup and shapes, measured on the device that JAX finds
(printed), written to JSON (`--out`) and summed up in a table at the end.

Model: Qwen2-VL-7B's widths (text hidden 3584, MLP 18944, 28 heads / 4 KV heads of 128, vocabulary
151660 = the hub tokenizer's 151657 + the 3 latent tokens, as the trainer resizes it; vision tower
embed 1280, 16 heads, merger out 3584) with `--layers` text layers and `--vision-depth` vision blocks,
random weights (nothing is read or downloaded), built as the trainer builds it: bf16 compute, bf16
frozen base, LoRA r=64 alpha 16 dropout 0.05 on the 7 projections (fp32 adapters), remat "dots",
scanned layers (`configs/qwen2vl_m3cot.yaml`; `ivtlr_jax.build.model_dtypes`). Batch: the official
micro-batch (2 rows) in the real collator's layout (`ivtlr_jax.data.collate.collate`), one 280x280
image per row (100 image tokens), questions of up to `--question` tokens (different lengths, so
different left pads), 3 latents, K=32, answers filling the longest row to the collated length S =
`--seq-len` - 3*32 (assembled length 1216, the planner's official shape); prefix bucket and shared
prefix as the trainer computes them (`data.prefix_buckets`; `collate` returns them as `LatentShapes`),
the same-size images stacked per image ([rows, 400, 1176]) as `collate` stacks them.

Sections (each guarded: a failure, e.g. out of memory or cudnn missing, is recorded as an error string
and the next section still runs; the JSON is rewritten after every section, so a run killed by a
timeout keeps what it finished):

- train: the trainer's jitted step (`make_train_step`: ivtlr_loss forward + backward, clipping, AdamW
  with accumulation, as `plan.plan_train` builds it) lowered and compiled ahead of time on one device;
  median step time of `--repeats` calls after the first; tokens/s (`tokens_per_s`: batch x assembled
  length; `real_tokens_per_s`: without padding; `supervised_tokens_per_s`: answer + EOS labels);
  FLOPs per step from XLA's cost analysis: `flops_per_step` of the same step with every loop unrolled
  (layers, vision blocks, latent passes, loss chunks; XLA counts a loop body once), shape-only and
  lowered for the CPU (the GPU plugin has no cost analysis before compiling); `flops_compiled_step`:
  `compiled.cost_analysis()` of the program that runs, loop bodies once, for reference; MFU =
  flops_per_step / step time / the device's dense bf16 peak (a table by device_kind; unknown kinds:
  null; the FLOPs include remat recompute, which "dots" keeps to elementwise work); the device's
  `peak_bytes_in_use` (read right after this section, so it includes the model build and the first
  step, not the later sections) against `compiled.memory_analysis()` of the step.
- plan: the planner's prediction for the same shapes: `ivtlr_jax.plan.plan_train` compiles the same
  architecture, batch, length, prefix bound and latents abstractly on one CPU device, as `python -m
  ivtlr_jax.plan` predicts GPU memory: XLA's total (arguments + temporaries + outputs - aliased;
  `measured_over_predicted` = the train section's peak / that) and the GPU estimate its verdict uses (the peak
  without the f32 copies only a CPU compile makes; `measured_over_gpu_estimate`). Its FLOP extrapolation (3 more
  CPU compiles) only with --plan-flops.
  Note: plan_train compiles with shared_prefix=0, where the trainer (and the train section) run the
  question slots below the previous prefix bucket once for the chain and the final pass.
- ratio: the IVT-LR step against the same step on a plain batch of the assembled length (the 3
  latents replaced by 3*(K+1) ordinary text tokens labelled -100, num_latents=0), as
  bench/latent_step.py computes it, both timed interleaved (`bench.timing.interleaved_median_ms`).
- generate: `ivtlr_generate` (no LoRA: the merged model evaluation runs) at batch `--gen-batch` 32,
  3 latents, greedy, EOS disabled so every row decodes `--new-tokens`; examples/s and tokens/s
  (median of the calls after the first).
- attention: `jax.nn.dot_product_attention` with implementation="cudnn" vs "xla" on the prefill shapes
  (B=2, T=1216, 28 query / 4 KV heads of 128, causal, bf16): forward and forward+backward time, max
  abs difference of the outputs; off GPU the cudnn side is "unavailable". Then the model's own attention
  (`models.common.attention.dot_product_attention`, boolean [B, T, S] mask: causal, row 1 left-padded by
  T/8) with attention_impl "xla" (einsums) vs "fused" (cuDNN on GPU where `cudnn_fits`, else XLA):
  `model_xla`, `model_fused`, `model_fused_speedup_fwd(_bwd)`, `model_max_abs_diff`.

    python bench/gpu_check.py [--out gpu_check.json] [--layers 4] [--vision-depth 4] [--vocab 151660]
                              [--repeats 5] [--gen-batch 32] [--new-tokens 64] [--plan-flops]
                              [--sections train,plan,ratio,generate,attention]
    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json   # the test suite's run: CPU, tiny widths, ~1 min

--smoke: CPU (JAX_PLATFORMS=cpu unless set), text hidden 64 (4 heads of 16, 2 KV heads), 2 layers, vocabulary
512, vision embed 32 depth 1 (280x280 images still: the planner knows only the official 100 image tokens),
K=4, collated length 268 (question 200), generation batch 2 x 4 tokens, attention (2, 64, 4/2 heads, 16),
XLA:CPU without LLVM optimisation (fast compiles; the numbers only show that every section runs).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # a CPU run that only shows every section works: set before jax is imported
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA:CPU code generation without LLVM optimisation compiles ~4x faster (its timings mean nothing anyway)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import shared as shared_bench  # noqa: E402
from bench.timing import interleaved_median_ms, timed  # noqa: E402
from ivtlr_jax.build import abstract_run_model, model_dtypes  # noqa: E402
from ivtlr_jax.config import load_config  # noqa: E402
from ivtlr_jax.data.collate import IGNORE, LatentShapes, collate  # noqa: E402
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate  # noqa: E402
from ivtlr_jax.latent import LatentConfig, latent_layout  # noqa: E402
from ivtlr_jax.models import FAMILIES  # noqa: E402
from ivtlr_jax.models.common.attention import AttentionImpl, causal_mask, dot_product_attention  # noqa: E402
from ivtlr_jax.models.common.lora import add_lora, trainable_filter  # noqa: E402
from ivtlr_jax.models.common.sharding import ShardingRules, make_mesh, state_shardings  # noqa: E402
from ivtlr_jax.models.qwen2vl.config import Qwen2VLConfig  # noqa: E402
from ivtlr_jax.plan import HUB_CONFIGS, analysed_flops, planned_accumulation, with_shardings  # noqa: E402
from ivtlr_jax.train.optim import make_optimizer  # noqa: E402
from ivtlr_jax.train.step import (StepConfig, init_optimizer, make_train_step, split_trainable,  # noqa: E402
                                  step_shardings)

SECTIONS = ("train", "plan", "ratio", "generate", "attention")
OFFICIAL_CONFIG = ROOT / "configs" / "qwen2vl_m3cot.yaml"
HUB_7B = "Qwen/Qwen2-VL-7B-Instruct"
PATCH = 14  # Qwen2-VL patch side; 2x2 patches merge into one image token

# Dense bf16 peak FLOP/s per device, matched on the words of `device.device_kind` (lower case, "-" and "_"
# as spaces): the first entry whose words all occur wins, so the specific ones come first.
PEAK_BF16 = (
    (("h100", "pcie"), 756e12), (("h100", "nvl"), 835e12), (("gh200",), 989e12), (("h200",), 989e12),
    (("h100",), 989e12), (("h800",), 989e12), (("a100",), 312e12), (("a800",), 312e12), (("l40s",), 362e12),
    (("l4",), 121e12), (("a10",), 125e12),
    (("tpu", "v6", "lite"), 918e12), (("tpu", "v5", "lite"), 197e12), (("tpu", "v5e"), 197e12),
    (("tpu", "v5p"), 459e12), (("tpu", "v5"), 459e12), (("tpu", "v4"), 275e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    words = set(device_kind.lower().replace("-", " ").replace("_", " ").split())
    for needed, peak in PEAK_BF16:
        if all(w in words for w in needed):
            return peak
    return None


# ---- settings -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int  # training micro-batch (rows)
    seq_len: int  # assembled length S + n*K
    question: int  # tokens before the first latent in the longest question (image included)
    latents: int
    k: int
    image_side: int
    gen_batch: int
    new_tokens: int
    attention: tuple[int, int, int, int, int]  # B, T, query heads, KV heads, head dim

    @property
    def image_tokens(self) -> int:
        return (self.image_side // PATCH // 2) ** 2

    @property
    def collated(self) -> int:
        return self.seq_len - self.latents * self.k


def architecture(args) -> dict:
    """A hub-layout config.json dict: Qwen2-VL-7B's (ivtlr_jax.plan.HUB_CONFIGS) at `--layers` and
    `--vision-depth`, or tiny widths with --smoke."""
    raw = copy.deepcopy(HUB_CONFIGS[HUB_7B])
    raw.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    raw["vision_config"]["depth"] = args.vision_depth
    if args.smoke:  # head dim 16: the M-RoPE sections sum to 8
        raw.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, image_token_id=500,
                   video_token_id=501, vision_start_token_id=502, vision_end_token_id=503, eos_token_id=2)
        raw["vision_config"].update(embed_dim=32, num_heads=2, hidden_size=64)
    return raw


def shapes_of(args) -> Shapes:
    if args.smoke:
        return Shapes(batch=2, seq_len=args.seq_len or 280, question=args.question or 200, latents=3, k=4,
                      image_side=280, gen_batch=args.gen_batch or 2, new_tokens=args.new_tokens or 4,
                      attention=(2, 64, 4, 2, 16))
    return Shapes(batch=args.batch, seq_len=args.seq_len or 1216, question=args.question or 480, latents=args.latents,
                  k=args.k, image_side=280, gen_batch=args.gen_batch or 32, new_tokens=args.new_tokens or 64,
                  attention=(2, args.seq_len or 1216, 28, 4, 128))


# ---- batches ----------------------------------------------------------------------------------------------
class Tokens:
    """The special ids of the architecture and a range of ordinary text ids."""

    def __init__(self, config: Qwen2VLConfig):
        self.image, self.eos = config.image_token_id, config.eos_token_id
        self.start, self.end = config.vision_start_token_id, config.vision_end_token_id
        self.latent = config.vocab_size - 1  # <|latent|> is the last of the three tokens the trainer adds
        specials = [self.image, self.start, self.end, config.vocab_size - 3]
        self.text_high = min(specials + ([self.eos] if self.eos > 100 else [])) - 12  # Qwen2's specials from 151643

    def text(self, rng, count: int) -> list[int]:
        return rng.integers(3, self.text_high, count).tolist()


def image_of(rng, shapes: Shapes) -> dict:
    """One image's processor output (random pixels: only their shape matters here)."""
    grid = shapes.image_side // PATCH
    return {"pixel_values": rng.standard_normal((grid * grid, 3 * 2 * PATCH * PATCH)).astype(np.float32),
            "image_grid_thw": np.array([[1, grid, grid]], np.int64)}


def question_of(rng, tok: Tokens, length: int, shapes: Shapes) -> list[int]:
    """`text <vision_start> <image_pad> x m <vision_end> text`, `length` tokens in all."""
    text = length - shapes.image_tokens - 2
    before = int(rng.integers(1, text))
    return (tok.text(rng, before) + [tok.start] + [tok.image] * shapes.image_tokens + [tok.end]
            + tok.text(rng, text - before))


def training_batch(tok: Tokens, shapes: Shapes, prefix_buckets, seed: int = 0) -> tuple[dict, LatentShapes]:
    """The collator's batch (input_ids, attention_mask, labels, position_ids, pixel_values, image_grid_thw)
    of `shapes.batch` rows: row 0 has the longest question (`shapes.question` tokens) and fills the
    collated length exactly; the others have shorter questions (left pads) and answers (right pads).
    -> (batch, its LatentShapes: num_latents, prefix bucket, shared prefix). pixel_values: [rows, Np, 1176]
    (one size: `collate` stacks them per image)."""
    rng = np.random.default_rng(seed)
    n, s = shapes.latents, shapes.collated
    longest_answer = s - shapes.question - n  # answer + EOS of row 0
    if shapes.question - shapes.image_tokens < 4 or longest_answer < 2:
        raise ValueError(f"question {shapes.question} and length {shapes.seq_len}: no room for text around "
                         f"{shapes.image_tokens} image tokens and an answer")
    shortest = max(shapes.image_tokens + 4, shapes.question * 3 // 4)
    features = []
    for row in range(shapes.batch):
        q_len = shapes.question if row == 0 else int(rng.integers(shortest, shapes.question + 1))
        a_len = longest_answer if row == 0 else int(rng.integers(max(longest_answer // 2, 2), longest_answer + 1))
        question, answer = question_of(rng, tok, q_len, shapes), tok.text(rng, a_len - 1) + [tok.eos]
        features.append((question + [tok.latent] * n + answer, [IGNORE] * (q_len + n) + answer, image_of(rng, shapes)))
    batch, static = collate(features, latent_id=tok.latent, pad_id=tok.eos, length_buckets=(s,),
                            prefix_buckets=tuple(prefix_buckets), image_token_id=tok.image,
                            num_selected_patches=shapes.k)
    assert batch["input_ids"].shape == (shapes.batch, s) and static.num_latents == n, (batch["input_ids"].shape,
                                                                                       static)
    assert batch["pixel_values"].ndim == 3, batch["pixel_values"].shape  # stacked per image
    return batch, static


def assembled_length_batch(batch: dict, tok: Tokens, n: int, k: int, seed: int = 1) -> dict:
    """bench/shared.py's, with this file's tokens: the rows with their latents replaced by n*(K+1) text
    tokens labelled -100."""
    text = lambda rng, shape: np.asarray([tok.text(rng, shape[1]) for _ in range(shape[0])])
    return shared_bench.assembled_length_batch(batch, n, k, seed, tok.latent, text)


def generation_batch(tok: Tokens, shapes: Shapes, seed: int = 2) -> dict:
    """`shapes.gen_batch` prompts `question + <|latent|> x n`, questions of 3/4 to all of `shapes.question`
    tokens, left-padded so the latents align (the collator with no answers)."""
    rng = np.random.default_rng(seed)
    n = shapes.latents
    features = []
    for _ in range(shapes.gen_batch):
        q_len = int(rng.integers(max(shapes.image_tokens + 4, shapes.question * 3 // 4), shapes.question + 1))
        ids = question_of(rng, tok, q_len, shapes) + [tok.latent] * n
        features.append((ids, [IGNORE] * len(ids), image_of(rng, shapes)))
    width = max(len(f[0]) for f in features)
    batch, _ = collate(features, latent_id=tok.latent, pad_id=tok.eos, length_buckets=(width,),
                       prefix_buckets=(width,), image_token_id=tok.image, num_selected_patches=shapes.k)
    batch.pop("labels")
    return batch


# ---- the run ----------------------------------------------------------------------------------------------
class Check:
    """Runs the sections, keeps the results and writes them after each one."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.start = time.perf_counter()
        self.results: dict = {}
        self.ctx: dict = {}  # what later sections reuse (model, steps, batches)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)

    def write(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=_jsonable, allow_nan=False) + "\n")
        os.replace(tmp, self.out)

    def section(self, name: str, fn) -> None:
        self.log(f"{name}: start")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (recorded, the next section runs)
            result = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            traceback.print_exc()
        result["section_s"] = round(time.perf_counter() - t0, 2)
        self.results[name] = _finite_or_none(result)
        self.log(f"{name}: {'FAILED: ' + result['error'][:300] if 'error' in result else 'done'} "
                 f"({result['section_s']:.1f} s)")
        self.write()


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _finite_or_none(x):
    """NaN and inf become null (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        return None
    return x


def _flops(cost) -> float | None:
    """The FLOPs of an XLA cost analysis (`plan.analysed_flops`); None where it gives none."""
    return analysed_flops(cost) or None


def _median_ms(call, repeats: int) -> tuple[float, list[float]]:
    times = [1e3 * timed(call)[0] for _ in range(repeats)]
    return statistics.median(times), [round(t, 3) for t in times]


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (a backend without statistics)
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class TrainStep:
    """The trainer's step for one batch, compiled ahead of time, and its (donated, so carried) state."""

    def __init__(self, check: Check, label: str, batch: dict, static: LatentShapes):
        ctx = check.ctx
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        # a copy of the adapters of its own (the step donates them), placed as the trainer places them
        self.trainable = jax.device_put(jax.tree.map(jnp.copy, ctx["trainable"]),
                                        state_shardings(ctx["trainable"], ctx["rules"]))
        self.opt_state = init_optimizer(ctx["tx"], self.trainable, ctx["rules"])
        shardings = step_shardings(self.trainable, ctx["frozen"], self.opt_state, self.batch, ctx["rules"])
        self.step = make_train_step(ctx["graphdef"], ctx["tx"], ctx["step_cfg"], rules=ctx["rules"],
                                    shardings=shardings)
        self.denominator = jnp.float32(max(int(np.sum(batch["labels"][:, 1:] != IGNORE)), 1))
        self.static = static  # the step's one static argument
        self.frozen = ctx["frozen"]
        self.calls = 0
        check.log(f"{label}: lowering (batch {batch['input_ids'].shape}, pixel_values {batch['pixel_values'].shape}, "
                  f"n={static.num_latents}, prefix_len={static.prefix_len}, shared_prefix={static.shared_prefix})")
        self.lower_s, lowered = timed(lambda: self.step.lower(*self.args(), self.static))
        check.log(f"{label}: compiling")
        self.compile_s, self.compiled = timed(lowered.compile)

    def args(self):
        return self.trainable, self.frozen, self.opt_state, self.batch, jax.random.key(self.calls), self.denominator

    def __call__(self) -> dict:
        self.trainable, self.opt_state, metrics = self.compiled(*self.args())
        self.calls += 1
        return jax.block_until_ready((self.trainable, self.opt_state, metrics))[2]

    def unrolled_flops(self, ctx: dict) -> tuple[float | None, str]:
        """XLA's FLOPs of this step with every loop unrolled (XLA counts a loop body once): the same step
        of the same shapes, shape-only, lowered for one CPU device, whose cost analysis runs on the HLO before
        optimisation (the GPU plugin has none for lowered programs); compiled where no CPU backend exists."""
        try:
            devices, where = jax.devices("cpu")[:1], "cpu"
        except RuntimeError:
            devices, where = [ctx["device"]], jax.default_backend()
        rules = ShardingRules(make_mesh(1, 1, 1, devices=devices))
        model = abstract_run_model(ctx["cfg"], FAMILIES["qwen2_vl"], ctx["config"], rules=rules, unroll_scans=True)
        graphdef, trainable, frozen = split_trainable(model, trainable_filter(ctx["cfg"].lora))
        opt_state = jax.eval_shape(ctx["tx"].init, trainable)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}
        shardings = step_shardings(trainable, frozen, opt_state, batch, rules)
        step = make_train_step(graphdef, ctx["tx"], ctx["step_cfg"], rules=rules, shardings=shardings)
        states = [with_shardings(x, sh) for x, sh in zip((trainable, frozen, opt_state, batch), shardings)]
        lowered = step.lower(*states, jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
                             jax.ShapeDtypeStruct((), jnp.float32), self.static)
        cost = lowered.cost_analysis()
        how = "the HLO before optimisation"
        if cost is None:
            cost, how = lowered.compile().cost_analysis(), "the compiled HLO"
        return _flops(cost), (f"XLA cost analysis ({how}, lowered for {where}) of the same step with every loop "
                              "unrolled (layers, vision blocks, latent passes, loss chunks); remat recompute included")


def setup(check: Check) -> dict:
    args, ctx = check.args, check.ctx
    shapes = shapes_of(args)
    cfg = load_config(OFFICIAL_CONFIG)
    cfg = dataclasses.replace(
        cfg, lora=dataclasses.replace(cfg.lora, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout),
        latent=dataclasses.replace(cfg.latent, num_selected_patches=shapes.k),
        model=dataclasses.replace(cfg.model, remat=args.remat),
        train=dataclasses.replace(cfg.train, batch_size_training=shapes.batch))
    raw = architecture(args)
    family = FAMILIES["qwen2_vl"]
    config = family.config_cls.from_hf(raw)
    tok = Tokens(config)
    compute, storage = model_dtypes(cfg)
    device = jax.devices()[0]
    rules = ShardingRules(make_mesh(1, 1, 1, devices=[device]))
    check.log(f"setup: building the random model ({config.text.num_layers} layers, hidden {config.text.hidden_size}, "
              f"vocabulary {config.vocab_size}, vision depth {config.vision.depth}) on {device}")

    # as ivtlr_jax.build.abstract_run_model, with values: random weights drawn eagerly one parameter at a time (one
    # jitted program for all of them holds every draw's temporaries at once: >20 GB for 4 layers on XLA:CPU),
    # then placed by their logical axes as from_pretrained places loaded ones (an unplaced model's first
    # nnx.jit call writes placed arrays back, and its second call compiles again)
    def placed():
        model = family.model_cls(config, dtype=compute, param_dtype=storage, remat=cfg.model.remat, rules=rules,
                                 rngs=nnx.Rngs(cfg.seed))
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, rules)))
        return jax.block_until_ready(model)

    build_s, model = timed(placed)
    base_graphdef, base_state = nnx.split(model)  # before LoRA: the generation model
    add_lora(model, cfg.lora, seed=cfg.seed)
    graphdef, trainable, frozen = split_trainable(model, trainable_filter(cfg.lora))
    replicas = rules.mesh.shape["data"] * rules.mesh.shape["fsdp"]
    tx = make_optimizer(cfg.optim, 1000, 250, accumulation=planned_accumulation(cfg, replicas))  # as the planner
    ctx.update(cfg=cfg, raw=raw, config=config, tok=tok, shapes=shapes, rules=rules, device=device,
               base=(base_graphdef, base_state), graphdef=graphdef, trainable=trainable, frozen=frozen, tx=tx,
               step_cfg=StepConfig(LatentConfig(tok.latent, shapes.k, cfg.latent.patch_order, cfg.latent.latent_grad,
                                                cfg.latent.rope, cfg.latent.ce_chunk),
                                   shapes.batch, cfg.optim.loss_scale))
    batch, static = training_batch(tok, shapes, cfg.data.prefix_buckets)
    n, prefix_len = static.num_latents, static.prefix_len
    ctx.update(batch=batch, static=static, n=n, prefix_len=prefix_len, shared=static.shared_prefix)
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    peak = _peak_bytes(device)
    return {"build_s": round(build_s, 2), "peak_bytes_in_use": peak,
            "peak_note": ("after building the model: the train section's peak is only the step's when above this"
                          if peak is not None else "memory_stats unavailable on this backend"),
            "parameters": count(frozen) + count(trainable),
            "trainable_parameters": count(trainable), "compute_dtype": str(jnp.dtype(compute)),
            "base_param_dtype": str(jnp.dtype(storage)), "remat": cfg.model.remat,
            "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                     "targets": list(cfg.lora.target_modules)},
            "batch": {"rows": shapes.batch, "collated_length": int(batch["input_ids"].shape[1]),
                      "assembled_length": int(batch["input_ids"].shape[1]) + n * shapes.k,
                      "first_latent": latent_layout(batch["input_ids"], tok.latent)[1], "prefix_len": prefix_len,
                      "shared_prefix": ctx["shared"], "latents": n, "k": shapes.k,
                      "image_tokens_per_row": shapes.image_tokens, "image_side": shapes.image_side,
                      "real_tokens": int(batch["attention_mask"].sum()) + shapes.batch * n * shapes.k,
                      "supervised_tokens": int(np.sum(batch["labels"][:, 1:] != IGNORE))}}


def train_section(check: Check) -> dict:
    ctx, args = check.ctx, check.args
    shapes = ctx["shapes"]
    step = TrainStep(check, "train: ivtlr step", ctx["batch"], ctx["static"])
    ctx["ivtlr_step"] = step
    check.log("train: first call")
    first_s, metrics = timed(step)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    check.log(f"train: loss {loss:.4f}, grad norm {grad_norm:.4g}; timing {args.repeats} calls")
    step_ms, all_ms = _median_ms(step, args.repeats)
    peak = _peak_bytes(ctx["device"])
    ctx["peak_bytes"] = peak
    mem = step.compiled.memory_analysis()
    xla_mem = None
    if mem is not None:
        alias = getattr(mem, "alias_size_in_bytes", 0)
        xla_mem = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                   "outputs": mem.output_size_in_bytes, "alias": alias,
                   "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - alias}
    check.log("train: counting FLOPs (the step lowered with every loop unrolled)")
    flops_compiled = _flops(step.compiled.cost_analysis())
    try:
        flops, flops_note = step.unrolled_flops(ctx)
    except Exception as e:  # noqa: BLE001
        flops = None
        flops_note = f"unrolled count failed ({type(e).__name__}: {str(e)[:300]})"
    real, supervised = (int(ctx["batch"]["attention_mask"].sum()) + shapes.batch * ctx["n"] * shapes.k,
                        int(np.sum(ctx["batch"]["labels"][:, 1:] != IGNORE)))
    peak_flops = check.results["meta"]["peak_bf16_flops"]
    step_s = step_ms / 1e3
    return {
        "lower_s": round(step.lower_s, 2), "compile_s": round(step.compile_s, 2), "first_call_s": round(first_s, 3),
        "loss": loss, "grad_norm": grad_norm, "finite": bool(metrics["finite"]),
        "step_ms": step_ms, "step_ms_all": all_ms,
        "tokens_per_step": shapes.batch * shapes.seq_len, "real_tokens_per_step": real,
        "supervised_tokens_per_step": supervised,
        "tokens_per_s": shapes.batch * shapes.seq_len / step_s, "real_tokens_per_s": real / step_s,
        "supervised_tokens_per_s": supervised / step_s,
        "flops_per_step": flops, "flops_note": flops_note,
        "flops_compiled_step": flops_compiled,
        "flops_compiled_note": "compiled.cost_analysis() of the running (scanned) step: loop bodies counted once",
        "achieved_flops_per_s": flops / step_s if flops else None,
        "mfu": flops / step_s / peak_flops if flops and peak_flops else None,
        "mfu_note": None if peak_flops else "unknown dense bf16 peak for this device kind",
        "peak_bytes_in_use": peak,
        "peak_note": ("device.memory_stats()['peak_bytes_in_use'] after this section (includes the model build)"
                      if peak is not None else "memory_stats unavailable on this backend"),
        "xla_memory_bytes": xla_mem,
        "peak_over_xla_total": peak / xla_mem["total"] if peak and xla_mem and xla_mem["total"] else None,
    }


def plan_section(check: Check) -> dict:
    """ivtlr_jax.plan.plan_train for the same architecture and shapes, on one CPU device."""
    from ivtlr_jax import plan

    ctx = check.ctx
    shapes = ctx["shapes"]
    try:
        devices = jax.devices("cpu")[:1]
        where = "cpu"
    except RuntimeError:
        devices, where = jax.devices()[:1], jax.default_backend()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(ctx["config"].to_hf()))
        cfg = dataclasses.replace(ctx["cfg"], model=dataclasses.replace(ctx["cfg"].model, model_id=folder))
        check.log(f"plan: plan_train on 1 {where} device (the memory compile"
                  + (" + 3 compiles for its FLOP extrapolation)" if check.args.plan_flops else "; FLOPs skipped)"))
        # without --plan-flops the planner's FLOP extrapolation (3 more compiles) is replaced by 0
        skip = contextlib.nullcontext() if check.args.plan_flops else mock.patch.object(
            plan, "flops_by_depth", lambda *_: 0.0)
        with skip:
            result = plan.plan_train(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "devices": devices},
                                     batch=shapes.batch, seq_len=shapes.seq_len, prefix_len=ctx["prefix_len"],
                                     num_latents=ctx["n"], breakdown=True)
    predicted, estimate = result.total_gb * 1e9, result.breakdown.gpu_estimate_bytes
    measured = ctx.get("peak_bytes")
    out = {"compiled_on": where, "predicted_bytes": predicted, "gpu_estimate_bytes": estimate,
           "measured_over_gpu_estimate": measured / estimate if measured and estimate else None,
           "arguments_bytes": result.arguments_gb * 1e9,
           "temporaries_bytes": result.temporaries_gb * 1e9, "outputs_bytes": result.outputs_gb * 1e9,
           "flops_per_step": result.flops_per_device or None, "model_flops": result.model_flops,
           "flops_note": ("plan_train's extrapolation from unrolled depth-1/2 compiles" if check.args.plan_flops
                          else "skipped (--plan-flops runs the planner's FLOP extrapolation)"),
           "measured_peak_bytes": measured, "measured_over_predicted": measured / predicted if measured else None,
           "note": "plan_train compiles with shared_prefix=0 (the train section uses the trainer's shared prefix)"}
    train_flops = (check.results.get("train") or {}).get("flops_per_step")
    if train_flops and result.flops_per_device:
        out["train_flops_over_planner_flops"] = train_flops / result.flops_per_device
    return out


def ratio_section(check: Check) -> dict:
    ctx, args = check.ctx, check.args
    ivtlr = ctx.get("ivtlr_step")
    if ivtlr is None:
        raise RuntimeError("the train section did not produce the IVT-LR step")
    plain_batch = assembled_length_batch(ctx["batch"], ctx["tok"], ctx["n"], ctx["shapes"].k)
    s_plain = plain_batch["input_ids"].shape[1]
    plain = TrainStep(check, "ratio: plain step", plain_batch, LatentShapes(0, s_plain))
    check.log("ratio: first call")
    first_s, metrics = timed(plain)
    check.log(f"ratio: timing {args.repeats} interleaved rounds")
    ms = interleaved_median_ms({"ivtlr": ivtlr, "plain": plain}, args.repeats)
    return {"ivtlr_ms": ms["ivtlr"], "plain_ms": ms["plain"], "ratio": ms["ivtlr"] / ms["plain"],
            "plain_length": s_plain, "plain_lower_s": round(plain.lower_s, 2),
            "plain_compile_s": round(plain.compile_s, 2), "plain_first_call_s": round(first_s, 3),
            "plain_loss": float(metrics["loss"]), "goal": "ratio <= 1.4"}


def generate_section(check: Check) -> dict:
    ctx, args = check.ctx, check.args
    shapes, tok = ctx["shapes"], ctx["tok"]
    model = nnx.merge(*ctx["base"])  # the base model, no adapters (evaluation runs the merged export)
    batch = generation_batch(tok, shapes)
    latent = LatentConfig(tok.latent, shapes.k)
    sampling = SamplingConfig(max_new_tokens=shapes.new_tokens, eos_token_id=None)
    call = lambda: jax.block_until_ready(ivtlr_generate(model, batch, latent, sampling))
    check.log(f"generate: compiling + first call (batch {batch['input_ids'].shape}, {shapes.new_tokens} new tokens)")
    compile_s, out = timed(call)
    lengths = np.asarray(out.lengths)
    check.log(f"generate: timing {args.repeats} calls")
    call_ms, all_ms = _median_ms(call, args.repeats)
    per_s = 1e3 / call_ms
    return {"batch": shapes.gen_batch, "prompt_length": int(batch["input_ids"].shape[1]), "latents": shapes.latents,
            "k": shapes.k, "new_tokens": shapes.new_tokens, "eos": None,
            "compile_and_first_call_s": round(compile_s, 2),
            "call_ms": call_ms, "call_ms_all": all_ms, "examples_per_s": shapes.gen_batch * per_s,
            "generated_tokens_per_s": shapes.gen_batch * shapes.new_tokens * per_s,
            "every_row_full_length": bool((lengths == shapes.new_tokens).all())}


def attention_section(check: Check) -> dict:
    args = check.args
    b, t, heads, kv, dim = check.ctx.get("shapes", shapes_of(args)).attention
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, heads, dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kv, dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kv, dim), jnp.bfloat16)
    out: dict = {"shape": {"batch": b, "length": t, "heads": heads, "kv_heads": kv, "head_dim": dim, "causal": True,
                           "dtype": "bfloat16"}}
    outputs = {}

    def measure(impl: str, attend=None) -> dict:
        if attend is None:
            attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        fwd = jax.jit(attend)
        bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        compile_s, y = timed(lambda: jax.block_until_ready(fwd(q, k, v)))
        jax.block_until_ready(bwd(q, k, v))
        outputs[impl] = y
        fwd_ms, _ = _median_ms(lambda: jax.block_until_ready(fwd(q, k, v)), max(args.repeats, 5))
        bwd_ms, _ = _median_ms(lambda: jax.block_until_ready(bwd(q, k, v)), max(args.repeats, 5))
        return {"fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms, "first_call_s": round(compile_s, 3)}

    check.log("attention: the model's, xla and fused")
    left_pad = jnp.where(jnp.arange(b) == 1, t // 8, 0)[:, None]  # [B, 1]
    mask = causal_mask(jnp.arange(t), jnp.arange(t)[None] >= left_pad)  # [B, T, T]
    for impl in AttentionImpl:
        out[f"model_{impl}"] = measure(f"model_{impl}", lambda q, k, v, impl=impl: dot_product_attention(
            q, k, v, mask, dim**-0.5, impl=impl))
    valid = mask.any(-1)[:, :, None, None]  # rows with a key to see (fully masked rows are arbitrary)
    diff = jnp.abs(outputs["model_fused"].astype(jnp.float32) - outputs["model_xla"].astype(jnp.float32))
    out["model_max_abs_diff"] = float(jnp.max(jnp.where(valid, diff, 0)))
    out["model_fused_speedup_fwd"] = out["model_xla"]["fwd_ms"] / out["model_fused"]["fwd_ms"]
    out["model_fused_speedup_fwd_bwd"] = out["model_xla"]["fwd_bwd_ms"] / out["model_fused"]["fwd_bwd_ms"]
    check.log("attention: xla")
    out["xla"] = measure("xla")
    if jax.default_backend() != "gpu":
        out["cudnn"] = f"unavailable (backend {jax.default_backend()})"
        return out
    check.log("attention: cudnn")
    try:
        out["cudnn"] = measure("cudnn")
    except Exception as e:  # noqa: BLE001
        out["cudnn"] = f"unavailable ({type(e).__name__}: {str(e)[:500]})"
        return out
    diff = jnp.abs(outputs["cudnn"].astype(jnp.float32) - outputs["xla"].astype(jnp.float32))
    out["max_abs_diff"] = float(jnp.max(diff))
    out["cudnn_speedup_fwd"] = out["xla"]["fwd_ms"] / out["cudnn"]["fwd_ms"]
    out["cudnn_speedup_fwd_bwd"] = out["xla"]["fwd_bwd_ms"] / out["cudnn"]["fwd_bwd_ms"]
    return out


# ---- the summary ------------------------------------------------------------------------------------------
def _gb(x) -> str:
    return f"{x / 1e9:.2f} GB" if x else "n/a"


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def summary(results: dict) -> list[str]:
    rows = []

    def row(name, fn):
        r = results.get(name)
        if r is None:
            return
        rows.append((name, f"ERROR {r['error'][:150]}" if "error" in r else fn(r)))

    row("setup", lambda r: f"{r['parameters']:,} parameters ({r['trainable_parameters']:,} trained), batch "
        f"{r['batch']['rows']} x {r['batch']['collated_length']} -> {r['batch']['assembled_length']} assembled")
    row("train", lambda r: f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, MFU {_pct(r['mfu'])}, "
        f"peak {_gb(r['peak_bytes_in_use'])} (XLA {_gb((r['xla_memory_bytes'] or {}).get('total'))}), loss "
        f"{r['loss']:.4f}, compile {r['compile_s']:.0f} s")
    row("plan", lambda r: f"predicted {_gb(r['predicted_bytes'])} (GPU estimate {_gb(r['gpu_estimate_bytes'])}), "
        f"measured {_gb(r['measured_peak_bytes'])}"
        + (f" ({r['measured_over_predicted']:.2f}x, {r['measured_over_gpu_estimate']:.2f}x the estimate)"
           if r.get("measured_over_predicted") else ""))
    row("ratio", lambda r: f"ivtlr / plain {r['ratio']:.2f}x ({r['ivtlr_ms']:.1f} ms vs {r['plain_ms']:.1f} ms; "
        f"goal <= 1.4)")
    row("generate", lambda r: f"batch {r['batch']}: {r['examples_per_s']:.2f} examples/s, "
        f"{r['generated_tokens_per_s']:.0f} tokens/s ({r['new_tokens']} new tokens, compile "
        f"{r['compile_and_first_call_s']:.0f} s)")

    def attention(r):
        text = (f"model fused/xla {r['model_fused_speedup_fwd']:.2f}x fwd, {r['model_fused_speedup_fwd_bwd']:.2f}x "
                f"fwd+bwd (max|diff| {r['model_max_abs_diff']:.2e}) | ")
        text += f"xla fwd {r['xla']['fwd_ms']:.2f} ms, fwd+bwd {r['xla']['fwd_bwd_ms']:.2f} ms | cudnn "
        c = r["cudnn"]
        if isinstance(c, str):
            return text + c[:100]
        return (text + f"fwd {c['fwd_ms']:.2f} ms, fwd+bwd {c['fwd_bwd_ms']:.2f} ms "
                f"({r['cudnn_speedup_fwd']:.1f}x / {r['cudnn_speedup_fwd_bwd']:.1f}x), "
                f"max|diff| {r['max_abs_diff']:.2e}")

    row("attention", attention)
    width = max(len(n) for n, _ in rows) if rows else 0
    return [f"{n:<{width}}  {text}" for n, text in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="gpu_check.json", help="JSON results (rewritten after every section)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny widths and shapes (~1 min): the test's run")
    parser.add_argument("--layers", type=int, default=None, help="text layers (default 4; smoke 2)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default 4; smoke 1)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary (default 151660: the hub's + 3 latent tokens; the hub config: 152064)")
    parser.add_argument("--batch", type=int, default=2, help="training micro-batch (official: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="assembled length S + n*K (default 1216)")
    parser.add_argument("--question", type=int, default=None,
                        help="tokens before the first latent in the longest question, 100 image tokens included "
                             "(default 480: prefix bucket 512)")
    parser.add_argument("--latents", type=int, default=3)
    parser.add_argument("--k", type=int, default=32, help="patches per latent (official: 32)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--remat", default="dots", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (after the first)")
    parser.add_argument("--gen-batch", type=int, default=None, help="generation batch (default 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 64)")
    parser.add_argument("--plan-flops", action="store_true",
                        help="plan: also run the planner's FLOP extrapolation (3 more CPU compiles)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.smoke else 4)
    args.vision_depth = args.vision_depth or (1 if args.smoke else 4)
    args.vocab = args.vocab or (512 if args.smoke else 151660)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.latents < 1 or not 1 <= args.k <= 100:
        parser.error("need --latents >= 1 and 1 <= --k <= 100 (a 280x280 image has 100 image tokens)")

    check = Check(args)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "unknown")
    check.results["meta"] = {
        "script": "bench/gpu_check.py", "argv": sys.argv[1:] if argv is None else list(argv), "smoke": args.smoke,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "backend": jax.default_backend(), "device_kind": kind,
        "device_count": jax.device_count(), "peak_bf16_flops": peak_bf16_flops(kind),
        "architecture": {"layers": args.layers, "vision_depth": args.vision_depth, "vocab": args.vocab},
        "sections": sections,
    }
    check.log(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()}; device kind {kind!r}, "
              f"dense bf16 peak {peak_bf16_flops(kind)}")
    needs_model = [s for s in sections if s != "attention"]
    if needs_model:
        check.section("setup", lambda: setup(check))
    runners = {"train": train_section, "plan": plan_section, "ratio": ratio_section, "generate": generate_section,
               "attention": attention_section}
    for name in sections:
        if name != "attention" and "error" in check.results.get("setup", {}):
            check.results[name] = {"error": "skipped: setup failed"}
            continue
        check.section(name, lambda name=name: runners[name](check))
    check.results["summary"] = summary(check.results)
    check.write()
    print("\n".join(["", f"gpu_check on {kind} ({jax.default_backend()}), results in {check.out}:"]
                    + check.results["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
