"""The embedded default job, run by `make demo`: no download, a couple of minutes on 2 CPU cores.

1. build a tiny random Qwen2-VL in Flax and write it as a Hugging Face folder (config.json + safetensors);
2. convert that folder to a Flax/orbax folder with `convert/hf_to_flax.py`'s code;
3. load both with `from_pretrained`, check they give the same logits;
4. preprocess two synthetic images of different sizes with the real Qwen2-VL image processor and
   generate greedily (jitted, KV cache, batched, left-padded).

Later issues grow this into IVT-LR training + evaluation on a generated dataset.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import Qwen2VL, Qwen2VLConfig, from_pretrained
from .models.convert import convert
from .models.export import save_hf
from .sampling import greedy_generate

TINY_QWEN2VL = {
    "model_type": "qwen2_vl",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "image_token_id": 290,
    "video_token_id": 291,
    "vision_start_token_id": 292,
    "vision_end_token_id": 293,
    "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64},
}


def synthetic_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Two images of different sizes: coloured shapes on noise."""
    images = []
    for h, w in [(56, 84), (112, 56)]:
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y : y + h // 2, x : x + w // 2] = rng.integers(100, 255, 3, dtype=np.uint8)
        images.append(img)
    return images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"output folder {out} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    print(f"devices: {jax.devices()}")

    t0 = time.perf_counter()
    config = Qwen2VLConfig.from_hf(TINY_QWEN2VL)
    model = Qwen2VL(config, rngs=nnx.Rngs(0))
    hf_dir = save_hf(model, out / "hf")
    print(f"[1] tiny random Qwen2-VL written as a Hugging Face folder: {hf_dir} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    flax_dir = convert(str(hf_dir), out / "flax")
    print(f"[2] converted to a Flax/orbax folder: {flax_dir} ({time.perf_counter() - t0:.1f}s)")

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    proc = Qwen2VLImageProcessorPil()(images=synthetic_images(rng), return_tensors="np")
    pixel_values = jnp.asarray(proc["pixel_values"], jnp.float32)
    grid = np.asarray(proc["image_grid_thw"])
    rows = []
    for n_tokens, prompt_len in zip((grid.prod(-1) // 4).tolist(), (7, 3)):
        rows.append([292] + [290] * n_tokens + [293] + rng.integers(0, 280, prompt_len).tolist())
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding for generation
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1

    t0 = time.perf_counter()
    from_hf, from_flax = from_pretrained(hf_dir), from_pretrained(flax_dir)
    a = from_hf(jnp.asarray(ids), jnp.asarray(mask), pixel_values, jnp.asarray(grid)).logits
    b = from_flax(jnp.asarray(ids), jnp.asarray(mask), pixel_values, jnp.asarray(grid)).logits
    diff = float(jnp.abs(a - b)[mask.astype(bool)].max())
    print(f"[3] both folders load; max |logits difference| = {diff:.2e} ({time.perf_counter() - t0:.1f}s)")
    if diff > 1e-5:
        raise SystemExit("the converted model differs from the Hugging Face folder")

    t0 = time.perf_counter()
    tokens = greedy_generate(from_flax, ids, mask, pixel_values=pixel_values, image_grid_thw=grid,
                             max_new_tokens=args.max_new_tokens)
    tokens = np.asarray(tokens)
    print(f"[4] greedy generation, image grids {grid.tolist()}, batch {len(rows)} ({time.perf_counter() - t0:.1f}s "
          "including compilation):")
    for i, row in enumerate(tokens):
        print(f"    row {i}: {row.tolist()}")
    print("demo finished")


if __name__ == "__main__":
    main()
