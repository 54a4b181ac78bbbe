"""The Qwen2-VL vision tower on 4 images in one jitted call with image_grid_thw traced (frame sizes not
known when compiling), against the same images run one at a time, and against the dense-mask attention
that call used before `common.frame_attention`.

A random Flax `VisionTower` at bench/forward.py's "mid" vision widths (depth 4, embed 256, 4 heads of
64, MLP 1024), fp32, each call under `jax.jit` (the grid an array argument, so traced):

- (a) 4 images of one size (default 32x32 patches each, a 448x448 image) as one flat call;
- (b) 4 images of mixed sizes (default 32x32, 24x24, 16x16, 24x16 patches) as one flat call;
- (c) the same images one at a time: the sum of 4 calls, each given its static frame length (the
  per-frame path, plain attention without a mask: the cheapest way to run one image);
- old: (a) and (b) with the tower's attention swapped for the previous one, one softmax over all Np
  keys under a [1, Np, Np] block-diagonal mask (`dense_frame_attention` below).

Printed: interleaved medians (bench/timing.py) of each, the ratios (a)/(c), (b)/(c) (goal: <= 1.2) and
old/new, and max |difference| of the features between new, old and the one-at-a-time calls (the
computations are the same, so rounding level in fp32). `--grad` also times forward + backward (gradient
of the features' sum w.r.t. the tower's parameters) of (b), old (b) and (c_b). `--tiles 32,64,128
--groups 1,4,8` sweeps `frame_attention`'s TILE and GROUP (the default is the module's; how they were
chosen: docs/benchmarks.md section 12). JAX uses every core of the machine (no `--threads`: there is no
PyTorch side); `--small` runs tiny widths and grids (the smoke test).

`--layouts` times instead (a)'s images in one call in the two ways the tower can attend within same-size
frames, alternating: stacked (the frame length static: attention per frame, [4, L, L] blocks without a
mask; the baseline, the trainer's path before issue #29, now attention_impl "fused"'s) and flat (the grid
traced: `frame_attention`, the default), forward and, with `--grad`, forward + backward; it prints
flat/stacked and the outputs' (gradients') max relative difference.

    python bench/vision.py [--repeats 10] [--same 32x32] [--mixed 32x32,24x24,16x16,24x16] [--grad]
                           [--tiles 64] [--groups 4] [--layouts] [--small]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.timing import cpu_seconds, interleaved_median_ms, other_load_note, timed, warn_if_loaded  # noqa: E402
from ivtlr_jax.models.common import frame_attention as fa  # noqa: E402
from ivtlr_jax.models.common.attention import dot_product_attention  # noqa: E402
from ivtlr_jax.models.qwen2vl import vision  # noqa: E402
from ivtlr_jax.models.qwen2vl.config import VisionConfig  # noqa: E402

MID = dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4, out_hidden_size=512)
SMALL = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, out_hidden_size=16)


def dense_frame_attention(q, k, v, segment, scale, tile=None, group=None):
    """The attention the towers ran on frames of unknown sizes before `frame_attention`: one softmax over
    all Np keys under the [1, Np, Np] block-diagonal mask."""
    mask = (segment[:, None] == segment[None, :])[None]
    return dot_product_attention(q[None], k[None], v[None], mask, scale)[0]


@contextlib.contextmanager
def tower_attention(fn):
    """The tower's attention for frames of unknown sizes is `fn` while a call is traced inside."""
    saved = vision.frame_attention
    vision.frame_attention = fn
    try:
        yield
    finally:
        vision.frame_attention = saved


def grids(text: str) -> list[tuple[int, int]]:
    """'32x32,24x16' -> [(32, 32), (24, 16)]: patch rows x columns (even: whole 2x2 merge blocks)."""
    out = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    if any(h % 2 or w % 2 for h, w in out):
        raise ValueError(f"patch grids must be even (2x2 merge blocks): {text}")
    return out


def images(cfg: VisionConfig, sizes, seed: int = 0):
    """Random pixel_values [Np, patch_dim] and image_grid_thw [n, 3] (one frame per image)."""
    grid = np.array([(1, h, w) for h, w in sizes], np.int32)
    pv = np.random.default_rng(seed).standard_normal((int(grid.prod(-1).sum()), cfg.patch_dim), np.float32)
    return jnp.asarray(pv), jnp.asarray(grid)


