"""Qwen2.5-VL architecture settings, read from a Hugging Face `config.json` (hub layout of
Qwen2.5-VL-*-Instruct with flat text fields, or transformers 5's nested `text_config`).

The language model is Qwen2-VL's (parsed by `Qwen2VLConfig.from_hf`); only the vision tower's
settings differ (`Qwen2_5_VLVisionConfig`: `hidden_size` is the tower's width, `out_hidden_size` the
LM's, an explicit `intermediate_size`, window attention)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..qwen2vl.config import Qwen2VLConfig, SizedMLPVision, geometry_fields


def _released_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                     tied: bool) -> dict[str, Any]:
    """A released Qwen2.5-VL-*-Instruct config.json (architecture fields only): the sizes differ, the
    vision tower (all but its output width) and the special tokens are the same."""
    return {
        "model_type": "qwen2_5_vl", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": vocab, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": tied,
        "use_sliding_window": False, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": hidden, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    }


# the hub config.json of the released models: the planner's input without a download
HUB_CONFIGS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": _released_config(3584, 18944, 28, 28, 4, 152064, tied=False),
    "Qwen/Qwen2.5-VL-3B-Instruct": _released_config(2048, 11008, 36, 16, 2, 151936, tied=True),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen25VisionConfig(SizedMLPVision):
    hidden_act: str = "silu"
    window_size: int = 112  # window side in pixels (112 = 8x8 patches = 4x4 merged tokens)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (transformers' `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Most patches one window holds."""
        return (self.window_merged * self.spatial_merge_size) ** 2


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(Qwen2VLConfig):
    """Qwen2-VL's text side with Qwen2.5-VL's tower (window attention, an explicit MLP width)."""
    vision: Qwen25VisionConfig

    model_type = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"

    @classmethod
    def vision_from_hf(cls, v: dict[str, Any], lm_hidden: int) -> Qwen25VisionConfig:
        head_dim = v.get("head_dim")
        if head_dim is not None and head_dim != v["hidden_size"] // v["num_heads"]:
            raise ValueError(f"config.json: vision head_dim {head_dim} != hidden_size / num_heads is not supported")
        vision = Qwen25VisionConfig(
            depth=v["depth"], embed_dim=v["hidden_size"], num_heads=v["num_heads"],
            intermediate_size=v["intermediate_size"], out_hidden_size=v.get("out_hidden_size", lm_hidden),
            hidden_act=v.get("hidden_act", "silu"), window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            **geometry_fields(v))
        if vision.window_merged < 1:
            raise ValueError(f"config.json: window_size {vision.window_size} is smaller than one merged token "
                             f"({vision.patch_size * vision.spatial_merge_size} pixels)")
        if vision.out_hidden_size != lm_hidden:
            raise ValueError(f"config.json: vision out_hidden_size {vision.out_hidden_size} != the language model's "
                             f"hidden_size {lm_hidden}")
        return vision

    def vision_hf(self) -> dict[str, Any]:
        """The `vision_config` of the hub layout of Qwen2.5-VL-*-Instruct (the text fields are Qwen2-VL's)."""
        v = self.vision
        return {**v.sized_mlp_hf(), **v.hf_geometry(), "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes)}
