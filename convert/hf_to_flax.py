"""Convert a Hugging Face model folder (or hub id) into a Flax folder that `from_pretrained` loads
faster: orbax parameters in our layout + the config, tokenizer and processor files.

    python convert/hf_to_flax.py --hf Qwen/Qwen2-VL-7B-Instruct --out checkpoints/qwen2vl-7b --dtype bfloat16

The output folder must not exist or be empty; it is written under a temporary name and renamed
when complete, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivtlr_jax.models import FLAX_MARKER, FLAX_PARAMS_DIR, from_pretrained, read_config, resolve_folder  # noqa: E402
from ivtlr_jax.models.checkpoint_io import save_params  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt")


def convert(hf: str, out: str | Path, dtype: str = "float32") -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new folder or empty it")
    src = resolve_folder(hf)
    family, _, _ = read_config(src)
    model = from_pretrained(src, dtype=DTYPES[dtype])
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_params(nnx.state(model), tmp / FLAX_PARAMS_DIR)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    (tmp / FLAX_MARKER).write_text(json.dumps(
        {"format": "orbax", "source": str(hf), "param_dtype": dtype, "converted": time.strftime("%Y-%m-%dT%H:%M:%S")},
        indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder or hub id")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype of the parameters")
    args = p.parse_args(argv)
    out = convert(args.hf, args.out, args.dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
