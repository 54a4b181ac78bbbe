"""Convert a Hugging Face model folder (or hub id) into a Flax folder that `from_pretrained` loads
faster: orbax parameters in our layout + the config, tokenizer and processor files.

    ivtlr-convert-hf-to-flax --hf Qwen/Qwen2-VL-7B-Instruct --out checkpoints/qwen2vl-7b --dtype bfloat16

The output folder must not exist or be empty; it is written under a temporary name and renamed
when complete, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

from . import add_output_folder, converter_parser, run_converter

USAGE = "%(prog)s --hf MODEL --out DIR [--dtype DTYPE]"


def main(argv=None, prog: str = "ivtlr-convert-hf-to-flax") -> None:
    from ..io.hf_to_flax import convert
    from ..models.common.choices import names
    from ..models.common.layers import DType

    p = converter_parser(prog, USAGE, __doc__)
    p.add_argument("--hf", required=True, metavar="MODEL", help="Hugging Face model folder or hub id")
    add_output_folder(p)
    p.add_argument("--dtype", default="float32", choices=names(DType),
                   help="storage dtype of the parameters (default: %(default)s)")
    args = p.parse_args(argv)
    run_converter(p, prog, lambda: convert(args.hf, args.out, args.dtype),
                  (FileExistsError, FileNotFoundError, ValueError))
