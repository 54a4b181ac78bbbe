"""Convert a Hugging Face model folder (or hub id) into a Flax folder that loads faster: the same
command as `ivtlr-convert-hf-to-flax` (ivtlr_jax/cli/hf_to_flax.py); `--help` lists the options.

    python convert/hf_to_flax.py --hf Qwen/Qwen2-VL-7B-Instruct --out checkpoints/qwen2vl-7b --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivtlr_jax.cli.hf_to_flax import main as _main  # noqa: E402


def main(argv=None) -> None:
    _main(argv, prog="hf_to_flax.py")


if __name__ == "__main__":
    main()
