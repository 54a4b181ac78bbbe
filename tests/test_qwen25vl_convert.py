"""The converters on Qwen2.5-VL (model_type qwen2_5_vl): convert/hf_to_flax.py and convert/flax_to_hf.py round
trip a tiny random Qwen2_5_VLForConditionalGeneration bit for bit, and a LoRA model of ours exported as a PEFT
adapter is the merged export for PEFT (tensor names, logits, merge_and_unload weights).

Kept small (a 2-layer LM, no training run, no jit of our model): the suite's time budget."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ivtlr_jax.export import Loaded, without_lora, write_hf
from ivtlr_jax.io.peft import default_peft_layout, write_adapter
from ivtlr_jax.io import FLAX_MARKER, from_pretrained
from ivtlr_jax.models.common.lora import OFFICIAL_TARGETS, LoRAConfig, add_lora, merge_lora
from tests import hf_tiny
from tests.convert_helpers import convert_script, tensors_of

CORPUS = ["a << b << c", "<< hello world >>", "Therefore, the answer is B"] * 20
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.05)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja")


hf_to_flax = convert_script("hf_to_flax")
flax_to_hf = convert_script("flax_to_hf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, token ids): a tiny random Qwen2_5_VLForConditionalGeneration saved with save_pretrained next
    to a tiny Qwen2_5_VLProcessor (a BPE of ~300 ids); every norm weight and bias random, so that a tensor
    written under another's name shows."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from ivtlr_jax.data import build_tiny_qwen2vl_processor, special_tokens
    from ivtlr_jax.data.tokenizer import build_processor, save_processor

    folder = tmp_path_factory.mktemp("qwen25vl_base")
    qwen2 = build_tiny_qwen2vl_processor(folder, CORPUS, vocab_size=280)
    processor = build_processor(Qwen2_5_VLProcessor, image_processor=qwen2.image_processor, tokenizer=qwen2.tokenizer,
                                video_processor=None, chat_template=qwen2.chat_template)
    save_processor(processor, folder)
    ids = dataclasses.asdict(special_tokens(processor))
    ids["text_vocab"] = min(v for k, v in ids.items() if k.endswith("_id") and v is not None)  # learnt BPE ids
    cfg = hf_tiny.qwen25vl_config(vocab_size=ids["vocab_size"])
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(cfg, key, ids[key])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, ids


def image_batch(ids, seed=0):
    """Two right-padded rows `text, <vision_start>, <image_pad> x n, <vision_end>, text` with images of
    different sizes (several windows of the vision tower, partial ones at the edges)."""
    rng = np.random.default_rng(seed)
    pv, grid = hf_tiny.image_inputs(hf_tiny.QWEN25VL_IMAGE_SIZES, seed)
    text = lambda k: list(rng.integers(3, ids["text_vocab"], k))
    rows = [text(a) + [ids["vision_start_token_id"]] + [ids["image_token_id"]] * n + [ids["vision_end_token_id"]]
            + text(b) for n, (a, b) in zip((grid.prod(-1) // 4).tolist(), [(5, 7), (3, 2)])]
    return hf_tiny.pad_rows(rows) + (pv, grid)


def hf_logits(hf, batch, image_token_id):
    ids, mask, pv, grid = batch
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                  image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == image_token_id).astype(np.int64))).logits.numpy()


def test_qwen25vl_model_folders_round_trip_bit_identical_through_the_cli(base, tmp_path):
    """HF -> Flax (orbax) -> HF with the converters' command lines (in process): every tensor identical."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder, _ = base
    flax, back = tmp_path / "flax", tmp_path / "back"
    hf_to_flax.main(["--hf", str(folder), "--out", str(flax)])
    assert (flax / FLAX_MARKER).is_file() and not list(flax.glob("*.safetensors"))  # really the orbax folder
    flax_to_hf.main(["--checkpoint", str(flax), "--out", str(back)])
    original, returned = tensors_of(folder), tensors_of(back)
    assert len(original) > 50 and sorted(returned) == sorted(original)
    for name, w in original.items():
        assert returned[name].dtype == w.dtype, name
        np.testing.assert_array_equal(returned[name], w, err_msg=name)
    for f in PROCESSOR_FILES:
        assert (back / f).read_bytes() == (folder / f).read_bytes(), f
    # the written config.json describes the model: transformers reads every tensor, no more, no less
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert type(hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.fixture(scope="module")
def exports(base, tmp_path_factory):
    """(merged folder, peft folder, our LoRA matrices): our model from the base folder with LoRA adapters
    (B random, so that they matter), written as flax_to_hf.export writes a LoRA model: merged, and as
    base/ + a PEFT adapter/ (module names of the installed transformers)."""
    folder, _ = base
    out = tmp_path_factory.mktemp("qwen25vl_exports")
    model = from_pretrained(folder)
    with jax.default_prng_impl("rbg"):  # A's draws: RngBitGenerator compiles in ~1/5 of threefry's CPU time
        add_lora(model, LORA, seed=3)
    rng = np.random.default_rng(0)
    for name in LORA.target_modules:
        var = getattr(model.layers.lora, f"{name}_b")
        var[...] = jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32)
    lora_ab = {name: (np.asarray(getattr(model.layers.lora, f"{name}_a")[...]),
                      np.asarray(getattr(model.layers.lora, f"{name}_b")[...])) for name in LORA.target_modules}
    loaded = Loaded(model, None, folder, "model")

    peft = out / "peft"
    dropout = model.layers.lora.dropout
    model, lora = without_lora(model)
    write_hf(model, peft / "base", loaded, "auto")
    write_adapter(model, lora, peft / "adapter", peft / "base", dropout, default_peft_layout())

    model.layers.lora = lora  # back on, then merged as `export` merges
    merged = out / "merged"
    write_hf(merge_lora(model), merged, loaded, "auto")
    return merged, peft, lora_ab


