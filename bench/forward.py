"""Forward latency of the Flax ports vs transformers (PyTorch, CPU) on the same random models.

For each config a random transformers `Qwen2VLForConditionalGeneration` or
`ChameleonForConditionalGeneration` is saved to a temporary folder and loaded into Flax with
`from_pretrained`. Both run one full forward (vision tower or
VQ tokenizer + decoder + LM head -> logits) on the same right-padded batch of image+text rows:

- Flax: the forward under `nnx.jit`; the first call (trace + XLA compile) is timed and reported
  separately as "compile", then the median of `--repeats` calls (each waited on with
  `block_until_ready`).
- transformers: under `torch.no_grad()`, one warm-up call, then the median of `--repeats` calls.

The timed calls alternate (Flax, transformers, Flax, ...) so that both see the same machine load.

The logits of both are compared over the non-padding positions (max |dlogits|) so that the timings
are known to be of the same computation. Absolute times depend on the machine and its load: compare
the speed-up ratios (transformers time / Flax time), not the milliseconds, across machines.
JAX runs on its default platform (printed at start; set JAX_PLATFORMS=cpu to force the CPU).

    python bench/forward.py [--configs qwen2vl-tiny,qwen2vl-mid,chameleon-tiny,chameleon-mid] [--repeats 10]
                            [--threads N] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ivtlr_jax.io import from_pretrained  # noqa: E402
from tests import hf_tiny  # noqa: E402
from bench.timing import timed, interleaved_median_ms  # noqa: E402

MID_TEXT = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)

# name -> (family, text overrides, vision/VQ overrides, batch arguments)
CONFIGS = {
    # hf_tiny's default: hidden 64, 3 layers, vision depth 2, embed 32; two small images.
    "qwen2vl-tiny": ("qwen2vl", dict(), dict(), dict(sizes=((56, 56), (84, 56)), text_lens=((5, 7), (3, 2)))),
    # head_dim 512 / 8 = 64, so sum(mrope_section) must be 32. A 224x224 image is a 16x16 patch
    # grid (256 patches) merged 2x2 into 64 image tokens; rows are 216 and 176 tokens long.
    "qwen2vl-mid": (
        "qwen2vl",
        dict(MID_TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12])),
        dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4),
        dict(sizes=((224, 224), (224, 224)), text_lens=((60, 90), (40, 70))),
    ),
    # hf_tiny's default: hidden 64, 3 layers; 32x32 images -> 64 VQ tokens each.
    "chameleon-tiny": ("chameleon", dict(), dict(), dict(text_lens=((5, 7), (3, 2)))),
    # 128x128 images through three downsamples -> 16x16 = 256 VQ tokens each; rows 406 and 366 tokens.
    "chameleon-mid": (
        "chameleon",
        MID_TEXT,
        dict(embed_dim=64, num_embeddings=1024, latent_channels=64, resolution=128, base_channels=64,
             channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[]),
        dict(text_lens=((60, 90), (40, 70)), size=128, tokens_per_image=256, image_id=4095),
    ),
}

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def build_hf(family: str, folder, text: dict, vision: dict, torch_dtype) -> torch.nn.Module:
    """A random transformers model saved (fp32) to `folder`, returned in eval mode in torch_dtype."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    if family == "chameleon":
        return hf_tiny.build_chameleon(folder, vq=vision, **text).to(torch_dtype)
    config = hf_tiny.qwen2vl_config(**text)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    return model.to(torch_dtype)  # the saved weights stay fp32; Flax casts them on load


@nnx.jit
def flax_forward(model, ids, mask, image_inputs):
    return model(ids, mask, **image_inputs).logits


def make_batch(family: str, batch_args: dict):
    """(ids, mask, image inputs as a dict of numpy arrays)."""
    if family == "chameleon":
        ids, mask, pv = hf_tiny.chameleon_image_batch(seed=0, **batch_args)
        return ids, mask, {"pixel_values": pv}
    ids, mask, pv, grid = hf_tiny.qwen2vl_image_batch(seed=0, left_pad=False, **batch_args)
    return ids, mask, {"pixel_values": pv, "image_grid_thw": grid}


def hf_logits(family: str, hf, ids, mask, image_inputs):
    if family == "chameleon":
        return hf_tiny.chameleon_forward(hf, ids, mask, image_inputs["pixel_values"]).logits
    return hf_tiny.hf_forward(hf, ids, mask, image_inputs["pixel_values"], image_inputs["image_grid_thw"]).logits


def bench(name: str, repeats: int, dtype: str) -> str:
    family, text, vision, batch_args = CONFIGS[name]
    jax_dtype, torch_dtype = DTYPES[dtype]
    ids, mask, images = make_batch(family, batch_args)
    with tempfile.TemporaryDirectory() as folder:
        hf = build_hf(family, folder, text, vision, torch_dtype)
        flax_model = from_pretrained(folder, dtype=jax_dtype)
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    j_images = {k: jnp.asarray(v) for k, v in images.items()}
    hf_images = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in images.items()}
    if torch_dtype == torch.bfloat16:
        hf_images["pixel_values"] = torch.tensor(hf_images["pixel_values"]).to(torch_dtype).float().numpy()
    calls = {
        "flax": lambda: flax_forward(flax_model, j_ids, j_mask, j_images).block_until_ready(),
        "transformers": lambda: hf_logits(family, hf, ids, mask, hf_images),  # under torch.no_grad()
    }
    compile_s, flax_logits = timed(calls["flax"])  # trace + compile + one run
    _, hf_logits_out = timed(calls["transformers"])  # warm-up
    ms = interleaved_median_ms(calls, repeats)

    valid = mask.astype(bool)
    theirs = hf_logits_out.float().numpy()
    scored = valid[..., None] & (theirs > -1e30)  # Chameleon suppresses image-code logits to dtype min
    diff = np.abs(np.asarray(flax_logits, np.float32) - theirs)[scored].max()
    return (f"{name}: flax {ms['flax']:.1f} ms, transformers {ms['transformers']:.1f} ms, "
            f"speed-up {ms['transformers'] / ms['flax']:.1f}x (compile {compile_s:.1f} s, max|dlogits| {diff:.1e})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count()
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes skew the timings "
              "(PyTorch's thread pool suffers most)")
    print(f"jax devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; dtype: {args.dtype}; "
          f"repeats: {args.repeats}")
    for name in names:
        print(bench(name, args.repeats, args.dtype), flush=True)


if __name__ == "__main__":
    main()
