"""Hugging Face <-> Flax parameter names and layouts for Qwen3-VL.

The hub checkpoints of Qwen3-VL-*-Instruct and transformers 5's `save_pretrained` share one layout:
`model.language_model.*` (the decoder), `model.visual.*` (the tower, its merger and
`deepstack_merger_list`), `lm_head.*` (absent or ignored when tied)."""

from __future__ import annotations

from ..common.lm_params import decoder_lm_specs
from ..common.loading import WeightSpec, rename_by_rules
from ..qwen2vl.params import block_specs, plain_mlp_specs
from .config import Qwen3VLConfig

# our module paths whose parameters have a leading layer axis
STACKED = (("layers",), ("visual", "blocks"), ("visual", "deepstack"))

VISUAL = "model.visual."


def hf_renamer(config: Qwen3VLConfig):
    rules = [(r"\.rotary_emb\.inv_freq$", None)]  # non-persistent buffers some checkpoints carry
    if config.tie_word_embeddings:
        rules.append((r"^lm_head\.weight$", None))
    return rename_by_rules(rules)


def merger_specs(prefix: str, M: int, D: int, norm_dim: int, norm: tuple[str, str]) -> dict[str, WeightSpec]:
    """A patch merger's rows (`Qwen3VLVisionPatchMerger` at `prefix`): its LayerNorm over norm_dim (our
    scale and bias names `norm`), then [M] -> [M] -> [D]."""
    return {
        norm[0]: WeightSpec(prefix + "norm.weight", (norm_dim,)),
        norm[1]: WeightSpec(prefix + "norm.bias", (norm_dim,)),
        "merger_fc1_weight_mm": WeightSpec(prefix + "linear_fc1.weight", (M, M), True),
        "merger_fc1_bias_m": WeightSpec(prefix + "linear_fc1.bias", (M,)),
        "merger_fc2_weight_md": WeightSpec(prefix + "linear_fc2.weight", (D, M), True),
        "merger_fc2_bias_d": WeightSpec(prefix + "linear_fc2.bias", (D,)),
    }


def vision_specs(config: Qwen3VLConfig) -> dict[tuple[str, ...], WeightSpec]:
    v = config.vision
    E, F, D, M = v.embed_dim, v.mlp_dim, v.out_hidden_size, v.embed_dim * v.spatial_merge_size**2
    blk = VISUAL + "blocks.{i}."
    block = block_specs(blk, E, plain_mlp_specs(blk + "mlp.linear_fc", E, F), norm_bias=True)
    merger = merger_specs(VISUAL + "merger.", M, D, E, ("merger_norm_scale_e", "merger_norm_bias_e"))
    deepstack = merger_specs(VISUAL + "deepstack_merger_list.{i}.", M, D, M, ("norm_scale_m", "norm_bias_m"))
    tower = {
        "patch_weight_pe": WeightSpec(VISUAL + "patch_embed.proj.weight",
                                      (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), True),
        "patch_bias_e": WeightSpec(VISUAL + "patch_embed.proj.bias", (E,)),
        "position_table_ge": WeightSpec(VISUAL + "pos_embed.weight", (v.num_position_embeddings, E)),
        **merger,
    }
    return ({("visual", name): spec for name, spec in tower.items()}
            | {("visual", "blocks", name): spec for name, spec in block.items()}
            | {("visual", "deepstack", name): spec for name, spec in deepstack.items()})


def weight_specs(config: Qwen3VLConfig) -> dict[tuple[str, ...], WeightSpec]:
    return (decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings,
                             prefix="model.language_model.")
            | vision_specs(config))
