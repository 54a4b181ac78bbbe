"""The model's attention (`models.common.attention.dot_product_attention`) with attention_impl "xla"
(einsums, the KV cache read in its own layout) vs "fused" (`jax.nn.dot_product_attention`: cuDNN on a GPU
where `cudnn_fits`, JAX's XLA implementation elsewhere), on two mid-size shapes, both sides in one run:

- prefill: q/k/v [B, T, N|K, H] as projected, a causal mask with row 1 left-padded by T/8; forward and
  forward + backward (gradients of q, k, v);
- decode: one query token per row against a KV cache layer of S slots (kv_cache.py layout, which the
  fused side reads through a transpose to [B, S, K, H]), forward only.

Timings are interleaved medians (bench/timing.py); max |difference| of the outputs over rows that see a key.

    python bench/attention.py [--batch 2] [--length 512] [--heads 12] [--kv-heads 2] [--head-dim 128]
                              [--decode-batch 8] [--slots 1024] [--dtype float32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import interleaved_median_ms, warn_if_loaded  # noqa: E402
from ivtlr_jax.models.common.attention import AttentionImpl, causal_mask, dot_product_attention  # noqa: E402
from ivtlr_jax.models.common.kv_cache import to_cache_layout  # noqa: E402
from ivtlr_jax.models.common.layers import DTYPES  # noqa: E402


def left_padded(b: int, s: int, pad: int) -> jax.Array:
    """[B, S] bool: row 1 left-padded by `pad` slots."""
    return jnp.arange(s)[None] >= jnp.where(jnp.arange(b) == 1, pad, 0)[:, None]


def compare(title: str, fns: dict, args: tuple, mask: jax.Array, repeats: int) -> None:
    """fns: name -> jitted function of args; prints the median ms of each and the outputs' max |difference|."""
    outs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}  # compile + first call
    ms = interleaved_median_ms({name: lambda fn=fn: jax.block_until_ready(fn(*args)) for name, fn in fns.items()},
                               repeats)
    first, *rest = outs.values()
    seen = mask.any(-1)
    diffs = []
    for other in rest:
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
            d = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
            diffs.append(float(jnp.where(seen[:, :, None, None], d, 0).max() if d.shape[:2] == seen.shape
                               else d.max()))
    names = list(fns)
    print(f"{title}: " + ", ".join(f"{n} {ms[n]:.2f} ms" for n in names)
          + f" | {names[0]}/{names[-1]} {ms[names[0]] / ms[names[-1]]:.2f}x, max|diff| {max(diffs):.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--slots", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    dtype, h = DTYPES[args.dtype], args.head_dim
    scale = h**-0.5
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.dtype}; "
          f"{args.heads} query / {args.kv_heads} KV heads of {h}", flush=True)
    warn_if_loaded("before the timed calls")
    keys = jax.random.split(jax.random.key(0), 6)
    normal = lambda key, shape: jax.random.normal(key, shape, dtype)

    b, t = args.batch, args.length
    q = normal(keys[0], (b, t, args.heads, h))
    k, v = normal(keys[1], (b, t, args.kv_heads, h)), normal(keys[2], (b, t, args.kv_heads, h))
    mask = causal_mask(jnp.arange(t), left_padded(b, t, t // 8))  # [B, T, T]
    attend = {impl: (lambda q, k, v, impl=impl: dot_product_attention(q, k, v, mask, scale, impl=impl))
              for impl in AttentionImpl}
    compare(f"prefill B={b} T={t} fwd", {i: jax.jit(f) for i, f in attend.items()}, (q, k, v), mask, args.repeats)
    grads = {i: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
             for i, f in attend.items()}
    compare(f"prefill B={b} T={t} fwd+bwd", grads, (q, k, v), mask, args.repeats)

    b, s = args.decode_batch, args.slots
    q = normal(keys[3], (b, 1, args.heads, h))
    k_cache, v_cache = to_cache_layout(normal(keys[4], (b, s, args.kv_heads, h)),
                                       normal(keys[5], (b, s, args.kv_heads, h)), dtype)
    mask = causal_mask(jnp.full((1,), s - 1), left_padded(b, s, s // 8))  # [B, 1, S]
    step = {impl: jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, mask, scale, "cache", impl))
            for impl in AttentionImpl}
    compare(f"decode B={b} S={s} (cache layout) fwd", step, (q, k_cache, v_cache), mask, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
