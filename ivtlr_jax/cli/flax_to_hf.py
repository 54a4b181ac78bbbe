"""Write a model of this project as a Hugging Face folder that transformers loads
(Qwen2VLForConditionalGeneration / ChameleonForConditionalGeneration): safetensors + config.json +
tokenizer and processor files (`ivtlr-convert-flax-to-hf`, or `python convert/flax_to_hf.py`).

    ivtlr-convert-flax-to-hf --checkpoint runs/qwen2vl-m3cot --out hf/qwen2vl-m3cot
    ivtlr-convert-flax-to-hf --checkpoint runs/qwen2vl-m3cot --out hf/qwen2vl-m3cot-peft --peft

--checkpoint is either
- a model folder that `from_pretrained` loads: a stage export (`<run>/stage_N`), a folder written by
  ivtlr-convert-hf-to-flax or ivtlr-convert-official, or any Hugging Face folder; or
- a training run folder (`save_path/name`, holding config.yaml and checkpoints/): the base model named
  by `model.model_id` in config.yaml is loaded, the latent tokens are added as the trainer adds them,
  LoRA is attached as configured and the latest checkpoint's trained parameters (or --step's) are
  restored into it.

By default LoRA is merged into the weights. With --peft (a run folder trained with LoRA) the output
holds `base/` (the base model with the latent tokens added: a Hugging Face folder) and `adapter/`
(a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors), loadable with
`PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained("OUT/base"), "OUT/adapter")`.
Adapter tensor names follow the module names of the installed transformers (--peft-layout auto):
Qwen2-VL's language model is `model.language_model.layers.*` from transformers 4.52 on and
`model.layers.*` before (the official IVT-LR environment, transformers 4.51.3: --peft-layout v4).
The adapter's target_modules is a regex of the decoder layers' projections (bare names like `gate_proj` would
also adapt Qwen2.5-VL's vision MLPs).

The output folder must not exist or be empty; it is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

from ..io.hf_export import ExportError
from ..models.common.choices import names
from ..models.common.layers import DType
from ..models.common.loading import WeightLoadError
from . import add_output_folder, converter_parser, run_converter


USAGE = "%(prog)s --checkpoint DIR --out DIR [--peft] [options]"


def main(argv=None, prog: str = "ivtlr-convert-flax-to-hf") -> None:
    p = converter_parser(prog, USAGE, __doc__)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a model folder or a training run folder")
    add_output_folder(p)
    p.add_argument("--peft", action="store_true", help="write base/ + a PEFT adapter/ instead of merging LoRA")
    p.add_argument("--dtype", default="auto", choices=["auto", *names(DType)],
                   help="storage dtype of the written weights (auto: as loaded / as trained)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="run folder: the checkpoint step (default: the latest)")
    p.add_argument("--peft-layout", default="auto", choices=["auto", "v4", "v5"],
                   help="adapter module names for transformers < 4.52 (v4) or >= 4.52 (v5); auto: installed")
    args = p.parse_args(argv)
    from ..export import export  # after parsing: --help loads no orbax

    run_converter(p, prog, lambda: export(args.checkpoint, args.out, peft=args.peft, dtype=args.dtype, step=args.step,
                                          peft_layout=args.peft_layout),
                  (FileExistsError, FileNotFoundError, ExportError, WeightLoadError))
