"""Qwen3-VL architecture settings, read from a Hugging Face `config.json` (the hub layout of
Qwen3-VL-*-Instruct: nested `text_config` and `vision_config`, as transformers writes it).

The text side is Qwen2-VL's reading of the fields (`Qwen2VLConfig.from_hf`) with Qwen3's decoder: an
explicit `head_dim`, q/k RMSNorm, no q/k/v biases (`attention_bias`) and interleaved M-RoPE. The vision
tower (`Qwen3VLVisionConfig`): patches of 16 pixels, a learned `num_position_embeddings` table
(a square grid) interpolated to each image, and DeepStack mergers after `deepstack_visual_indexes`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..qwen2vl.config import Qwen2VLConfig, SizedMLPVision, geometry_fields, text_and_rope


def _released_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
                     vision_depth: int, vision_hidden: int, vision_intermediate: int, deepstack: list[int]
                     ) -> dict[str, Any]:
    """A released Qwen3-VL-*-Instruct config.json (architecture fields only)."""
    return {
        "model_type": "qwen3_vl", "tie_word_embeddings": tied, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 128,
                        "rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": 151936, "attention_bias": False,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True},
                        "rope_theta": 5000000, "tie_word_embeddings": tied, "bos_token_id": 151643,
                        "eos_token_id": 151645},
        "vision_config": {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_intermediate,
                          "num_heads": 16, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden,
                          "num_position_embeddings": 2304, "deepstack_visual_indexes": deepstack},
    }


# the hub config.json of the released dense models: the planner's input without a download
HUB_CONFIGS = {
    "Qwen/Qwen3-VL-2B-Instruct": _released_config(2048, 6144, 28, 16, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "Qwen/Qwen3-VL-4B-Instruct": _released_config(2560, 9728, 36, 32, 8, True, 24, 1024, 4096, [5, 11, 17]),
    "Qwen/Qwen3-VL-8B-Instruct": _released_config(4096, 12288, 36, 32, 8, False, 27, 1152, 4304, [8, 16, 24]),
    "Qwen/Qwen3-VL-32B-Instruct": _released_config(5120, 25600, 64, 64, 8, False, 27, 1152, 4304, [8, 16, 24]),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3VisionConfig(SizedMLPVision):
    hidden_act: str = "gelu_pytorch_tanh"
    num_position_embeddings: int = 2304  # a square table of learned position embeddings (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(Qwen2VLConfig):
    """Qwen2-VL's reading of the text fields with Qwen3's decoder (q/k RMSNorm, no q/k/v biases, an explicit
    head_dim, interleaved M-RoPE) and Qwen3-VL's tower (a learned position table, DeepStack mergers)."""
    vision: Qwen3VisionConfig

    model_type = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen3VLConfig":
        text, rope = text_and_rope(d)
        rope = {"rope_theta": text.get("rope_theta", 5000000.0), "mrope_section": [24, 20, 20], **rope,
                "rope_type": rope.get("rope_type", rope.get("type", "default"))}
        if rope["rope_type"] not in ("default", "mrope"):
            raise ValueError(f"config.json: rope type {rope['rope_type']!r} is not supported (only default)")
        # the text side as Qwen2-VL reads it, with the rope defaults above; the tower: vision_from_hf
        base = super().from_hf({**d, "text_config": {**text, "rope_parameters": rope}, "rope_scaling": None,
                                "rope_parameters": None})
        if text.get("head_dim") is None:
            raise ValueError("config.json: text_config has no head_dim (Qwen3-VL sets it explicitly)")
        decoder = dataclasses.replace(base.text, qkv_bias=bool(text.get("attention_bias", False)), qk_rmsnorm=True)
        check_vision(base.vision, decoder.hidden_size, decoder.num_layers)
        return dataclasses.replace(base, text=decoder)

    @classmethod
    def vision_from_hf(cls, v: dict[str, Any], lm_hidden: int) -> Qwen3VisionConfig:
        return Qwen3VisionConfig(
            depth=v["depth"], embed_dim=v["hidden_size"], num_heads=v["num_heads"],
            intermediate_size=v["intermediate_size"], out_hidden_size=v.get("out_hidden_size", lm_hidden),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", (8, 16, 24))),
            **geometry_fields({"patch_size": 16, **v}))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict in the hub layout of Qwen3-VL-*-Instruct (nested text and vision configs)."""
        t, v = self.text, self.vision
        flat = self.text_hf()  # the text fields as Qwen2-VL writes them
        top = ("tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id")
        text = {k: val for k, val in flat.items() if k not in (*top, "rope_theta", "rope_scaling")}
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **{k: flat[k] for k in top},
            "text_config": {**text, "model_type": "qwen3_vl_text", "head_dim": t.head_dim,
                            "attention_bias": t.qkv_bias, "tie_word_embeddings": self.tie_word_embeddings,
                            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                                "mrope_section": list(self.mrope_section),
                                                "mrope_interleaved": True}},
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                **v.sized_mlp_hf(),
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                **{k: val for k, val in v.hf_geometry().items() if k != "in_chans"},
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


def check_vision(vision: Qwen3VisionConfig, lm_hidden: int, lm_layers: int) -> None:
    """Raise for a vision config this port cannot run: a position table that is not a square grid, an
    output width other than the LM's, DeepStack indexes outside the tower or more than the LM's layers."""
    side = vision.position_grid_side
    if side * side != vision.num_position_embeddings:
        raise ValueError(f"config.json: vision num_position_embeddings {vision.num_position_embeddings} is not a "
                         f"square grid")
    if vision.out_hidden_size != lm_hidden:
        raise ValueError(f"config.json: vision out_hidden_size {vision.out_hidden_size} != the language model's "
                         f"hidden_size {lm_hidden}")
    ds = vision.deepstack_visual_indexes
    if any(not 0 <= i < vision.depth for i in ds) or len(set(ds)) != len(ds):
        raise ValueError(f"config.json: deepstack_visual_indexes {list(ds)} must be distinct vision blocks "
                         f"0..{vision.depth - 1}")
    if len(ds) > lm_layers:
        raise ValueError(f"config.json: {len(ds)} deepstack_visual_indexes but only {lm_layers} decoder layers")
