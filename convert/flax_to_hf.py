"""Write a model of this project (a model folder, or a training run folder at a checkpoint) as a Hugging
Face folder: the same command as `ivtlr-convert-flax-to-hf` (ivtlr_jax/cli/flax_to_hf.py, where the
options are described; the library side is ivtlr_jax/export.py); `python convert/flax_to_hf.py --help`
lists them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivtlr_jax.cli.flax_to_hf import main as _main  # noqa: E402
from ivtlr_jax.export import ExportError, export  # noqa: E402, F401


def main(argv=None) -> None:
    _main(argv, prog="flax_to_hf.py")


if __name__ == "__main__":
    main()
