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
    mlp = plain_mlp_specs("visual.blocks.{i}.mlp.fc", v.embed_dim, v.mlp_dim)
    return (decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings)
            | vision_tower_specs(v, config.text.hidden_size, mlp, norm_bias=True))


def plain_mlp_specs(fc: str, E: int, F: int) -> dict[str, WeightSpec]:
    """A vision block's MLP rows [E] -> [F] -> [E] with biases; `fc`: its layers' names before `1` / `2`
    (Qwen2-VL's `...mlp.fc`, Qwen3-VL's `...mlp.linear_fc`)."""
    return {
        "fc1_weight_ef": WeightSpec(fc + "1.weight", (F, E), True),
        "fc1_bias_f": WeightSpec(fc + "1.bias", (F,)),
        "fc2_weight_fe": WeightSpec(fc + "2.weight", (E, F), True),
        "fc2_bias_e": WeightSpec(fc + "2.bias", (E,)),
    }


def block_specs(blk: str, E: int, mlp: dict[str, WeightSpec], *, norm_bias: bool) -> dict[str, WeightSpec]:
    """A vision block's rows (`blk`: its prefix, with `{i}`): the two norms (with biases: `norm_bias`), the
    fused qkv and the output projection [E] (biases), and the `mlp` rows."""
    block = {
        "norm1_scale_e": WeightSpec(blk + "norm1.weight", (E,)),
        "qkv_weight_e3nh": WeightSpec(blk + "attn.qkv.weight", (3 * E, E), True),
        "qkv_bias_3nh": WeightSpec(blk + "attn.qkv.bias", (3 * E,)),
        "proj_weight_nhe": WeightSpec(blk + "attn.proj.weight", (E, E), True),
        "proj_bias_e": WeightSpec(blk + "attn.proj.bias", (E,)),
        "norm2_scale_e": WeightSpec(blk + "norm2.weight", (E,)),
        **mlp,
    }
    if norm_bias:
        block |= {"norm1_bias_e": WeightSpec(blk + "norm1.bias", (E,)),
                  "norm2_bias_e": WeightSpec(blk + "norm2.bias", (E,))}
    return block


def vision_tower_specs(v, out_dim: int, mlp: dict[str, WeightSpec], *, norm_bias: bool
                       ) -> dict[tuple[str, ...], WeightSpec]:
    """The vision tower's rows (patch embedding, blocks, patch merger) of both Qwen towers. `v`: the
    vision config; `out_dim`: the merger's output width (the LM's); `mlp`: the blocks' MLP rows by
    parameter name; `norm_bias`: LayerNorms with a bias (Qwen2-VL) or RMSNorms without (Qwen2.5-VL)."""
    E, M = v.embed_dim, v.embed_dim * v.spatial_merge_size**2
    block = block_specs("visual.blocks.{i}.", E, mlp, norm_bias=norm_bias)
    tower = {
        "patch_weight_pe": WeightSpec("visual.patch_embed.proj.weight",
                                      (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), True),
        "merger_norm_scale_e": WeightSpec("visual.merger.ln_q.weight", (E,)),
        "merger_fc1_weight_mm": WeightSpec("visual.merger.mlp.0.weight", (M, M), True),
        "merger_fc1_bias_m": WeightSpec("visual.merger.mlp.0.bias", (M,)),
        "merger_fc2_weight_md": WeightSpec("visual.merger.mlp.2.weight", (out_dim, M), True),
        "merger_fc2_bias_d": WeightSpec("visual.merger.mlp.2.bias", (out_dim,)),
    }
    if norm_bias:
        tower["merger_norm_bias_e"] = WeightSpec("visual.merger.ln_q.bias", (E,))
    return ({("visual", name): spec for name, spec in tower.items()}
            | {("visual", "blocks", name): spec for name, spec in block.items()})
