"""Adding IVT-LR's three tokens to the model's vocabulary (docs/method.md section 3)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def resize_vocab(model: nnx.Module, new_size: int, new_ids: list[int], copy_from_id: int) -> nnx.Module:
    """Resize the embedding and LM-head matrices to `new_size` rows (shrinking or growing, as the
    official `resize_token_embeddings(len(tokenizer))`), then set the LM-head rows of `new_ids` to the
    row of `copy_from_id` (the token `<<`). Embedding rows keep what they had (the official code's copy
    into the embeddings is a no-op); grown rows start from the mean embedding, as transformers does."""
    old = model.embed_vd[...]
    if new_size != old.shape[0]:
        model.embed_vd = nnx.Param(_resized(old, new_size, axis=0), **model.embed_vd.get_metadata())
        if model.lm_head_dv is not None:
            head = model.lm_head_dv[...]
            model.lm_head_dv = nnx.Param(_resized(head, new_size, axis=1), **model.lm_head_dv.get_metadata())
        model.config = dataclasses.replace(model.config, vocab_size=new_size)
    if model.lm_head_dv is not None:
        head = model.lm_head_dv[...]
        model.lm_head_dv[...] = head.at[:, jnp.asarray(new_ids)].set(head[:, copy_from_id][:, None])
    return model


def _resized(x: jnp.ndarray, size: int, axis: int) -> jnp.ndarray:
    old = x.shape[axis]
    if size <= old:
        return jnp.take(x, jnp.arange(size), axis=axis)
    mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
    extra = jnp.repeat(mean, size - old, axis=axis)
    return jnp.concatenate([x, extra], axis=axis)
