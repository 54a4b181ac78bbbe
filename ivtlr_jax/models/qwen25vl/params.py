"""Hugging Face <-> Flax parameter names and layouts for Qwen2.5-VL.

Accepts the hub layout of Qwen2.5-VL-*-Instruct (transformers 4.5x: `model.layers.*`, `visual.*`,
`lm_head.*`) and transformers 5's layout (`model.language_model.*`, `model.visual.*`), renamed to the
hub layout first by Qwen2-VL's rules (the prefixes are the same).
"""

from __future__ import annotations

from ..common.lm_params import decoder_lm_specs
from ..common.loading import WeightSpec
from ..qwen2vl.params import PEFT_V5_PREFIX, hf_renamer, vision_tower_specs  # noqa: F401 (Qwen2-VL's names)
from .config import Qwen25VLConfig

# our module paths whose parameters have a leading layer axis
STACKED = (("layers",), ("visual", "blocks"))


def weight_specs(config: Qwen25VLConfig) -> dict[tuple[str, ...], WeightSpec]:
    v = config.vision
    E, F = v.embed_dim, v.mlp_dim
    blk = "visual.blocks.{i}."
    mlp = {  # gated SiLU MLP with biases
        "gate_weight_ef": WeightSpec(blk + "mlp.gate_proj.weight", (F, E), True),
        "gate_bias_f": WeightSpec(blk + "mlp.gate_proj.bias", (F,)),
        "up_weight_ef": WeightSpec(blk + "mlp.up_proj.weight", (F, E), True),
        "up_bias_f": WeightSpec(blk + "mlp.up_proj.bias", (F,)),
        "down_weight_fe": WeightSpec(blk + "mlp.down_proj.weight", (E, F), True),
        "down_bias_e": WeightSpec(blk + "mlp.down_proj.bias", (E,)),
    }
    # the merger's output width is the LM's (checked by the config); RMSNorms, so no norm biases
    return (decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings)
            | vision_tower_specs(v, v.out_hidden_size, mlp, norm_bias=False))
