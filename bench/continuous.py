"""Evaluation throughput: continuous batching (`generate_continuous`) against static batches
(`ivtlr_generate`, batches of `--slots` prompts decoding until their longest answer ends), on a workload
whose answer lengths vary >= 5x, both in one run.

The model is bench/generate.py's random Qwen2-VL (bench/shared.py `build_models`, fp32). A random
model has no natural answer lengths, so the workload is made of its own greedy outputs: a pool of
`--pool` prompts (bench/generate.py `make_prompts`: ~40 text tokens, one 224x224 image, `--latents`
latents, K = `--k`) is generated once without EOS for `--max-new` tokens; the EOS is the token whose
first occurrences in [`--min-len`, `--max-new`) take the most distinct values over the pool, and
`--prompts` prompts are picked whose answers (up to that EOS, or `--max-new` tokens when it never comes)
lie nearest to lengths evenly spaced on a log scale from `--min-len` to `--max-new` (real rationale
lengths are right-skewed: many short, a long tail; a prompt is taken twice where the pool has no other
answer of about a target's length), then shuffled (seed 0) as a data set has them. Every prompt
is left-padded to the longest (one length bucket, as evaluation pads them), so both sides compile once.

- static: `ivtlr_generate` on consecutive batches of `--slots` prompts (the last one short), the way
  evaluation ran before: each batch prefills together, then decodes until its longest answer ends.
- continuous: `generate_continuous` with `--slots` slots over all prompts: prompts start (prefill and
  latent passes) `--admit` at a time (default: as many as the slots), then each decodes in a free slot;
  a finished row's slot takes the next started prompt.

- `--devices 1,2,4`: continuous batching once per device count d, its slots split over d local devices
  (the parameters replicated on each; `--slots` a multiple of every d), in the same run, each side
  timed and checked to give every prompt the static side's tokens. On a CPU, host devices come from
  `XLA_FLAGS=--xla_force_host_platform_device_count=N` (they share the cores: a check, not a speed-up).

Checked in the run: both give every prompt the same tokens. Timed: the whole workload, the sides
alternating for `--repeats` rounds (median), after one untimed round that compiles. Reported: the
answer lengths (min, max, ratio), examples/s of each side and continuous / static (goal >= 1.5x at 8
slots on a workload whose lengths vary >= 5x). Compare ratios measured in one run, not examples/s,
across machines.

    python bench/continuous.py [--prompts 96] [--slots 8] [--max-new 160] [--min-len 16] [--pool 128]
                               [--admit N] [--repeats 3] [--latents 3] [--k 8] [--devices 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ivtlr_jax.continuous import generate_continuous  # noqa: E402
from ivtlr_jax.data.collate import left_padded_positions  # noqa: E402
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate  # noqa: E402
from ivtlr_jax.latent import LatentConfig  # noqa: E402
from ivtlr_jax.models import ShardingRules  # noqa: E402
from ivtlr_jax.models.common.sharding import local_data_mesh  # noqa: E402
from bench.generate import make_prompts  # noqa: E402
from bench.shared import LATENT_ID, build_models, stacked_images  # noqa: E402
from bench.timing import cpu_seconds, interleaved_median_ms, other_load_note, timed, warn_if_loaded  # noqa: E402


def padded(singles: list[dict], width: int) -> list[dict]:
    """Each prompt left-padded to `width` (one bucket for all), its image stacked per image."""
    out = []
    for s in singles:
        pad = width - s["input_ids"].shape[1]
        ids = np.concatenate([np.zeros((1, pad), np.int64), s["input_ids"]], axis=1)
        mask = np.concatenate([np.zeros((1, pad), np.int64), s["attention_mask"]], axis=1)
        positions = left_padded_positions(mask)
        out.append(stacked_images(s | {"input_ids": ids, "attention_mask": mask, "position_ids": positions}))
    return out  # pixel_values [1, Np, 1176]: as evaluation's prompts (`stack_images` of one image)


def batched(prompts: list[dict]) -> dict:
    """Prompts of one width as one batch, their same-size images stacked per image."""
    cat = lambda key: np.concatenate([p[key] for p in prompts])
    return stacked_images({key: cat(key) for key in ("input_ids", "attention_mask", "position_ids", "pixel_values",
                                                      "image_grid_thw")})


def answer_lengths(tokens: np.ndarray, eos: int, max_new: int) -> np.ndarray:
    """[P] tokens before the first `eos` of each row (max_new when there is none)."""
    hit = tokens == eos
    return np.where(hit.any(axis=1), hit.argmax(axis=1), max_new)


def workload(model, latent, args) -> tuple[list[dict], int, np.ndarray]:
    """(the chosen prompts, padded to one width; the EOS; their answer lengths)."""
    singles, _, _ = make_prompts(args.pool, args.latents)
    width = max(s["input_ids"].shape[1] for s in singles)
    pool = padded(singles, width)
    free = SamplingConfig(max_new_tokens=args.max_new)
    tokens = np.concatenate([np.asarray(ivtlr_generate(model, batched(pool[i:i + 32]), latent, free).tokens)
                             for i in range(0, len(pool), 32)])
    targets = np.geomspace(args.min_len, args.max_new, args.prompts)
    best = None
    for eos in np.unique(tokens):  # the EOS whose answers come nearest to the targets
        lengths = answer_lengths(tokens, int(eos), args.max_new)
        chosen, error = pick(lengths, targets, args.min_len)
        if chosen is not None and (best is None or error < best[0]):
            best = (error, int(eos), lengths, chosen)
    if best is None:
        raise SystemExit(f"fewer than {args.prompts} prompts of the pool have answers >= {args.min_len} tokens; "
                         "raise --pool or lower --min-len")
    _, eos, lengths, chosen = best
    chosen = np.random.default_rng(0).permutation(chosen)
    return [pool[i] for i in chosen], eos, lengths[chosen]


def pick(lengths: np.ndarray, targets: np.ndarray, min_len: int) -> tuple[list[int] | None, float]:
    """Per target length, the prompt whose answer is nearest to it on a log scale (answers of at least
    min_len tokens; within 5% of each other, the least used one) -> (the prompts, the summed log distance);
    (None, inf) when fewer prompts qualify than there are targets. A prompt may be picked twice where the
    pool has no other answer of about that length."""
    eligible = np.flatnonzero(lengths >= min_len)
    if len(eligible) < len(targets):
        return None, float("inf")
    used = dict.fromkeys(eligible.tolist(), 0)
    chosen, error = [], 0.0
    for target in targets:
        distance = lambda i: abs(np.log(lengths[i] / target))
        best = min(used, key=lambda i: (round(distance(i) / 0.05), used[i], distance(i)))
        error += distance(best)
        used[best] += 1
        chosen.append(best)
    return chosen, error


def busy_schedule(lengths: np.ndarray, slots: int, max_new: int) -> int:
    """Decoding steps of continuous batching if prompts entered their slots without delay: prompts in
    order, each into the slot that frees first, a row taking min(length + 1, max_new) steps."""
    free_at = [0] * slots
    for length in lengths:
        free_at[int(np.argmin(free_at))] += min(int(length) + 1, max_new)
    return max(free_at)


def side_name(devices: int) -> str:
    return "continuous" if devices == 1 else f"continuous on {devices} devices"


def continuous_side(model, prompts, latent, sampling, args, devices: int):
    """A function running the workload by continuous batching with the slots split over `devices` local
    devices (the model's parameters replicated on them) -> every prompt's tokens [P, max_new]."""
    rules = None
    if devices > 1:
        rules = ShardingRules(local_data_mesh(devices))
        graphdef, params = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(params, NamedSharding(rules.mesh, PartitionSpec())))

    def continuous():
        rows = dict(generate_continuous(model, prompts, latent, sampling, slots=args.slots, admit=args.admit,
                                        rules=rules))
        return np.stack([rows[i].tokens for i in range(len(prompts))])

    return continuous


def bench(args) -> list[str]:
    _, model = build_models()
    latent = LatentConfig(LATENT_ID, args.k)
    prompts, eos, lengths = workload(model, latent, args)
    sampling = SamplingConfig(max_new_tokens=args.max_new, eos_token_id=eos, pad_token_id=eos)
    batches = [batched(prompts[i:i + args.slots]) for i in range(0, len(prompts), args.slots)]

    def static():
        return np.concatenate([np.asarray(ivtlr_generate(model, b, latent, sampling).tokens) for b in batches])

    sides = {"static": static, **{side_name(d): continuous_side(model, prompts, latent, sampling, args, d)
                                  for d in args.devices}}
    compile_s, tokens = {}, {}
    for name, side in sides.items():
        compile_s[name], tokens[name] = timed(side)
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    ms = interleaved_median_ms(sides, args.repeats)
    load_note = other_load_note(cpu_start, time.perf_counter() - wall_start)
    n = len(prompts)
    ratio = lengths.max() / max(lengths.min(), 1)
    steps = lambda ls: min(ls.max() + 1, args.max_new)  # decoding steps until every row has ended
    static_steps = sum(steps(lengths[i:i + args.slots]) for i in range(0, n, args.slots))
    busy_steps = busy_schedule(lengths, args.slots, args.max_new)
    lines = [
        f"workload: {n} prompts of {prompts[0]['input_ids'].shape[1]} tokens ({args.latents} latents, K={args.k}), "
        f"EOS token {eos}, answers {lengths.min()}-{lengths.max()} tokens (x{ratio:.1f}, median "
        f"{np.median(lengths):.0f}, mean {lengths.mean():.1f}; {len({id(p) for p in prompts})} distinct prompts); "
        f"{args.slots} rows per batch / slots",
        f"decoding steps: static {static_steps}, continuous {busy_steps} if prompts entered slots without delay "
        f"(x{static_steps / busy_steps:.2f}: what continuous batching can gain on decoding alone)",
        *(f"check: every prompt's tokens equal between static and {name}: "
          f"{bool(np.array_equal(tokens['static'], tokens[name]))}" for name in sides if name != "static"),
        f"check: answer lengths as the workload says: "
        f"{bool(np.array_equal(answer_lengths(tokens['static'], eos, args.max_new), lengths))}",
        "first round (compiles): " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()),
    ]
    eps = {k: n * 1e3 / ms[k] for k in ms}
    for k in ms:
        lines.append(f"{k}: {ms[k] / 1e3:.2f} s for the workload -> {eps[k]:.2f} examples/s, "
                     f"{lengths.sum() * 1e3 / ms[k]:.1f} answer tokens/s")
    for d in args.devices:
        lines.append(f"{side_name(d)} / static: {eps[side_name(d)] / eps['static']:.2f}x examples/s "
                     + ("(goal >= 1.5x at 8 slots, answers varying >= 5x)" if d == 1 else
                        f"({eps[side_name(d)] / d:.2f} examples/s per device)"))
    return lines + [load_note] if load_note else lines


def device_counts(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): distinct positive counts, in order."""
    try:
        counts = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give device counts >= 1, comma-separated (1,2,4)")
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--slots", type=int, default=8, help="rows per static batch = continuous slots")
    parser.add_argument("--max-new", type=int, default=160, help="max_new_tokens")
    parser.add_argument("--min-len", type=int, default=16, help="shortest answer in the workload")
    parser.add_argument("--pool", type=int, default=128, help="prompts generated to choose the workload from")
    parser.add_argument("--admit", type=int, default=None,
                        help="prompts started together (generate_continuous's admit; default: the slots)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latents", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--devices", type=device_counts, default=(1,), metavar="D,D,...",
                        help="device counts to split the continuous slots over, each timed (default: 1)")
    args = parser.parse_args(argv)
    if args.pool < args.prompts or min(args.prompts, args.slots, args.max_new, args.repeats) < 1:
        parser.error("need --pool >= --prompts >= 1 and positive --slots, --max-new, --repeats")
    if any(args.slots % d for d in args.devices) or max(args.devices) > jax.local_device_count():
        parser.error(f"--devices {','.join(map(str, args.devices))}: each must divide --slots {args.slots} and be at "
                     f"most the {jax.local_device_count()} local devices")
    warn_if_loaded("before the run")
    print(f"jax devices: {jax.devices()}; repeats: {args.repeats}", flush=True)
    for line in bench(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
