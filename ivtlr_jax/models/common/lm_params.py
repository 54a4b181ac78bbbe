"""Hugging Face names and layouts of the decoder-LM part every family shares."""

from __future__ import annotations

from .decoder import DecoderConfig
from .loading import WeightSpec


def decoder_lm_specs(text: DecoderConfig, vocab_size: int, tie_word_embeddings: bool,
                     prefix: str = "model.") -> dict[tuple[str, ...], WeightSpec]:
    D, F, N, K, H, V = (text.hidden_size, text.intermediate_size, text.num_heads, text.num_kv_heads, text.head_dim,
                        vocab_size)
    lyr = prefix + "layers.{i}."
    specs = {
        ("embed_vd",): WeightSpec(prefix + "embed_tokens.weight", (V, D)),
        ("final_norm_d",): WeightSpec(prefix + "norm.weight", (D,)),
        ("layers", "attn_norm_d"): WeightSpec(lyr + "input_layernorm.weight", (D,)),
        ("layers", "q_weight_dnh"): WeightSpec(lyr + "self_attn.q_proj.weight", (N * H, D), True),
        ("layers", "k_weight_dkh"): WeightSpec(lyr + "self_attn.k_proj.weight", (K * H, D), True),
        ("layers", "v_weight_dkh"): WeightSpec(lyr + "self_attn.v_proj.weight", (K * H, D), True),
        ("layers", "o_weight_nhd"): WeightSpec(lyr + "self_attn.o_proj.weight", (D, N * H), True),
        ("layers", "mlp_norm_d"): WeightSpec(lyr + "post_attention_layernorm.weight", (D,)),
        ("layers", "gate_weight_df"): WeightSpec(lyr + "mlp.gate_proj.weight", (F, D), True),
        ("layers", "up_weight_df"): WeightSpec(lyr + "mlp.up_proj.weight", (F, D), True),
        ("layers", "down_weight_fd"): WeightSpec(lyr + "mlp.down_proj.weight", (D, F), True),
    }
    if text.qkv_bias:
        specs[("layers", "q_bias_nh")] = WeightSpec(lyr + "self_attn.q_proj.bias", (N * H,))
        specs[("layers", "k_bias_kh")] = WeightSpec(lyr + "self_attn.k_proj.bias", (K * H,))
        specs[("layers", "v_bias_kh")] = WeightSpec(lyr + "self_attn.v_proj.bias", (K * H,))
    if text.qk_layernorm:
        specs[("layers", "q_norm_scale_nh")] = WeightSpec(lyr + "self_attn.q_norm.weight", (N, H))
        specs[("layers", "q_norm_bias_nh")] = WeightSpec(lyr + "self_attn.q_norm.bias", (N, H))
        specs[("layers", "k_norm_scale_kh")] = WeightSpec(lyr + "self_attn.k_norm.weight", (K, H))
        specs[("layers", "k_norm_bias_kh")] = WeightSpec(lyr + "self_attn.k_norm.bias", (K, H))
    if text.qk_rmsnorm:
        specs[("layers", "q_norm_h")] = WeightSpec(lyr + "self_attn.q_norm.weight", (H,))
        specs[("layers", "k_norm_h")] = WeightSpec(lyr + "self_attn.k_norm.weight", (H,))
    if not tie_word_embeddings:
        specs[("lm_head_dv",)] = WeightSpec("lm_head.weight", (V, D), True)
    return specs
