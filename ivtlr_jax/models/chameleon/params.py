"""Hugging Face <-> Flax parameter names and layouts for Chameleon (facebook/chameleon-7b layout;
transformers 5 keeps the same names in memory)."""

from __future__ import annotations

from ..common.lm_params import decoder_lm_specs
from ..common.loading import WeightSpec, rename_by_rules
from .config import ChameleonConfig

STACKED = (("layers",),)
OIHW_TO_HWIO = (2, 3, 1, 0)


def hf_renamer(config: ChameleonConfig):
    rules = [
        (r"^model\.vqmodel\.(post_quant_conv|decoder)\.", None),  # the image decoder side is not used
        (r"\.rotary_emb\.inv_freq$", None),
    ]
    if config.tie_word_embeddings:
        rules.append((r"^lm_head\.weight$", None))
    return rename_by_rules(rules)


def _conv(ours: tuple[str, ...], hf: str, cin: int, cout: int, size: int) -> dict:
    return {
        (*ours, "kernel_hwio"): WeightSpec(hf + ".weight", (cout, cin, size, size), permute=OIHW_TO_HWIO),
        (*ours, "bias_o"): WeightSpec(hf + ".bias", (cout,)),
    }


def _norm(ours, hf, c) -> dict:
    return {(*ours, "scale_c"): WeightSpec(hf + ".weight", (c,)), (*ours, "bias_c"): WeightSpec(hf + ".bias", (c,))}


def _resnet(ours, hf, cin, cout) -> dict:
    specs = _norm((*ours, "norm1"), hf + ".norm1", cin) | _conv((*ours, "conv1"), hf + ".conv1", cin, cout, 3)
    specs |= _norm((*ours, "norm2"), hf + ".norm2", cout) | _conv((*ours, "conv2"), hf + ".conv2", cout, cout, 3)
    if cin != cout:
        specs |= _conv((*ours, "nin_shortcut"), hf + ".nin_shortcut", cin, cout, 1)
    return specs


def _attn(ours, hf, c) -> dict:
    specs = _norm((*ours, "norm"), hf + ".norm", c)
    for name in ("q", "k", "v", "proj_out"):
        specs |= _conv((*ours, name), f"{hf}.{name}", c, c, 1)
    return specs


def vq_specs(config: ChameleonConfig) -> dict[tuple[str, ...], WeightSpec]:
    vq = config.vq
    root, hf = ("vqmodel",), "model.vqmodel.encoder"
    ch = vq.base_channels
    specs = _conv((*root, "conv_in"), hf + ".conv_in", vq.in_channels, ch, 3)
    res, cin = vq.resolution, ch
    for lvl, m in enumerate(vq.channel_multiplier):
        cout = ch * m
        for b in range(vq.num_res_blocks):
            specs |= _resnet((*root, "down", str(lvl), "block", str(b)), f"{hf}.down.{lvl}.block.{b}",
                             cin if b == 0 else cout, cout)
            if res in vq.attn_resolutions:
                specs |= _attn((*root, "down", str(lvl), "attn", str(b)), f"{hf}.down.{lvl}.attn.{b}", cout)
        if lvl != len(vq.channel_multiplier) - 1:
            specs |= _conv((*root, "down", str(lvl), "downsample"), f"{hf}.down.{lvl}.downsample.conv", cout, cout, 3)
            res //= 2
        cin = cout
    specs |= _resnet((*root, "mid_block_1"), hf + ".mid.block_1", cin, cin)
    specs |= _attn((*root, "mid_attn_1"), hf + ".mid.attn_1", cin)
    specs |= _resnet((*root, "mid_block_2"), hf + ".mid.block_2", cin, cin)
    specs |= _norm((*root, "norm_out"), hf + ".norm_out", cin)
    latent = 2 * vq.latent_channels if vq.double_latent else vq.latent_channels
    specs |= _conv((*root, "conv_out"), hf + ".conv_out", cin, latent, 3)
    specs |= _conv((*root, "quant_conv"), "model.vqmodel.quant_conv", vq.latent_channels, vq.embed_dim, 1)
    specs[(*root, "codebook_ke")] = WeightSpec("model.vqmodel.quantize.embedding.weight",
                                               (vq.num_embeddings, vq.embed_dim))
    return specs


def weight_specs(config: ChameleonConfig) -> dict[tuple[str, ...], WeightSpec]:
    return decoder_lm_specs(config.text, config.vocab_size, config.tie_word_embeddings) | vq_specs(config)
