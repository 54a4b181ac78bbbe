"""The optax optimizer of a run: global-norm clipping + AdamW on a learning-rate schedule (optionally
restarting at each stage), gradient accumulation with `optax.MultiSteps` (the inner update sees the
mean of the accumulated micro-batch gradients, as DeepSpeed's accumulation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ..config import OptimSection


def learning_rate(cfg: OptimSection, total_steps: int, steps_per_stage: int | None):
    """Schedule over optimizer steps; with `restart_schedule_per_stage` it restarts every stage."""
    span = steps_per_stage if (cfg.restart_schedule_per_stage and steps_per_stage) else max(total_steps, 1)
    if cfg.schedule == "constant":
        base = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        base = optax.cosine_decay_schedule(cfg.lr, max(span - cfg.warmup_steps, 1))
    elif cfg.schedule == "linear":
        base = optax.linear_schedule(cfg.lr, 0.0, max(span - cfg.warmup_steps, 1))
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r}: choose constant, cosine or linear")
    if cfg.warmup_steps:
        base = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), base], [cfg.warmup_steps])
    if cfg.restart_schedule_per_stage and steps_per_stage:
        return lambda step: base(jnp.mod(step, steps_per_stage))
    return base


def make_optimizer(cfg: OptimSection, total_steps: int = 0, steps_per_stage: int | None = None,
                   accumulation: int | None = None):
    """AdamW with clipping and the schedule; `accumulation` micro-steps per optimizer step (default: the
    config's gradient_accumulation_steps, or 1; a run's comes from its batch layout)."""
    accumulation = accumulation or cfg.gradient_accumulation_steps or 1
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(learning_rate(cfg, total_steps, steps_per_stage), b1=cfg.betas[0], b2=cfg.betas[1],
                    eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    if accumulation > 1:
        return optax.MultiSteps(inner, every_k_schedule=accumulation)
    return inner


def discard_accumulation(opt_state):
    """The optimizer state with the gradients accumulated in the current window dropped (`optax.MultiSteps`:
    as at the window's start; without accumulation there is nothing to drop). Each array keeps its sharding."""
    if not isinstance(opt_state, optax.MultiStepsState):
        return opt_state
    zeros = lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding)
    return opt_state._replace(mini_step=zeros(opt_state.mini_step), acc_grads=jax.tree.map(zeros, opt_state.acc_grads))
