"""The decoder stack the model families share: pre-norm GQA attention + gated MLP, layers stacked on a
leading axis and run under `jax.lax.scan` (compile time does not grow with depth), with an optional
remat policy, a KV cache, and the per-layer one-row attention probabilities used by the latent loop. The
stack holds its config and run options (`RunOptions`); a call passes only what changes between calls
(`Attend`: positions, mask, cache slot, rows to report).

Model families differ only by options of `DecoderConfig` (Qwen2: q/k/v biases; Chameleon: per-head
q/k LayerNorm and, for the 30B model, swin-norm ordering; Qwen3: q/k RMSNorm over the head dim), not
by copies. A call may add a tensor to the outputs of the first layers (`layer_addends`: Qwen3-VL's
DeepStack image features).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import dot_product_attention, row_attention_probs
from .kv_cache import to_cache_layout, write_chunk
from .layers import activation, layer_norm, param, rms_norm
from .lora import PROJECTIONS, token_einsum
from .rope import apply_rope
from .run_options import RunOptions, scan_stacked
from .sharding import constrain

QK_NORM_EPS = 1e-5  # Chameleon's q/k LayerNorm epsilon (fixed in transformers)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False
    qk_layernorm: bool = False  # LayerNorm over head_dim with a weight and bias per head (Chameleon)
    swin_norm: bool = False  # h + norm(attn(h)), h + norm(mlp(h)) instead of h + attn(norm(h)) (Chameleon-30B)
    qk_rmsnorm: bool = False  # RMSNorm over head_dim before RoPE, one weight shared by the heads (Qwen3)

    def hf_fields(self) -> dict:
        """The transformers `config.json` fields of the language model that every family names alike."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
        }


class DecoderOutput(NamedTuple):
    hidden: jax.Array  # [B, T, D] output of the last layer (before the final norm)
    cache_kv: tuple[jax.Array, jax.Array] | None  # updated (k [L, B, K, S, H], v [L, B, K, H, S])
    row_probs: jax.Array | None  # [L, B, S] head-averaged attention probabilities of the chosen rows
    all_hidden: jax.Array | None  # [L, B, T, D] output of every layer


class Attend(NamedTuple):
    """What every layer of one decoder call attends with."""
    cos: jax.Array  # [B, T, head_dim] RoPE of the chunk's positions
    sin: jax.Array
    mask: jax.Array  # [B, T, T] without a cache, [B, T, S] with one
    write_index: jax.Array | None  # [] or [B]: the cache slot the chunk goes to (None: no cache)
    prob_rows: jax.Array | None  # [B]: the query row whose attention probabilities each layer reports


