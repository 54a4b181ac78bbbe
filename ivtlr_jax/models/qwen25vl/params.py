"""Hugging Face <-> Flax parameter names and layouts for Qwen2.5-VL.

Accepts the hub layout of Qwen2.5-VL-*-Instruct (transformers 4.5x: `model.layers.*`, `visual.*`,
`lm_head.*`) and transformers 5's layout (`model.language_model.*`, `model.visual.*`), renamed to the
hub layout first by Qwen2-VL's rules (the prefixes are the same).
"""

from __future__ import annotations

from ..common.lm_params import decoder_lm_specs
from ..common.loading import WeightSpec
from ..qwen2vl.params import PEFT_V5_PREFIX, hf_renamer  # noqa: F401 (the same names as Qwen2-VL's)
from .config import Qwen25VLConfig

# our module paths whose parameters have a leading layer axis
STACKED = (("layers",), ("visual", "blocks"))


def weight_specs(config: Qwen25VLConfig) -> dict[tuple[str, ...], WeightSpec]:
    v = config.vision
    D = v.out_hidden_size  # = the LM width (checked by the config)
    E, F, M = v.embed_dim, v.mlp_dim, v.embed_dim * v.spatial_merge_size**2
    blk = "visual.blocks.{i}."
    specs = decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings)
    specs |= {
        ("visual", "patch_weight_pe"): WeightSpec(
            "visual.patch_embed.proj.weight",
            (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
            True,
        ),
        ("visual", "blocks", "norm1_scale_e"): WeightSpec(blk + "norm1.weight", (E,)),
        ("visual", "blocks", "qkv_weight_e3nh"): WeightSpec(blk + "attn.qkv.weight", (3 * E, E), True),
        ("visual", "blocks", "qkv_bias_3nh"): WeightSpec(blk + "attn.qkv.bias", (3 * E,)),
        ("visual", "blocks", "proj_weight_nhe"): WeightSpec(blk + "attn.proj.weight", (E, E), True),
        ("visual", "blocks", "proj_bias_e"): WeightSpec(blk + "attn.proj.bias", (E,)),
        ("visual", "blocks", "norm2_scale_e"): WeightSpec(blk + "norm2.weight", (E,)),
        ("visual", "blocks", "gate_weight_ef"): WeightSpec(blk + "mlp.gate_proj.weight", (F, E), True),
        ("visual", "blocks", "gate_bias_f"): WeightSpec(blk + "mlp.gate_proj.bias", (F,)),
        ("visual", "blocks", "up_weight_ef"): WeightSpec(blk + "mlp.up_proj.weight", (F, E), True),
        ("visual", "blocks", "up_bias_f"): WeightSpec(blk + "mlp.up_proj.bias", (F,)),
        ("visual", "blocks", "down_weight_fe"): WeightSpec(blk + "mlp.down_proj.weight", (E, F), True),
        ("visual", "blocks", "down_bias_e"): WeightSpec(blk + "mlp.down_proj.bias", (E,)),
        ("visual", "merger_norm_scale_e"): WeightSpec("visual.merger.ln_q.weight", (E,)),
        ("visual", "merger_fc1_weight_mm"): WeightSpec("visual.merger.mlp.0.weight", (M, M), True),
        ("visual", "merger_fc1_bias_m"): WeightSpec("visual.merger.mlp.0.bias", (M,)),
        ("visual", "merger_fc2_weight_md"): WeightSpec("visual.merger.mlp.2.weight", (D, M), True),
        ("visual", "merger_fc2_bias_d"): WeightSpec("visual.merger.mlp.2.bias", (D,)),
    }
    return specs
