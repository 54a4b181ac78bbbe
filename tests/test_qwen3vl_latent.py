"""The IVT-LR latent loop on Qwen3-VL against the PyTorch oracle (tests/oracle_ivtlr.py, on transformers'
Qwen3VLForConditionalGeneration with its own DeepStack path): selected patches, assembled sequence, loss
and gradients, with the inserted patch copies getting their DeepStack features (`latent.patch_deepstack`,
the default) and without (docs/method.md section 20)."""

import numpy as np
import pytest

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.latent import LatentConfig
from tests import hf_tiny
from tests.test_latent import QWEN_LATENT, compare, qwen_batch


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(folder, transformers model with eager attention, our model) of the tiny Qwen3-VL."""
    from transformers import Qwen3VLForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_qwen3vl_latent")
    hf_tiny.build_qwen3vl(folder)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return folder, hf, from_pretrained(folder)


def batch(latents):
    """Images of 4x4 and 8x10 patches (2x2 and 4x5 image tokens)."""
    return qwen_batch(latents, sizes=hf_tiny.QWEN3VL_IMAGE_SIZES, processed=hf_tiny.qwen3vl_image_inputs)


@pytest.mark.parametrize(
    "latents,k,order,rope,patch_deepstack",
    [
        ((2, 2), 2, "score", "1d", True),
        ((2, 2), 2, "score", "1d", False),
        ((2, 1), 2, "position", "mrope", True),  # and rows with different latent counts
    ],
)
def test_qwen3vl_matches_oracle(qwen3, latents, k, order, rope, patch_deepstack):
    folder, hf, model = qwen3
    cfg = LatentConfig(QWEN_LATENT, k, patch_order=order, rope=rope, patch_deepstack=patch_deepstack)
    aux = compare(folder, hf, "qwen3vl", model, batch(latents), cfg)
    d = model.config.text.hidden_size
    p = int(np.argmax(np.asarray(batch(latents)["input_ids"]) == QWEN_LATENT, axis=1).max())
    copies = np.asarray(aux.embeds)[:, p:p + k, d:]  # row 0's first patch copies: their DeepStack columns
    assert aux.embeds.shape[-1] == 3 * d
    assert (np.abs(copies[0]).max() > 0) == patch_deepstack


def test_the_deepstack_option_changes_the_loss(qwen3):
    """With and without the copies' DeepStack features the same batch gives different losses (the option
    reaches the model), each equal to the oracle's above."""
    from tests.test_latent import run_jax

    model = qwen3[2]
    losses = [float(run_jax(model, batch((2, 2)), LatentConfig(QWEN_LATENT, 2, patch_deepstack=on))[0])
              for on in (True, False)]
    print(f"\nloss with the copies' DeepStack features {losses[0]:.6f}, without {losses[1]:.6f}, "
          f"difference {losses[0] - losses[1]:+.3g}")
    assert abs(losses[0] - losses[1]) > 1e-4 * abs(losses[0]), losses
    assert all(np.isfinite(losses))
