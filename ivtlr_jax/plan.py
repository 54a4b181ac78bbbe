"""Plan a run at 7B scale on this machine: the real training step (and batched generation) is built
abstractly (shape-only parameters), lowered and compiled for a mesh of host devices standing in for
GPUs, and XLA's own memory and cost analyses are printed per device: parameters, optimizer state,
activations/temporaries, FLOPs, and the step time and MFU ceiling they imply on H100s.

    ivtlr-plan --config configs/qwen2vl_m3cot.yaml [--mesh data=1,fsdp=4,tensor=1]
        [--full-finetune] [--generate] [--seq-len 1216] [--batch 2]     (or python -m ivtlr_jax.plan)

Nothing is allocated: the parameters of the model named in the config are never read (the
architecture comes from the built-in copies of the hub configs below, or the folder's config.json
when it exists locally). Host devices compile with the XLA CPU backend, so the figures are XLA's
estimates for this program, not a GPU profile.
"""

from __future__ import annotations

import os
import sys


def parse_mesh(text: str) -> dict:
    out = {"data": 1, "fsdp": 4, "tensor": 1}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"--mesh: unknown axis {key!r} (data, fsdp, tensor)")
        out[key] = int(value)
    return out


def mesh_devices(argv: list[str]) -> int:
    """How many host devices the command line's --mesh spans (4 by default); read before JAX loads."""
    text = "data=1,fsdp=4,tensor=1"
    for i, word in enumerate(argv):
        if word.startswith("--mesh="):
            text = word.partition("=")[2]
        elif word == "--mesh" and i + 1 < len(argv):
            text = argv[i + 1]
    try:
        axes = parse_mesh(text)
    except ValueError:  # the parser says so later
        return 4
    return max(1, axes["data"] * axes["fsdp"] * axes["tensor"])


# Host devices stand in for the GPUs, as many as the mesh spans, whatever accelerator JAX would otherwise pick
# (a CUDA install plans on the CPU too); only where JAX is not loaded yet (the command, python -m).
if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={mesh_devices(sys.argv)}").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from .config import ConfigError, RunConfig, load_config  # noqa: E402
from .latent import LatentShapes  # noqa: E402
from .models import FAMILIES, Family  # noqa: E402
from .models.common.choices import names  # noqa: E402
from .models.common.run_options import Remat  # noqa: E402
from .models.common.sharding import ShardingRules, make_mesh, state_shardings  # noqa: E402
from .build import abstract_run_model  # noqa: E402
from .models.common.lora import trainable_filter  # noqa: E402
from .train.optim import make_optimizer  # noqa: E402
from .models.common.sharding import batch_shardings  # noqa: E402
from .train.step import StepConfig, make_train_step, opt_state_shardings  # noqa: E402
from .plan_memory import MemoryBreakdown, compile_with_breakdown  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM (the figure the MFU ceiling is relative to)
H100_MEMORY_GB = 80.0
HEADROOM = 0.10  # the share of a device's memory a plan should leave free (fragmentation, the runtime's own)
# the planner never runs what it compiles, and XLA's memory and cost analyses come from its HLO passes:
# the CPU code generation after them is done at its cheapest (a third less compile time, the same figures)
ANALYSIS_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# the official models' hub config.json files (each family keeps its own): planning without a download
HUB_CONFIGS = {hub: raw for family in FAMILIES.values() for hub, raw in family.hub_configs.items()}

# the official sequence shapes (docs/method.md sections 2, 14 and 15): image tokens, question, final length
# before latents


