"""Import a checkpoint of the official IVT-LR training scripts (.pth) as a Flax folder, LoRA merged:
the same command as `ivtlr-convert-official` (ivtlr_jax/cli/official.py); `--help` lists the options.

    python convert/ivtlr_pth_to_flax.py --pth epoch_16_full_model_fp32.pth \\
        --base Qwen/Qwen2-VL-7B-Instruct --out checkpoints/ivtlr-qwen2vl-m3cot --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivtlr_jax.cli.official import main as _main  # noqa: E402


def main(argv=None) -> None:
    _main(argv, prog="ivtlr_pth_to_flax.py")


if __name__ == "__main__":
    main()