class Tower:
    """A random tower's jitted calls: `compiled` one call layout, `one_at_a_time` (c), `flat_inputs`."""

    def __init__(self, cfg: VisionConfig):
        self.cfg = cfg
        self.graphdef, self.state = nnx.split(vision.VisionTower(cfg, rngs=nnx.Rngs(0)))

    def compiled(self, attention=None, frame_len=None, grad=False):
        """A fresh jitted tower call (traced with `attention` in place when given): (pv, grid) -> out, or the
        gradient of the output's sum w.r.t. the tower's parameters with `grad`. frame_len: static, every
        frame that long (the stacked layout's per-frame attention); None: the grid traced (frame_attention)."""
        graphdef, state = self.graphdef, self.state

        def call(state, pv, grid):
            return nnx.merge(graphdef, state)(pv, grid, frame_len=frame_len)
        if grad:
            call = jax.grad(lambda state, pv, grid, f=call: jnp.sum(f(state, pv, grid)))
        jitted = jax.jit(call)

        def run(pv, grid):
            with tower_attention(attention) if attention else contextlib.nullcontext():
                return jax.block_until_ready(jitted(state, pv, grid))
        return run

    def one_at_a_time(self, sizes, grad=False):
        """(c): each image its own call, with its static frame length; returns the calls' outputs."""
        runs = {hw: self.compiled(frame_len=hw[0] * hw[1], grad=grad) for hw in set(sizes)}
        singles = [images(self.cfg, [hw], seed=i) for i, hw in enumerate(sizes)]
        return lambda: [runs[hw](*x) for hw, x in zip(sizes, singles)]

    def flat_inputs(self, sizes):
        """The same pixels as `one_at_a_time`'s, concatenated: (pixel_values [Np, patch_dim], grid [n, 3])."""
        parts = [images(self.cfg, [hw], seed=i) for i, hw in enumerate(sizes)]
        return jnp.concatenate([x[0] for x in parts]), jnp.concatenate([x[1] for x in parts])


def forward_section(args, tower: Tower, same, mixed, inputs) -> None:
    """(a), (b), (c), old and the tile sweep: medians, ratios, max |difference| to one at a time."""
    calls = {"c_a": tower.one_at_a_time(same), "c_b": tower.one_at_a_time(mixed)}
    for case in "ab":
        run = tower.compiled(dense_frame_attention)
        calls[f"old_{case}"] = lambda run=run, x=inputs[case]: run(*x)
    sweep = list(itertools.product([int(t) for t in args.tiles.split(",")], [int(g) for g in args.groups.split(",")]))
    for tile, group in sweep:
        for case in "ab":
            run = tower.compiled(lambda *a, t=tile, g=group, **k: fa.frame_attention(*a, tile=t, group=g))
            calls[f"new_{case} c={tile} G={group}"] = lambda run=run, x=inputs[case]: run(*x)
    ms, outs, compile_s = time_calls(calls, args.repeats)

    diffs = {}
    for case in "ab":
        single = jnp.concatenate(outs[f"c_{case}"])
        diffs[f"old_{case}"] = float(jnp.abs(outs[f"old_{case}"] - single).max())
        for tile, group in sweep:
            name = f"new_{case} c={tile} G={group}"
            diffs[name] = float(jnp.abs(outs[name] - single).max())
    for name in calls:
        extra = f", max|diff to one at a time| {diffs[name]:.1e}" if name in diffs else ""
        print(f"{name}: {ms[name]:.1f} ms (compile {compile_s[name]:.1f} s){extra}", flush=True)
    for tile, group in sweep:
        new = {case: ms[f"new_{case} c={tile} G={group}"] for case in "ab"}
        print(f"ratios c={tile} G={group}: (a)/(c) {new['a'] / ms['c_a']:.2f}, (b)/(c) {new['b'] / ms['c_b']:.2f}, "
              f"old/new (a) {ms['old_a'] / new['a']:.2f}, old/new (b) {ms['old_b'] / new['b']:.2f}", flush=True)
    print(f"max|diff| new vs one at a time {max(v for k, v in diffs.items() if k.startswith('new')):.1e}, "
          f"old vs one at a time {max(diffs['old_a'], diffs['old_b']):.1e}", flush=True)


def time_calls(calls: dict, repeats: int):
    """(interleaved median ms, first outputs, compile seconds) of each call; prints the load note."""
    compile_s, outs = {}, {}
    for name, call in calls.items():  # trace + compile + one run
        compile_s[name], outs[name] = timed(call)
    start, clock = cpu_seconds(), time.perf_counter()
    ms = interleaved_median_ms(calls, repeats)
    print(other_load_note(start, time.perf_counter() - clock), flush=True)
    return ms, outs, compile_s