@dataclasses.dataclass
class Plan:
    name: str
    mesh: dict
    params_gb: float  # per device
    optimizer_gb: float
    arguments_gb: float  # everything passed in (params + optimizer + batch)
    temporaries_gb: float  # activations and scratch
    outputs_gb: float
    total_gb: float
    flops_per_device: float
    model_flops: float  # 6 * N * tokens (2 * N * tokens for generation)
    step_s_at_peak: float
    mfu_ceiling: float
    flops_scanned: float  # per device: XLA's count of the compiled program (each loop body once)
    breakdown: MemoryBreakdown | None = None  # the peak by part of the step (the training step's)
    parts_shown: bool = True  # print the breakdown's parts (--breakdown), not only its GPU estimate

    def verdict(self) -> str:
        """The peak against an H100's memory: XLA CPU's own, and with a breakdown, a GPU's estimate (without
        the f32 copies only the CPU compiler makes), which decides."""
        cpu = f"peak ~{self.total_gb:.2f} GB of {H100_MEMORY_GB:.0f} GB"
        if self.breakdown is None:
            return f"{cpu} ({fits_in_memory(self.total_gb)})"
        gpu = self.breakdown.gpu_estimate_bytes / 1e9
        return (f"{cpu} on XLA CPU, counting its f32 copies of bf16 values; a GPU's estimate without them "
                f"~{gpu:.2f} GB ({fits_in_memory(gpu)})")

    def __str__(self):
        return (f"{self.name} on mesh {self.mesh}:\n"
                f"  per device: parameters {self.params_gb:.2f} GB, optimizer {self.optimizer_gb:.2f} GB, "
                f"arguments {self.arguments_gb:.2f} GB, temporaries {self.temporaries_gb:.2f} GB, outputs "
                f"{self.outputs_gb:.2f} GB -> {self.verdict()}\n"
                f"  FLOPs per device per step {self.flops_per_device:.3e} (model FLOPs {self.model_flops:.3e} in all)\n"
                f"  step time at the H100 bf16 peak of {H100_BF16_PEAK_TFLOPS:.0f} TFLOP/s: "
                f">= {self.step_s_at_peak * 1e3:.3g} ms; "
                f"MFU ceiling (model FLOPs / executed FLOPs) {self.mfu_ceiling:.1%}"
                + ("" if self.breakdown is None or not self.parts_shown else
                   "\n  the peak by part (XLA's live buffers at its peak, per device):\n"
                   + "\n".join(self.breakdown.lines())))


def fits_in_memory(gb: float) -> str:
    """'fits, 42% headroom' / 'fits, under the 10% headroom' / 'DOES NOT FIT' for a peak of `gb` on an H100."""
    if gb > H100_MEMORY_GB:
        return "DOES NOT FIT"
    if gb > (1 - HEADROOM) * H100_MEMORY_GB:
        return f"fits, under the {HEADROOM:.0%} headroom"
    return f"fits, {1 - gb / H100_MEMORY_GB:.0%} headroom"


def architecture(cfg: RunConfig) -> dict:
    local = Path(cfg.model.model_id) / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    if cfg.model.model_id in HUB_CONFIGS:
        return HUB_CONFIGS[cfg.model.model_id]
    raise ValueError(f"{cfg.model.model_id}: no local config.json and no built-in hub config")


def _per_device_bytes(tree, shardings) -> float:
    total = 0.0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
        shard = s.shard_shape(x.shape) if hasattr(s, "shard_shape") else x.shape
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


def with_shardings(tree, shardings):
    """Shape-only arrays of `tree` carrying `shardings` (a tree of NamedSharding, prefix of `tree`)."""

    def one(sharding, node):
        sds = jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=sharding)
        return node.replace(sds) if isinstance(node, nnx.Variable) else sds

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def abstract_batch(family: Family, batch: int, seq_len: int, image_tokens: int, image_side: int) -> dict:
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    out = {k: sds((batch, seq_len), jnp.int32) for k in ("input_ids", "attention_mask", "labels", "position_ids")}
    return out | {k: sds(*v) for k, v in family.image_shapes(batch, image_tokens, image_side).items()}


