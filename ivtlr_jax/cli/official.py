"""Import a checkpoint saved by the official IVT-LR training scripts (the `torch.save`d state dict of
their wrapper model, e.g. `epoch_16_full_model_fp32.pth`) as a Flax folder that `from_pretrained`
loads, with the LoRA adapters merged and the processor's latent tokens added.

    ivtlr-convert-official --pth epoch_16_full_model_fp32.pth \\
        --base Qwen/Qwen2-VL-7B-Instruct --out checkpoints/ivtlr-qwen2vl-m3cot --dtype bfloat16

--base is the Hugging Face base model (folder or hub id) the run started from: its config and
processor are used (the vocabulary size comes from the .pth). The .pth is read with
`torch.load(weights_only=True)` only (memory-mapped), so a file that would need arbitrary code to
unpickle is refused. Keys may be in the hub layout of transformers 4.51 (`model.layers.*`,
`visual.*`) or transformers 5's (`model.language_model.*`, `model.visual.*`), with or without
DeepSpeed's `module.` prefix. LoRA scaling is alpha / r: r is read from the lora_A shapes
(--lora-rank only checks it), alpha is 16 as in the official LoraConfig unless --lora-alpha says
otherwise.

Reading the .pth needs PyTorch (the CPU build is enough; checked first, with a one-line error). The
output also holds ivtlr_settings.json: ivtlr-ask and ivtlr-serve ask the model with --dataset's official
evaluation prompt, 3 latents and the official K (32 for Qwen2-VL).

The output folder must not exist or be empty; it is written under a temporary name and renamed when
complete. Export it to Hugging Face format with ivtlr-convert-flax-to-hf if needed.
"""

from __future__ import annotations

from . import add_output_folder, converter_parser, run_converter

USAGE = "%(prog)s --pth FILE --base MODEL --out DIR [--dtype DTYPE] [options]"


def main(argv=None, prog: str = "ivtlr-convert-official") -> None:
    from ..io.official import DTYPE_NAMES, OfficialCheckpointError, import_official
    from ..models.common.loading import WeightLoadError

    p = converter_parser(prog, USAGE, __doc__)
    p.add_argument("--pth", required=True, metavar="FILE", help="the official checkpoint (.pth state dict)")
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="Hugging Face base model folder or hub id (config + processor)")
    add_output_folder(p)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="storage dtype of the parameters (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA alpha (default 16, the official value)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="LoRA rank; read from the lora_A shapes, this only checks it (official: 64)")
    p.add_argument("--dataset", default="m3cot", choices=("m3cot", "scienceqa"),
                   help="the dataset it was trained on: ivtlr-ask and ivtlr-serve then ask it with that dataset's "
                        "official evaluation prompt (default: %(default)s; scienceqa for IVTLR_QWEN_SQA)")
    args = p.parse_args(argv)
    run_converter(p, prog, lambda: import_official(args.pth, args.base, args.out, dtype=args.dtype,
                                                   lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
                                                   dataset=args.dataset),
                  (FileExistsError, FileNotFoundError, OfficialCheckpointError, WeightLoadError))
