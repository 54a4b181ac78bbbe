"""Convert a Hugging Face model folder (or hub id) into a Flax folder that `from_pretrained` loads
faster: orbax parameters in our layout + the config, tokenizer and processor files.

    python convert/hf_to_flax.py --hf Qwen/Qwen2-VL-7B-Instruct --out checkpoints/qwen2vl-7b --dtype bfloat16

The output folder must not exist or be empty; it is written under a temporary name and renamed
when complete, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivtlr_jax.models.convert import DTYPES, convert  # noqa: E402



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