def plan_train(cfg: RunConfig, mesh_shape: dict, *, batch: int | None = None, seq_len: int | None = None,
               prefix_len: int | None = None, num_latents: int = 3, full_finetune: bool = False,
               count_flops: bool = True, breakdown: bool = False) -> Plan:
    """`count_flops=False`: FLOPs of the compiled (scanned) program as XLA counts them, each loop body
    once (a lower bound that still grows with batch and length), without the 3 unrolled compiles.
    `breakdown`: also attribute the peak to the parts of the step (plan_memory.py)."""
    raw = architecture(cfg)
    family = FAMILIES[raw["model_type"]]
    config = family.config_cls.from_hf(raw)
    shapes = family.official_shapes
    rules = ShardingRules(make_mesh(**mesh_shape))
    replicas = rules.mesh.shape["data"] * rules.mesh.shape["fsdp"]
    b = (batch or cfg.train.batch_size_training) * replicas
    k = cfg.latent.num_selected_patches
    s = (seq_len or shapes["seq_len"]) - num_latents * k  # the collated length; the chain adds n*K
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=not full_finetune))
    lora = cfg.lora
    build = lambda unroll, config=config: abstract_run_model(cfg, family, config, rules=rules, unroll_scans=unroll)

    tx = make_optimizer(cfg.optim, 1000, 250, accumulation=planned_accumulation(cfg, replicas))
    batch_abs = abstract_batch(family, b, s, shapes["image_tokens"], shapes["image_side"])
    b_sh = batch_shardings(batch_abs, rules)
    latent = cfg.latent.latent_config(0)
    prefix_len = min(prefix_len or shapes["prefix"], s)  # a shorter --seq-len bounds the first latent too
    rest = (with_shardings(batch_abs, b_sh), jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
            jax.ShapeDtypeStruct((), jnp.float32), LatentShapes(num_latents, prefix_len))

    def split(model):
        _, trainable, frozen = nnx.split(model, trainable_filter(lora), ...)
        opt = jax.eval_shape(tx.init, trainable)
        return (trainable, frozen, opt), (state_shardings(trainable, rules), state_shardings(frozen, rules),
                                         opt_state_shardings(opt, trainable, rules))

    def lower_step(model):
        states, shardings = split(model)
        step = make_train_step(nnx.graphdef(model), tx, StepConfig(latent, b // replicas, cfg.optim.loss_scale),
                               rules=rules, shardings=(*shardings, b_sh))
        return step.lower(*(with_shardings(x, sh) for x, sh in zip(states, shardings)), *rest)

    compile_step = lambda model: lower_step(model).compile(ANALYSIS_COMPILER_OPTIONS)  # noqa: E731
    model = build(False)
    (trainable, frozen, opt_abstract), (t_sh, f_sh, o_sh) = split(model)
    peak = None  # the program that runs: memory
    if breakdown:
        compiled, peak = compile_with_breakdown(lower_step(model), ANALYSIS_COMPILER_OPTIONS)
    else:
        compiled = compile_step(model)
    flops = flops_by_depth(lambda c: compile_step(build(True, c)), config) if count_flops else _flops(compiled)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    tokens = b * (s + num_latents * k)
    return _plan(f"train step ({'full fine-tuning' if full_finetune else f'LoRA r={lora.rank}'}, batch {b}, "
                 f"length {s} + {num_latents}x{k} latent patches)", rules, compiled,
                 params=_per_device_bytes(trainable, t_sh) + _per_device_bytes(frozen, f_sh),
                 optimizer=_per_device_bytes(opt_abstract, o_sh), flops=flops,
                 # full fine-tuning: forward + activation and weight gradients (6NT); LoRA: no weight
                 # gradients for the frozen base (4NT)
                 model_flops=(6.0 if full_finetune else 4.0) * n_params * tokens, breakdown=peak)


def _flops(compiled) -> float:
    return analysed_flops(compiled.cost_analysis())


def analysed_flops(cost) -> float:
    """The FLOPs of an XLA cost analysis (a dict, or a list of one dict); 0.0 where it gives none."""
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return max(float((cost or {}).get("flops", 0.0)), 0.0)


def flops_by_depth(compile_unrolled, config) -> float:
    """FLOPs per device of the full-depth program. XLA's cost analysis counts a loop body once, so the
    program is compiled with every loop unrolled, at depth 1 and 2 of the text decoder (and of the
    vision tower for Qwen2-VL), and the per-layer costs are extrapolated linearly to the real depth
    (compiling 60 unrolled 7B layers on a CPU would take far longer)."""
    text = config.text
    at = lambda layers, depth=None: dataclasses.replace(
        config, text=dataclasses.replace(text, num_layers=layers),
        **({"vision": dataclasses.replace(config.vision, depth=depth)} if depth is not None else {}))
    has_vision_stack = hasattr(config, "vision")
    base = _flops(compile_unrolled(at(1, 1 if has_vision_stack else None)))
    per_text_layer = _flops(compile_unrolled(at(2, 1 if has_vision_stack else None))) - base
    total = base + (text.num_layers - 1) * per_text_layer
    if has_vision_stack:
        per_block = _flops(compile_unrolled(at(1, 2))) - base
        total += (config.vision.depth - 1) * per_block
    return total


def _plan(name, rules, compiled, *, params: float, optimizer: float, model_flops: float, flops: float,
          breakdown: MemoryBreakdown | None = None) -> Plan:
    mem = compiled.memory_analysis()
    gb = lambda v: v / 1e9
    args, temps, outs = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    devices = rules.mesh.size
    step_s = flops / (H100_BF16_PEAK_TFLOPS * 1e12) if flops else float("nan")
    return Plan(name, dict(rules.mesh.shape), gb(params), gb(optimizer), gb(args), gb(temps), gb(outs),
                gb(args + temps + outs - alias), flops, model_flops, step_s,
                min(model_flops / devices / flops, 1.0) if flops else float("nan"), _flops(compiled), breakdown)


def planned_accumulation(cfg: RunConfig, replicas: int) -> int:
    """The accumulation a fresh run of `cfg` would use on `replicas` replicas (its optimizer state holds the
    accumulated gradients when > 1); 1 where the global batch does not divide into micro-steps there."""
    from .train.batch_layout import planned_layout

    try:
        return planned_layout(cfg, replicas).accumulation
    except ConfigError:
        return 1


SWEEP_POLICIES = ("dots", "dots_no_batch", "full")  # the layer loops' remat policies a sweep compares


def sweep_train(cfg: RunConfig, mesh_shape: dict, *, batches: tuple[int, ...], seq_len: int | None = None,
                policies: tuple[str, ...] = SWEEP_POLICIES):
    """(remat, micro-batch, Plan with its breakdown) for each remat policy and micro-batch (FLOPs: XLA's count
    of the scanned program, each loop body once, enough to compare the policies' recomputation)."""
    for remat in policies:
        for batch in batches:
            one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
            yield remat, batch, plan_train(one, mesh_shape, batch=batch, seq_len=seq_len, count_flops=False,
                                           breakdown=True)


def sweep_row(remat: str, batch: int, plan: Plan) -> str:
    """One line of the sweep's table (SWEEP_HEADER)."""
    gpu = plan.breakdown.gpu_estimate_bytes / 1e9
    fits = "fits" if gpu <= (1 - HEADROOM) * H100_MEMORY_GB else "no"
    return (f"  {remat:<14} {batch:>5} {plan.total_gb:>11.3f} {gpu:>13.3f} {fits:>14} "
            f"{plan.flops_scanned:>12.3e}")


SWEEP_HEADER = ("  remat          micro  XLA CPU GB  w/o CPU f32  fits 80 GB-10%  loop FLOPs\n"
                "                 batch  (peak)      copies (GB)  (w/o copies)    (scanned)")


def print_sweep(cfg: RunConfig, mesh_shape: dict, *, batch: int | None, seq_len: int | None,
                policies: tuple[str, ...] = SWEEP_POLICIES) -> None:
    batches = tuple(sorted({1, batch or cfg.train.batch_size_training}))
    print(f"sweeping remat {', '.join(policies)} x micro-batch {', '.join(map(str, batches))} on mesh "
          f"{mesh_shape} (one compile each) ...", flush=True)
    print(SWEEP_HEADER, flush=True)
    for remat, micro, plan in sweep_train(cfg, mesh_shape, batches=batches, seq_len=seq_len, policies=policies):
        print(sweep_row(remat, micro, plan), flush=True)


def plan_generate(cfg: RunConfig, mesh_shape: dict, *, batch: int = 32, new_tokens: int = 512,
                  num_latents: int = 3, count_flops: bool = True) -> Plan:
    """Batched IVT-LR generation (prefill, latent passes, decoding) at `batch`, bf16 parameters.
    `count_flops=False`: as in `plan_train`."""
    from .decoding import RowSampling
    from .generate import SamplingConfig, _generate

    raw = architecture(cfg)
    family = FAMILIES[raw["model_type"]]
    config = family.config_cls.from_hf(raw)
    shapes = family.official_shapes
    rules = ShardingRules(make_mesh(**mesh_shape))
    def build(unroll: bool, config=config):
        return nnx.eval_shape(lambda: family.model_cls(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                        rules=rules, unroll_scans=unroll, rngs=nnx.Rngs(0)))

    prompt = shapes["prefix"] + num_latents
    batch_abs = abstract_batch(family, batch, prompt, shapes["image_tokens"], shapes["image_side"])
    batch_abs.pop("labels")
    latent = cfg.latent.latent_config(0)  # K, patch order, RoPE and DeepStack choice: the run's, as in training
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_token_id=None)
    rows = RowSampling(jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype),
                       jax.ShapeDtypeStruct((batch,), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.float32))

    def compile_run(model):
        graphdef, state = nnx.split(model)

        def run(state, batch, rows):
            return _generate(graphdef, state, batch, latent, sampling, rows,
                             LatentShapes(num_latents, shapes["prefix"])).tokens

        lowered = jax.jit(run).lower(with_shardings(state, state_shardings(state, rules)), batch_abs, rows)
        return lowered.compile(ANALYSIS_COMPILER_OPTIONS)

    state = nnx.state(build(False))
    sh = state_shardings(state, rules)
    compiled = compile_run(build(False))
    flops = flops_by_depth(lambda c: compile_run(build(True, c)), config) if count_flops else _flops(compiled)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    # the decoding while-loop's body is counted once by XLA: the FLOPs are those of the prefill, the
    # latent passes and one decoding step
    return _plan(f"generation (batch {batch}, prompt {prompt}, {new_tokens} new tokens; FLOPs: prefill + latent "
                 f"passes + one decoding step)", rules, compiled, params=_per_device_bytes(state, sh), optimizer=0.0,
                 model_flops=2.0 * n_params * batch * (prompt + 1), flops=flops)


