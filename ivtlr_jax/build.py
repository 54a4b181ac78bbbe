"""One model builder: from a run configuration to the model that training, export and the planner use
— loaded from its folder (or shapes only, for the planner), the latent tokens added to its vocabulary
(docs/method.md section 3), and LoRA attached when the run trains adapters. The trainable / frozen split is
`models.common.lora.trainable_filter(cfg.lora)`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from .config import RunConfig
from .data import SpecialTokens, load_processor, special_tokens
from .io import from_pretrained, resolve_folder
from .models import Family, read_config
from .models.common.layers import DTYPES
from .models.common.lora import add_lora
from .models.common.sharding import ShardingRules
from .models.common.vocab import LATENT_TOKENS, resize_vocab


@dataclasses.dataclass
class BuiltModel:
    model: nnx.Module
    processor: Any
    folder: Path  # the base model's folder
    family: Family
    special: SpecialTokens  # of the processor, latent tokens included


def model_dtypes(cfg: RunConfig) -> tuple[Any, Any]:
    """(compute dtype, parameter storage dtype). Trained weights are kept in fp32: with LoRA the frozen
    base is stored in `model.param_dtype` (the adapters are fp32), with full fine-tuning every weight."""
    return DTYPES[cfg.model.dtype], (DTYPES[cfg.model.param_dtype] if cfg.lora.enabled else jnp.float32)


def build_model(cfg: RunConfig, *, rules: ShardingRules | None = None, dtype=None, remat: str | None = None,
                log=None) -> BuiltModel:
    """The run's model, loaded (and sharded by `rules` as it is read), the latent tokens added, LoRA
    attached (seeded by `cfg.seed`) when `cfg.lora.enabled`. `dtype`/`remat` override the config's
    (the exporter computes in fp32 and needs no remat)."""
    folder = resolve_folder(cfg.model.model_id)
    family, _, _ = read_config(folder)
    processor = load_processor(folder)
    compute, storage = model_dtypes(cfg)
    model = from_pretrained(folder, dtype=compute if dtype is None else dtype, param_dtype=storage,
                            remat=cfg.model.remat if remat is None else remat, rules=rules,
                            scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl)
    special = add_latent_tokens(model, processor)
    if cfg.lora.enabled:
        add_lora(model, cfg.lora, seed=cfg.seed)
    return BuiltModel(model, processor, folder, family, special)


def abstract_run_model(cfg: RunConfig, family: Family, config, *, rules: ShardingRules | None = None,
                   unroll_scans: bool = False) -> nnx.Module:
    """The run's model with shape-only parameters from a family's config object (the planner: nothing is
    read or allocated; the vocabulary is the config's)."""
    compute, storage = model_dtypes(cfg)

    def build():
        model = family.model_cls(config, dtype=compute, param_dtype=storage, remat=cfg.model.remat, rules=rules,
                                 unroll_scans=unroll_scans, attention_impl=cfg.model.attention_impl,
                                 rngs=nnx.Rngs(0))
        return add_lora(model, cfg.lora) if cfg.lora.enabled else model

    return nnx.eval_shape(build)


def add_latent_tokens(model, processor) -> SpecialTokens:
    """docs/method.md section 3: add the three tokens to the tokenizer (if missing), resize the embedding and LM
    head to len(tokenizer), and set the new tokens' LM-head rows to the row of `<<`."""
    tok = getattr(processor, "tokenizer", processor)
    added = tok.add_tokens(list(LATENT_TOKENS))
    special = special_tokens(processor)
    new_ids = [special.start_latent_id, special.end_latent_id, special.latent_id]
    copy_from = tok.convert_tokens_to_ids("<<")
    if special.vocab_size != model.config.vocab_size or added:
        if copy_from is None or copy_from == tok.unk_token_id:
            raise ValueError("the tokenizer has no '<<' token to initialise the latent tokens' LM-head rows from")
        resize_vocab(model, special.vocab_size, new_ids, copy_from)
    return special
