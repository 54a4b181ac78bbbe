"""Weight I/O: model folders in and out of Flax.

- `model_folder`: `from_pretrained` (a Hugging Face folder, hub id or converted Flax folder -> a Flax
  model), `resolve_folder`, the converted folder's marker files.
- `safetensors`: streaming safetensors reading and writing (no torch).
- `orbax_params`: Flax parameters as an orbax checkpoint (the converted folders, the trainer's checkpoints).
- `hf_export`: a Flax model -> a Hugging Face folder (`save_hf`; `write_hf_folder` with the tokenizer and
  processor files).
- `hf_to_flax`: a Hugging Face folder -> a converted Flax folder (`convert`).
- `peft`: LoRA adapters as a PEFT adapter folder.
- `official`: a checkpoint of the official IVT-LR scripts (.pth) -> a converted Flax folder.
- `atomic`: files and folders written under a temporary name and renamed when complete.
- `fingerprint`: a model folder's contents as one sha256 (sampled: fast at any size).
"""

from .hf_export import save_hf
from .model_folder import FLAX_MARKER, FLAX_PARAMS_DIR, from_pretrained, resolve_folder

__all__ = ["FLAX_MARKER", "FLAX_PARAMS_DIR", "from_pretrained", "resolve_folder", "save_hf"]