class DecoderLayers(nnx.Module):
    """`num_layers` decoder layers; every parameter has a leading `layers` axis.

    Suffix letters name the axes after the layer axis: d model width, n query heads, k key/value
    heads, h head dim, f MLP width.
    """

    def __init__(self, cfg: DecoderConfig, options: RunOptions = RunOptions(), *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg, self.options = cfg, options
        L, D, N, K, H, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.intermediate_size)
        p = lambda shape, axes, init="normal": param(rngs, (L, *shape), ("layers", *axes), param_dtype, init)
        self.attn_norm_d = p((D,), ("norm",), "ones")
        self.q_weight_dnh = p((D, N, H), ("embed", "heads", "head_dim"))
        self.k_weight_dkh = p((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.v_weight_dkh = p((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.o_weight_nhd = p((N, H, D), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias_nh = p((N, H), ("heads", "head_dim"), "zeros")
            self.k_bias_kh = p((K, H), ("kv_heads", "head_dim"), "zeros")
            self.v_bias_kh = p((K, H), ("kv_heads", "head_dim"), "zeros")
        if cfg.qk_layernorm:
            self.q_norm_scale_nh = p((N, H), ("heads", "head_dim"), "ones")
            self.q_norm_bias_nh = p((N, H), ("heads", "head_dim"), "zeros")
            self.k_norm_scale_kh = p((K, H), ("kv_heads", "head_dim"), "ones")
            self.k_norm_bias_kh = p((K, H), ("kv_heads", "head_dim"), "zeros")
        if cfg.qk_rmsnorm:
            self.q_norm_h = p((H,), ("head_dim",), "ones")
            self.k_norm_h = p((H,), ("head_dim",), "ones")
        self.mlp_norm_d = p((D,), ("norm",), "ones")
        self.gate_weight_df = p((D, F), ("embed", "mlp"))
        self.up_weight_df = p((D, F), ("embed", "mlp"))
        self.down_weight_fd = p((F, D), ("mlp", "embed"))


def _layer(lp: DecoderLayers, h: jax.Array, attend: Attend, k_cache: jax.Array | None, v_cache: jax.Array | None,
           dropout_key: jax.Array | None = None):
    """One layer on h [B, T, D]; `lp` holds one layer's parameters (the scanned slice), its config and options;
    k_cache / v_cache: its slice of the cache (None: no cache)."""
    cfg, dtype, rules = lp.cfg, lp.options.dtype, lp.options.rules
    w = lambda v: v[...].astype(dtype)
    eps = cfg.rms_norm_eps
    act = activation(cfg.hidden_act)
    lora = getattr(lp, "lora", None)

    def proj(name: str, x: jax.Array) -> jax.Array:
        attr, eq = PROJECTIONS[name]
        y = token_einsum(eq, x, w(getattr(lp, attr)))
        if lora is not None and name in lora.targets:
            y = y + lora.delta(name, x, dtype, dropout_key)
        return y

    x = h if cfg.swin_norm else rms_norm(h, lp.attn_norm_d[...], eps)
    q, k, v = proj("q_proj", x), proj("k_proj", x), proj("v_proj", x)
    if cfg.qkv_bias:
        q, k, v = q + w(lp.q_bias_nh), k + w(lp.k_bias_kh), v + w(lp.v_bias_kh)
    if cfg.qk_layernorm:
        q = layer_norm(q, lp.q_norm_scale_nh[...], lp.q_norm_bias_nh[...], QK_NORM_EPS)
        k = layer_norm(k, lp.k_norm_scale_kh[...], lp.k_norm_bias_kh[...], QK_NORM_EPS)
    if cfg.qk_rmsnorm:
        q, k = rms_norm(q, lp.q_norm_h[...], eps), rms_norm(k, lp.k_norm_h[...], eps)
    q = constrain(apply_rope(q, attend.cos, attend.sin), ("batch", "length", "heads", "head_dim"), rules)
    k = apply_rope(k, attend.cos, attend.sin)

    if k_cache is not None:  # this layer's cache slice (kv_cache.py layout); the chunk goes in at write_index
        new_kv = to_cache_layout(k, v, k_cache.dtype)
        k_att, v_att = (x.astype(dtype) for x in write_chunk(k_cache, v_cache, *new_kv, attend.write_index))
        layout = "cache"
    else:
        new_kv = None
        k_att, v_att, layout = k, v, "bskh"
    scale = cfg.head_dim**-0.5
    attn = dot_product_attention(q, k_att, v_att, attend.mask, scale, layout, lp.options.attention_impl)
    rows = None if attend.prob_rows is None else \
        row_attention_probs(q, k_att, attend.mask, attend.prob_rows, scale, layout)
    attn_out = proj("o_proj", attn)
    if cfg.swin_norm:
        attn_out = rms_norm(attn_out, lp.attn_norm_d[...], eps)
    h = constrain(h + attn_out, ("batch", "length", "embed"), rules)

    x = h if cfg.swin_norm else rms_norm(h, lp.mlp_norm_d[...], eps)
    gated = constrain(act(proj("gate_proj", x)) * proj("up_proj", x), ("batch", "length", "mlp"), rules)
    mlp_out = proj("down_proj", gated)
    if cfg.swin_norm:
        mlp_out = rms_norm(mlp_out, lp.mlp_norm_d[...], eps)
    h = constrain(h + mlp_out, ("batch", "length", "embed"), rules)
    return h, new_kv, rows


def run_decoder(layers: DecoderLayers, h: jax.Array, attend: Attend, *,
                cache_kv: tuple[jax.Array, jax.Array] | None = None, collect_hidden: bool = False,
                dropout_key: jax.Array | None = None, layer_addends: jax.Array | None = None) -> DecoderOutput:
    """Scan the stacked layers over h [B, T, D] (in the layers' options: dtype, remat, unrolling, sharding
    rules, attention implementation).

    Without a cache, keys are the T inputs themselves and `attend.mask` is [B, T, T]. With `cache_kv` (k [L, B,
    K, S, H], v [L, B, K, H, S], see kv_cache.py) the T new keys/values are written at slot `attend.write_index`
    and queries attend over all S slots under a mask [B, T, S]. `attend.prob_rows` [B] picks, per example, the
    query whose head-averaged attention probabilities are returned per layer. `dropout_key`: LoRA dropout
    (training), folded with the layer index. `collect_hidden`: also return every layer's output.
    `layer_addends` [A, B, T, D]: added to the output of layers 0..A-1 (A <= L), after the layer (the
    collected outputs are the layers' own, before the addition, as transformers' hidden states).
    """
    if attend.write_index is not None:
        attend = attend._replace(write_index=jnp.asarray(attend.write_index, jnp.int32))

    def body(lp, h, xs):
        # the cache is read-only here: each layer attends over its slice with the chunk written into a
        # local copy, and hands the chunk's keys/values out; they go into the stacked cache once, after
        # the scan, in place (updating the cache inside the scan made XLA copy all of it per layer)
        index, k_layer, v_layer = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        h, new_kv, rows = _layer(lp, h, attend, k_layer, v_layer, key)
        layer_out = h if collect_hidden else None  # the layer's own output, as transformers records it
        if layer_addends is not None:
            last = layer_addends.shape[0] - 1
            h = h + jnp.where(index <= last, layer_addends[jnp.minimum(index, last)], 0).astype(h.dtype)
        return h, (rows, layer_out, new_kv)

    k_cache, v_cache = cache_kv if cache_kv is not None else (None, None)
    h, (rows, all_hidden, new_kv) = scan_stacked(layers, body, h, (jnp.arange(layers.cfg.num_layers), k_cache,
                                                                   v_cache), layers.options)
    if cache_kv is not None:  # new_kv: [L, B, K, T, H] and [L, B, K, H, T], written at slot write_index
        k_cache, v_cache = write_chunk(k_cache, v_cache, *new_kv, attend.write_index)
    return DecoderOutput(h, None if cache_kv is None else (k_cache, v_cache), rows, all_hidden)
