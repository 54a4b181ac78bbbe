"""The training step: IVT-LR loss -> gradients of the trainable parameters -> optax update, as one
`jax.jit` with explicit input/output shardings on the mesh. Pure: (state, batch) -> (state, metrics).

Model state is split once into `trainable` (LoRA adapters, or every parameter) and `frozen`; only
`trainable` and the optimizer state are donated and updated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..latent import LatentConfig, LatentShapes, ivtlr_loss
from ..models.common.sharding import ShardingRules, batch_shardings, state_shardings


@dataclasses.dataclass(frozen=True)
class StepConfig:
    latent: LatentConfig
    group_size: int  # rows per data-parallel replica (the official per-GPU micro-batch)
    loss_scale: str = "micro_batch_mean"  # or "token_mean"

    def __post_init__(self):
        if self.loss_scale not in ("micro_batch_mean", "token_mean"):
            raise ValueError(f"optim.loss_scale {self.loss_scale!r}: choose micro_batch_mean or token_mean")


def batch_loss(row_nll: jax.Array, row_tokens: jax.Array, cfg: StepConfig, token_denominator: jax.Array) -> jax.Array:
    """micro_batch_mean: the token mean of each replica's rows, averaged over replicas (what DDP averages
    in the official run); token_mean: sum of token losses / the tokens of the whole accumulation window
    (`token_denominator`, already divided by the number of accumulated micro-batches)."""
    if cfg.loss_scale == "token_mean":
        return jnp.sum(row_nll) / token_denominator
    groups = row_nll.shape[0] // cfg.group_size
    nll = row_nll.reshape(groups, cfg.group_size).sum(1)
    tok = row_tokens.reshape(groups, cfg.group_size).sum(1)
    return jnp.mean(nll / jnp.maximum(tok, 1))


def all_finite(tree) -> jax.Array:
    """[] bool: no NaN or inf in any leaf (the updated parameters: a finite loss can still step them to inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.jit
def largest_magnitude(tree) -> jax.Array:
    """[] the largest |value| of any leaf (a parameter near 1e30 is finite but diverged; a norm would overflow)."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig, *, rules: ShardingRules | None = None,
                    shardings=None):
    """-> step(trainable, frozen, opt_state, batch, key, token_denominator, shapes) returning (trainable,
    opt_state, metrics); `shapes` (the collator's `LatentShapes`, see `ivtlr_loss`) is static. With `rules`
    and `shardings` ((trainable, frozen, opt_state, batch) shardings from `step_shardings`) the jit gets
    explicit in/out shardings. metrics:
    loss, tokens, grad_norm, and `finite` (loss, gradient norm and updated parameters all finite), read
    by the loop with the loss, so the guard adds no host synchronisation of its own."""

    def step(trainable, frozen, opt_state, batch, key, token_denominator, shapes: LatentShapes):
        def loss_fn(trainable):
            model = nnx.merge(graphdef, trainable, frozen)
            _, aux = ivtlr_loss(model, batch, cfg.latent, shapes, dropout_key=key)
            return batch_loss(aux.row_nll, aux.row_tokens, cfg, token_denominator), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "tokens": aux.num_tokens, "grad_norm": grad_norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)}
        return trainable, opt_state, metrics

    kwargs = dict(static_argnums=(6,), donate_argnums=(0, 2))
    if shardings is not None:
        t_sh, f_sh, o_sh, b_sh = shardings
        replicated = NamedSharding(rules.mesh, PartitionSpec())
        kwargs.update(in_shardings=(t_sh, f_sh, o_sh, b_sh, replicated, replicated),
                      out_shardings=(t_sh, o_sh, replicated))
    return jax.jit(step, **kwargs)


def make_cut_window_step(tx: optax.MultiSteps, trainable, opt_state, rules: ShardingRules):
    """-> apply(trainable, opt_state) returning (trainable, opt_state, finite): the gradients that `optax.MultiSteps`
    holds for a window an optimizer reset is about to cut short (the mean of its micro-batches' gradients; MultiSteps
    applies a window only once it is full) applied as one optimizer step, the window emptied. Jitted, with the
    state's shardings kept."""

    def apply(trainable, opt_state):
        grads = optax.tree.cast_like(opt_state.acc_grads, trainable)
        updates, inner = tx.inner_opt.update(grads, opt_state.inner_opt_state, params=trainable)
        trainable = optax.apply_updates(trainable, updates)
        opt_state = opt_state._replace(mini_step=jnp.zeros_like(opt_state.mini_step),
                                       gradient_step=opt_state.gradient_step + 1, inner_opt_state=inner,
                                       acc_grads=jax.tree.map(jnp.zeros_like, opt_state.acc_grads))
        return trainable, opt_state, all_finite(trainable)

    replicated = NamedSharding(rules.mesh, PartitionSpec())
    shardings = (state_shardings(trainable, rules), opt_state_shardings(opt_state, trainable, rules))
    return jax.jit(apply, in_shardings=shardings, out_shardings=(*shardings, replicated), donate_argnums=(0, 1))


def step_shardings(trainable, frozen, opt_state, batch, rules: ShardingRules):
    """Explicit shardings of the step's inputs: parameters by their logical axes, the optimizer state as
    placed by its (jitted) initialisation, the batch by `batch_shardings`."""
    return (state_shardings(trainable, rules), state_shardings(frozen, rules),
            opt_state_shardings(opt_state, trainable, rules), batch_shardings(batch, rules))


def opt_state_shardings(opt_state, trainable, rules: ShardingRules):
    """Every part of the optimizer state that mirrors the parameters (Adam's moments, accumulated
    gradients) is sharded like them; the rest (counters) is replicated."""
    replicated = NamedSharding(rules.mesh, PartitionSpec())
    param_structure = jax.tree.structure(trainable)
    param_shardings = jax.tree.leaves(state_shardings(trainable, rules), is_leaf=lambda x: isinstance(x, NamedSharding))

    def place(node):
        if jax.tree.structure(node) == param_structure:
            return jax.tree.unflatten(param_structure, param_shardings)
        children, rebuild = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:  # a leaf
            return replicated
        return jax.tree_util.tree_unflatten(rebuild, [place(c) for c in children])

    return place(opt_state)


def init_optimizer(tx: optax.GradientTransformation, trainable, rules: ShardingRules | None = None):
    """Optimizer state placed like the parameters it mirrors and replicated elsewhere."""
    if rules is None:
        return jax.jit(tx.init)(trainable)
    shardings = opt_state_shardings(jax.eval_shape(tx.init, trainable), trainable, rules)
    return jax.jit(tx.init, out_shardings=shardings)(trainable)


def split_trainable(model: nnx.Module, trainable_filter):
    """(graphdef, trainable state, frozen state)."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    return graphdef, trainable, frozen