def test_qwen25vl_peft_export_loads_with_peft_and_equals_the_merged_export(base, exports):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder, ids = base
    merged_dir, out, lora_ab = exports
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "base" / "tokenizer.json").is_file()
    # base/ is the original model
    original, written = tensors_of(folder), tensors_of(out / "base")
    assert sorted(written) == sorted(original)
    for name, w in original.items():
        np.testing.assert_array_equal(written[name], w, err_msg=name)

    # the adapter's tensor names are exactly those of a PEFT model built on the base with this config
    load = lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    fresh = get_peft_model(load(out / "base"), LoraConfig.from_pretrained(out / "adapter"))
    expected = {k.replace(".default.", ".") for k in fresh.state_dict() if ".lora_" in k}
    num_layers = hf_tiny.qwen25vl_config().text_config.num_hidden_layers
    adapter = tensors_of(out / "adapter")
    assert set(adapter) == expected and len(expected) == 2 * len(OFFICIAL_TARGETS) * num_layers
    # the vision tower's mlp.{gate,up,down}_proj (Qwen2.5-VL has them, Qwen2-VL not) are not adapted
    assert not [k for k in fresh.state_dict() if ".lora_" in k and "visual" in k]
    a, b = lora_ab["q_proj"]  # our [L, D, N, H, r] / [L, r, N, H] as PEFT's lora_A [r, in] / lora_B [out, r]
    [q_layer1] = [k[: -len(".lora_A.weight")] for k in adapter if k.endswith("layers.1.self_attn.q_proj.lora_A.weight")]
    np.testing.assert_array_equal(adapter[f"{q_layer1}.lora_A.weight"], a[1].reshape(-1, LORA.rank).T)
    np.testing.assert_array_equal(adapter[f"{q_layer1}.lora_B.weight"], b[1].reshape(LORA.rank, -1).T)

    batch = image_batch(ids, seed=1)
    mask = batch[1].astype(bool)
    base_hf = load(out / "base")
    without = hf_logits(base_hf, batch, ids["image_token_id"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base_hf, out / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    merged = load(merged_dir)
    got = hf_logits(peft_model, batch, ids["image_token_id"])
    ref = hf_logits(merged, batch, ids["image_token_id"])
    diff = float(np.abs(got - ref)[mask].max())
    print(f"PEFT vs merged export logits: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    assert np.abs(got - without)[mask].max() > 1e-2  # the adapters matter

    # PEFT's own merge gives the merged export's weights
    peft_weights = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged_weights = {k: v.numpy() for k, v in merged.state_dict().items()}
    assert sorted(peft_weights) == sorted(merged_weights)
    worst = 0.0
    for name, w in merged_weights.items():
        np.testing.assert_allclose(peft_weights[name], w, atol=1e-6, rtol=0, err_msg=name)
        worst = max(worst, float(np.abs(peft_weights[name] - w).max()))
    print(f"PEFT merge_and_unload vs merged export weights: max abs diff {worst:.3g}")
    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert np.abs(merged_weights[q] - original["model.layers.1.self_attn.q_proj.weight"]).max() > 1e-3