USAGE = "%(prog)s --config YAML [--mesh AXES] [--full-finetune] [--generate] [options]"


def main(argv=None, prog: str = "ivtlr-plan") -> None:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog=prog, usage=USAGE, description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="run configuration (its model, LoRA, K, optimizer)")
    p.add_argument("--mesh", default="data=1,fsdp=4,tensor=1", metavar="AXES",
                   help="mesh axes over the host devices (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="micro-batch per data-parallel replica (default: the config's)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="final sequence length incl. latent patches (default: the official shape)")
    p.add_argument("--full-finetune", action="store_true", help="also plan full fine-tuning")
    p.add_argument("--generate", action="store_true", help="also plan generation at batch 32")
    p.add_argument("--breakdown", action="store_true",
                   help="print the training step's peak memory by part (XLA's buffer analysis, which also gives the "
                        "GPU estimate the verdict uses)")
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP_POLICIES), default=None, metavar="POLICIES",
                   help="instead: the training step's memory for each remat policy (default: %(const)s) at micro-batch "
                        "1 and the config's (or --batch's), the global batch kept by accumulation")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    mesh = parse_mesh(args.mesh)
    need, have = int(np.prod(list(mesh.values()))), jax.devices()
    if have[0].platform != "cpu" or len(have) < need:
        p.exit(2, f"{prog}: error: the mesh {args.mesh} needs {need} host (CPU) devices; this process has "
                  f"{len(have)} {have[0].platform} device(s). Run it as its own command (ivtlr-plan or python -m "
                  f"ivtlr_jax.plan), which sets them, or set JAX_PLATFORMS=cpu and "
                  f"XLA_FLAGS=--xla_force_host_platform_device_count={need}\n")
    print(f"{len(have)} host devices stand in for {need} x H100 ({H100_MEMORY_GB:.0f} GB, "
          f"{H100_BF16_PEAK_TFLOPS:.0f} TFLOP/s dense bf16 each)")
    if args.sweep:
        policies = tuple(filter(None, args.sweep.split(",")))
        unknown = sorted(set(policies) - set(names(Remat)))
        if unknown:
            p.exit(2, f"{prog}: error: --sweep: unknown remat policies {unknown}; "
                      f"choose from {names(Remat)}\n")
        return print_sweep(cfg, mesh, batch=args.batch, seq_len=args.seq_len, policies=policies)
    def train_step(full_finetune: bool) -> Plan:  # the verdict: the breakdown's GPU estimate
        plan = plan_train(cfg, mesh, batch=args.batch, seq_len=args.seq_len, full_finetune=full_finetune,
                          breakdown=True)
        return dataclasses.replace(plan, parts_shown=args.breakdown)

    phases = [("the training step" + ("" if not cfg.lora.enabled else f" (LoRA r={cfg.lora.rank})"),
               lambda: train_step(False))]
    if args.full_finetune:
        phases.append(("the full fine-tuning step", lambda: train_step(True)))
    if args.generate:
        phases.append(("generation at batch 32", lambda: plan_generate(cfg, mesh)))
    for i, (what, plan) in enumerate(phases, 1):
        print(f"[{i}/{len(phases)}] compiling {what} for mesh {mesh} (shapes only; FLOPs from shallow unrolled "
              "copies: a few minutes at 7B) ...", flush=True)
        start = time.perf_counter()
        result = plan()
        print(f"[{i}/{len(phases)}] done in {time.perf_counter() - start:.0f} s", flush=True)
        print(result, flush=True)


if __name__ == "__main__":
    main()