def grad_section(args, tower: Tower, mixed, inputs) -> None:
    """Forward + backward of (b), old (b) and (c_b): medians, ratios, gradients' max relative difference."""
    grad_calls = {"c_b": tower.one_at_a_time(mixed, grad=True)}
    run_old, run_new = tower.compiled(dense_frame_attention, grad=True), tower.compiled(grad=True)
    grad_calls["old_b"] = lambda: run_old(*inputs["b"])
    grad_calls["new_b"] = lambda: run_new(*inputs["b"])
    grads = {name: call() for name, call in grad_calls.items()}
    gms = interleaved_median_ms(grad_calls, args.repeats)
    summed = jax.tree.leaves(jax.tree.map(lambda *g: sum(g), *grads["c_b"]))  # the images' gradients add up
    gdiff = max(relative_grad_diff(grads[name], summed) for name in ("old_b", "new_b"))
    print("fwd+bwd: " + ", ".join(f"{n} {gms[n]:.1f} ms" for n in grad_calls)
          + f" | (b)/(c) {gms['new_b'] / gms['c_b']:.2f}, old/new {gms['old_b'] / gms['new_b']:.2f}, "
          f"max rel|dgrad| vs one at a time {gdiff:.1e}", flush=True)


def relative_grad_diff(grads, reference_leaves) -> float:
    """Max over parameters of max |g - ref| / max |ref|."""
    return max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
               for a, b in zip(jax.tree.leaves(grads), reference_leaves))


def layouts_section(args, tower: Tower, same, inputs) -> None:
    """(a)'s same-size images in one call in both layouts, alternating: stacked (the frame length static:
    attention per frame, no mask; the baseline) and flat (the grid traced: `frame_attention`), forward and,
    with --grad, forward + backward. Prints each median, flat/stacked and the outputs' max difference."""
    frame_len = same[0][0] * same[0][1]
    kinds = {"forward": False, "fwd+bwd": True} if args.grad else {"forward": False}
    for kind, grad in kinds.items():
        stacked, flat = tower.compiled(frame_len=frame_len, grad=grad), tower.compiled(grad=grad)
        calls = {"stacked": lambda: stacked(*inputs["a"]), "flat": lambda: flat(*inputs["a"])}
        ms, outs, _ = time_calls(calls, args.repeats)
        diff = relative_grad_diff(outs["flat"], jax.tree.leaves(outs["stacked"]))
        print(f"layouts (a) {kind}: stacked (per frame) {ms['stacked']:.1f} ms, flat (frame_attention) "
              f"{ms['flat']:.1f} ms | flat/stacked {ms['flat'] / ms['stacked']:.2f}, "
              f"max rel|diff| {diff:.1e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--same", default="32x32", help="the one size of (a), 4 images")
    p.add_argument("--mixed", default="32x32,24x24,16x16,24x16", help="the images of (b)")
    p.add_argument("--grad", action="store_true", help="also time forward + backward of (b), old (b), (c_b)")
    p.add_argument("--tiles", default=str(fa.TILE), help="frame_attention TILE values to sweep")
    p.add_argument("--groups", default=str(fa.GROUP), help="frame_attention GROUP values to sweep")
    p.add_argument("--layouts", action="store_true",
                   help="only time (a) stacked (per-frame attention) against flat (frame_attention)")
    p.add_argument("--small", action="store_true", help="tiny widths and grids (smoke test)")
    args = p.parse_args(argv)
    cfg = VisionConfig(**(SMALL if args.small else MID))
    same, mixed = grids(args.same) * 4, grids(args.mixed)
    if args.small:
        same, mixed = [(8, 8)] * 4, [(8, 8), (6, 6), (4, 4), (6, 4)]
    tower = Tower(cfg)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices); vision depth "
          f"{cfg.depth}, embed {cfg.embed_dim}, {cfg.num_heads} heads of {cfg.head_dim}; fp32; repeats {args.repeats}",
          flush=True)
    warn_if_loaded("before the timed calls")
    inputs = {"a": tower.flat_inputs(same), "b": tower.flat_inputs(mixed)}
    print(f"(a) {len(same)} images of {same[0][0]}x{same[0][1]} patches: Np {inputs['a'][0].shape[0]}; "
          f"(b) {', '.join(f'{h}x{w}' for h, w in mixed)}: Np {inputs['b'][0].shape[0]}", flush=True)
    if args.layouts:
        layouts_section(args, tower, same, inputs)
        return 0
    forward_section(args, tower, same, mixed, inputs)
    if args.grad:
        grad_section(args, tower, mixed, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
