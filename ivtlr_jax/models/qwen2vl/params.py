"""Hugging Face <-> Flax parameter names and layouts for Qwen2-VL.

Accepts the hub layout of Qwen2-VL-*-Instruct (`model.layers.*`, `visual.*`, `lm_head.*`) and
transformers 5's in-memory layout (`model.language_model.*`, `model.visual.*`), which is renamed to
the hub layout first.
"""

from __future__ import annotations

from ..common.lm_params import decoder_lm_specs
from ..common.loading import WeightSpec, rename_by_rules
from .config import Qwen2VLConfig

# our module paths whose parameters have a leading layer axis
STACKED = (("layers",), ("visual", "blocks"))
# decoder layer modules in transformers 5's layout (PEFT adapter names of an export for that layout)
PEFT_V5_PREFIX = ("model.layers.", "model.language_model.layers.")


def hf_renamer(config: Qwen2VLConfig):
    rules = [
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
        (r"\.rotary_emb\.inv_freq$", None),  # non-persistent buffers some old checkpoints carry
    ]
    if config.tie_word_embeddings:
        rules.append((r"^lm_head\.weight$", None))
    return rename_by_rules(rules)


def weight_specs(config: Qwen2VLConfig) -> dict[tuple[str, ...], WeightSpec]:
    v = config.vision
    D = config.text.hidden_size
    E, Fv, M = v.embed_dim, v.mlp_dim, v.embed_dim * v.spatial_merge_size**2
    blk = "visual.blocks.{i}."
    specs = decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings)
    specs |= {
        ("visual", "patch_weight_pe"): WeightSpec(
            "visual.patch_embed.proj.weight",
            (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
            True,
        ),
        ("visual", "blocks", "norm1_scale_e"): WeightSpec(blk + "norm1.weight", (E,)),
        ("visual", "blocks", "norm1_bias_e"): WeightSpec(blk + "norm1.bias", (E,)),
        ("visual", "blocks", "qkv_weight_e3nh"): WeightSpec(blk + "attn.qkv.weight", (3 * E, E), True),
        ("visual", "blocks", "qkv_bias_3nh"): WeightSpec(blk + "attn.qkv.bias", (3 * E,)),
        ("visual", "blocks", "proj_weight_nhe"): WeightSpec(blk + "attn.proj.weight", (E, E), True),
        ("visual", "blocks", "proj_bias_e"): WeightSpec(blk + "attn.proj.bias", (E,)),
        ("visual", "blocks", "norm2_scale_e"): WeightSpec(blk + "norm2.weight", (E,)),
        ("visual", "blocks", "norm2_bias_e"): WeightSpec(blk + "norm2.bias", (E,)),
        ("visual", "blocks", "fc1_weight_ef"): WeightSpec(blk + "mlp.fc1.weight", (Fv, E), True),
        ("visual", "blocks", "fc1_bias_f"): WeightSpec(blk + "mlp.fc1.bias", (Fv,)),
        ("visual", "blocks", "fc2_weight_fe"): WeightSpec(blk + "mlp.fc2.weight", (E, Fv), True),
        ("visual", "blocks", "fc2_bias_e"): WeightSpec(blk + "mlp.fc2.bias", (E,)),
        ("visual", "merger_norm_scale_e"): WeightSpec("visual.merger.ln_q.weight", (E,)),
        ("visual", "merger_norm_bias_e"): WeightSpec("visual.merger.ln_q.bias", (E,)),
        ("visual", "merger_fc1_weight_mm"): WeightSpec("visual.merger.mlp.0.weight", (M, M), True),
        ("visual", "merger_fc1_bias_m"): WeightSpec("visual.merger.mlp.0.bias", (M,)),
        ("visual", "merger_fc2_weight_md"): WeightSpec("visual.merger.mlp.2.weight", (D, M), True),
        ("visual", "merger_fc2_bias_d"): WeightSpec("visual.merger.mlp.2.bias", (D,)),
    }
    return specs
