"""LoRA adapters written as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
`PeftModel.from_pretrained` loads onto the Hugging Face base model `save_hf` writes. Adapter tensor names
follow the module names of a transformers layout: v5 (transformers >= 4.52: Qwen2-VL's language model is
`model.language_model.layers.*`) or v4 (before: `model.layers.*`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from flax import nnx

from ..models import FAMILIES
from ..models.common.lora import PROJECTIONS
from .atomic import write_atomic
from .hf_export import ExportError
from .safetensors import NAMES, save_file


def default_peft_layout() -> str:
    import transformers
    from packaging.version import Version

    return "v5" if Version(transformers.__version__) >= Version("4.52.0") else "v4"


def peft_module_name(hub_name: str, model_type: str, layout: str) -> str:
    """A hub weight name (`model.layers.3.self_attn.q_proj.weight`) -> the module name PEFT uses in the
    model of that transformers layout (`model.language_model.layers.3.self_attn.q_proj`)."""
    module = hub_name[: -len(".weight")]
    prefix = FAMILIES[model_type].peft_v5_prefix
    if layout == "v5" and prefix is not None:
        old, new = prefix
        if module.startswith(old):
            module = new + module[len(old):]
    return module


def adapter_tensors(model: nnx.Module, lora, layout: str) -> dict[str, np.ndarray]:
    """Our adapters ([L, in..., r] and [L, r, out...]) as PEFT's lora_A [r, in] / lora_B [out, r] per layer."""
    config = model.config
    specs = FAMILIES[config.model_type].weight_specs(config)
    out = {}
    for name in lora.targets:
        attr, _ = PROJECTIONS[name]
        spec = specs[("layers", attr)]
        a = np.asarray(getattr(lora, f"{name}_a")[...])
        b = np.asarray(getattr(lora, f"{name}_b")[...])
        rank = a.shape[-1]
        for i in range(a.shape[0]):
            module = peft_module_name(spec.hf_name.format(i=i), config.model_type, layout)
            out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return dict(sorted(out.items()))


def peft_target_modules(config, targets, layout: str) -> str:
    """PEFT's `target_modules` for our adapters: a regex (PEFT full-matches it against module names) of the
    decoder layers' projections only. The bare names (`gate_proj`, ...) would also match modules of a vision
    tower that has them (Qwen2.5-VL's `visual.blocks.N.mlp.gate_proj`), which PEFT would then adapt too."""
    specs = FAMILIES[config.model_type].weight_specs(config)
    layer = re.escape("{i}")
    modules = []
    for name in targets:
        attr, _ = PROJECTIONS[name]
        module = peft_module_name(specs[("layers", attr)].hf_name.format(i="{i}"), config.model_type, layout)
        modules.append(re.escape(module).replace(layer, r"\d+"))
    return "|".join(modules)


def write_adapter(model: nnx.Module, lora, folder: Path, base_path: Path, dropout: float, layout: str) -> None:
    folder.mkdir(parents=True)
    tensors = adapter_tensors(model, lora, layout)
    if any(np.dtype(t.dtype) not in NAMES for t in tensors.values()):
        raise ExportError("adapter tensors of an unsupported dtype")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    alpha = float(lora.scale * lora.rank)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_path.resolve()),
        "revision": None,
        "inference_mode": True,
        "r": int(lora.rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(dropout),
        "target_modules": peft_target_modules(model.config, lora.targets, layout),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    write_atomic(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
