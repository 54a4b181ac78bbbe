"""convert/flax_to_hf.py (training run or model folder -> Hugging Face folder, LoRA merged or as a PEFT
adapter) and convert/ivtlr_pth_to_flax.py (an official IVT-LR .pth -> Flax folder), on a tiny Qwen2-VL
with a real tokenizer whose checkpoint has spare vocabulary rows (like Qwen2-VL-7B's)."""

import dataclasses
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ivtlr_jax.config import InferenceSettings, LoRASection, ModelSection, RunConfig
from ivtlr_jax.data import build_tiny_qwen2vl_processor, load_processor, special_tokens
from ivtlr_jax.latent import LatentConfig, LatentShapes, ivtlr_loss, latent_layout
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import WeightLoadError
from ivtlr_jax.io.safetensors import SafetensorsFolder
from ivtlr_jax.io.hf_to_flax import convert
from ivtlr_jax.io.official import OfficialCheckpointError, import_official
from ivtlr_jax.io.settings_file import read_settings
from ivtlr_jax.train.checkpoint import TrainCheckpointer
from ivtlr_jax.models.common.lora import OFFICIAL_TARGETS, LoRAConfig, add_lora, trainable_filter
from ivtlr_jax.build import add_latent_tokens
from ivtlr_jax.train.loop import write_run_config
from ivtlr_jax.train.step import split_trainable
from tests import hf_tiny
from tests.convert_helpers import convert_script, tensors_of
from tests.oracle_ivtlr import latent_batch, oracle_ivtlr
from tests.test_latent import to_jax

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["a << b << c", "<< hello world >>", "[Question]:{} [Options]:\n(A).{}", "Therefore, the answer is B"] * 20
SPARE_ROWS = 4  # the checkpoint's vocabulary exceeds the tokenizer (as Qwen2-VL-7B's 152064 > 151660)
RUN_LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
PROJ_HF = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


flax_to_hf = convert_script("flax_to_hf")
pth_to_flax = convert_script("ivtlr_pth_to_flax")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, token ids): a transformers Qwen2-VL saved with save_pretrained next to a tiny processor."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = tmp_path_factory.mktemp("base")
    processor = build_tiny_qwen2vl_processor(folder, CORPUS, vocab_size=300)
    ids = dataclasses.asdict(special_tokens(processor))
    ids["copy_from"] = processor.tokenizer.convert_tokens_to_ids("<<")
    ids["text_vocab"] = min(v for k, v in ids.items() if k.endswith("_id") and v is not None)  # learnt BPE ids
    assert ids["copy_from"] < ids["text_vocab"] and ids["latent_id"] == ids["vocab_size"] - 1
    cfg = hf_tiny.qwen2vl_config(vocab_size=ids["vocab_size"] + SPARE_ROWS)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(cfg, key, ids[key])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder)
    return folder, ids


def image_batch(ids, seed=0):
    rng = np.random.default_rng(seed)
    pv, grid = hf_tiny.image_inputs([(56, 56), (84, 56)], seed)
    n_img = (grid.prod(-1) // 4).tolist()
    text = lambda k: list(rng.integers(3, ids["text_vocab"], k))
    rows = [text(a) + [ids["vision_start_token_id"]] + [ids["image_token_id"]] * n + [ids["vision_end_token_id"]]
            + text(b) + [ids["latent_id"]]
            for n, (a, b) in zip(n_img, [(5, 7), (3, 2)])]
    return hf_tiny.pad_rows(rows) + (pv, grid)


def our_logits(model, batch):
    return np.asarray(model(*(jnp.asarray(x) for x in batch)).logits)


def hf_logits(hf, batch, image_token_id):
    ids, mask, pv, grid = batch
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                  image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == image_token_id).astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """(run folder, the trained model with its LoRA branch): config.yaml written as the trainer writes it,
    and checkpoints/ with an older step (fresh adapters) and a later one (trained: random A and B)."""
    folder, _ = base
    cfg = RunConfig(name="tiny", save_path=str(tmp_path_factory.mktemp("runs")), seed=3,
                    model=ModelSection(model_id=str(folder), dtype="float32", param_dtype="float32", remat="none"),
                    lora=LoRASection(rank=RUN_LORA.rank, alpha=RUN_LORA.alpha, dropout=RUN_LORA.dropout))
    write_run_config(cfg)
    run_dir = cfg.run_dir
    model = from_pretrained(folder)
    add_latent_tokens(model, load_processor(folder))
    add_lora(model, RUN_LORA, seed=11)  # another seed than the run's: A must come from the checkpoint
    ckpt = TrainCheckpointer(run_dir / "checkpoints", async_save=False)
    opt_state = {"count": jnp.zeros((), jnp.int32)}
    ckpt.save(2, split_trainable(model, trainable_filter(RUN_LORA))[1], opt_state,
              {"epoch": 0, "batch_index": 2, "micro_step": 2}, force=True)
    rng = np.random.default_rng(0)
    for name in RUN_LORA.target_modules:
        var = getattr(model.layers.lora, f"{name}_b")
        var[...] = jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32)
    ckpt.save(5, split_trainable(model, trainable_filter(RUN_LORA))[1], opt_state,
              {"epoch": 1, "batch_index": 0, "micro_step": 5}, force=True)
    ckpt.close()
    return run_dir, model


@pytest.fixture(scope="module")
def merged_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "merged"
    flax_to_hf.main(["--checkpoint", str(run[0]), "--out", str(out)])
    return out


def test_run_folder_exports_a_merged_hf_folder(base, run, merged_export):
    from transformers import Qwen2VLForConditionalGeneration

    folder, ids = base
    _, model = run
    out = merged_export
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / f).is_file(), f
    processor = load_processor(out)
    assert special_tokens(processor).latent_id == ids["latent_id"]
    assert len(processor.tokenizer) == ids["vocab_size"]

    # transformers gives the logits of our model (LoRA branch unmerged)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    batch = image_batch(ids)
    mask = batch[1].astype(bool)
    assert np.abs(hf_logits(hf, batch, ids["image_token_id"]) - our_logits(model, batch))[mask].max() <= 1e-4

    # weights: untouched ones bit-identical, the vocabulary shrunk to len(tokenizer) with the latent
    # tokens' LM-head rows from `<<`, the LoRA targets = W + (A B * alpha / r)^T
    before, after = tensors_of(folder), tensors_of(out)
    assert sorted(before) == sorted(after)
    lora, v = model.layers.lora, ids["vocab_size"]
    new_ids = [ids["start_latent_id"], ids["end_latent_id"], ids["latent_id"]]
    targets = {}
    for name in RUN_LORA.target_modules:
        a, b = np.asarray(getattr(lora, f"{name}_a")[...]), np.asarray(getattr(lora, f"{name}_b")[...])
        for i in range(a.shape[0]):
            delta = a[i].reshape(-1, lora.rank) @ b[i].reshape(lora.rank, -1) * lora.scale
            targets[f"model.layers.{i}.{PROJ_HF[name]}.weight"] = delta.T
    for name, w in before.items():
        if name in targets:
            np.testing.assert_allclose(after[name], w + targets[name], atol=1e-6, err_msg=name)
            assert np.abs(after[name] - w).max() > 1e-3
        elif name == "model.embed_tokens.weight":
            np.testing.assert_array_equal(after[name], w[:v])
        elif name == "lm_head.weight":
            expected = w[:v].copy()
            expected[new_ids] = w[ids["copy_from"]]
            np.testing.assert_array_equal(after[name], expected)
        else:
            np.testing.assert_array_equal(after[name], w, err_msg=name)


def test_model_folders_round_trip_bit_identical_through_the_cli(base, tmp_path):
    """HF -> Flax (orbax) -> HF with the command line, and HF -> HF in process: every tensor identical."""
    folder, _ = base
    flax = convert(str(folder), tmp_path / "flax")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "convert" / "flax_to_hf.py"), "--checkpoint", str(flax),
                           "--out", str(tmp_path / "back")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flax_to_hf.main(["--checkpoint", str(folder), "--out", str(tmp_path / "direct")])
    original = tensors_of(folder)
    for out in (tmp_path / "back", tmp_path / "direct"):
        back = tensors_of(out)
        assert sorted(back) == sorted(original)
        for name in original:
            assert back[name].dtype == original[name].dtype
            np.testing.assert_array_equal(back[name], original[name], err_msg=name)
        assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    with pytest.raises(FileExistsError, match="back is not empty"):
        flax_to_hf.export(flax, tmp_path / "back")
    with pytest.raises(SystemExit):  # the command line says why and exits 2
        flax_to_hf.main(["--checkpoint", str(flax), "--out", str(tmp_path / "back")])
    with pytest.raises(flax_to_hf.ExportError, match="--peft needs LoRA adapters"):
        flax_to_hf.export(flax, tmp_path / "peft", peft=True)
    assert not (tmp_path / "peft").exists() and not (tmp_path / "peft.partial").exists()


def test_peft_export_loads_with_peft_and_equals_the_merged_export(base, run, merged_export, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    _, ids = base
    out = tmp_path / "peft"
    flax_to_hf.main(["--checkpoint", str(run[0]), "--out", str(out), "--peft"])
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "base" / "tokenizer.json").is_file()

    # the adapter's tensor names are exactly those of a PEFT model built on the base with this config
    fresh = get_peft_model(Qwen2VLForConditionalGeneration.from_pretrained(out / "base"),
                           LoraConfig.from_pretrained(out / "adapter"))
    expected = {k.replace(".default.", ".") for k in fresh.state_dict() if ".lora_" in k}
    assert set(SafetensorsFolder(out / "adapter").keys()) == expected and len(expected) == 2 * 7 * 3

    base_hf = Qwen2VLForConditionalGeneration.from_pretrained(out / "base").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base_hf, out / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    merged = Qwen2VLForConditionalGeneration.from_pretrained(merged_export).eval()
    batch = image_batch(ids, seed=1)
    mask = batch[1].astype(bool)
    got = hf_logits(peft_model, batch, ids["image_token_id"])
    ref = hf_logits(merged, batch, ids["image_token_id"])
    assert np.abs(got - ref)[mask].max() <= 1e-5
    # and PEFT's own merge gives the merged export's weights
    peft_weights = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged_weights = {k: v.numpy() for k, v in merged.state_dict().items()}
    assert sorted(peft_weights) == sorted(merged_weights)
    for name, w in merged_weights.items():
        np.testing.assert_allclose(peft_weights[name], w, atol=1e-6, err_msg=name)


# ---- official .pth -----------------------------------------------------------------------------------
class OfficialWrapper(torch.nn.Module):
    """The parameter layout of the official IVTLR module: the PEFT model in `base_causallm` and an alias
    of its input embeddings in `embedding`."""

    def __init__(self, base_causallm):
        super().__init__()
        self.base_causallm = base_causallm
        self.embedding = base_causallm.get_input_embeddings()


def to_hub_layout(key):
    """transformers 5 in-memory names -> the names transformers 4.51 used (the official environment)."""
    key = key.replace(".model.model.language_model.", ".model.model.")
    return key.replace(".model.model.visual.", ".model.visual.")


OFFICIAL_VARIANTS = {  # transformers 5 keys, alpha 16 (the default) | DeepSpeed prefix, 4.51 keys, legacy format
    "transformers5": dict(rank=64, alpha=16, module_prefix=False, hub=False, legacy=False),  # the official r, alpha
    "hub_module": dict(rank=4, alpha=8, module_prefix=True, hub=True, legacy=True),
}


@pytest.fixture(scope="module", params=sorted(OFFICIAL_VARIANTS))
def official(request, base, tmp_path_factory):
    """(.pth path, the PEFT model merged (eager attention, the oracle's model), variant options)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    folder, ids = base
    opts = OFFICIAL_VARIANTS[request.param]
    torch.manual_seed(1)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    model = get_peft_model(hf, LoraConfig(r=opts["rank"], lora_alpha=opts["alpha"], lora_dropout=0.05,
                                          target_modules=list(OFFICIAL_TARGETS), init_lora_weights=False))
    # as the official run script: resize after wrapping, new tokens' LM-head rows from `<<`
    model.resize_token_embeddings(ids["vocab_size"])
    head = model.get_output_embeddings().weight.data
    for t in (ids["start_latent_id"], ids["end_latent_id"], ids["latent_id"]):
        head[t] = head[ids["copy_from"]]
    state = OfficialWrapper(model).state_dict()
    assert ("base_causallm.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
            in state)
    if opts["hub"]:
        state = {to_hub_layout(k): v for k, v in state.items()}
        assert "base_causallm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in state
        assert "base_causallm.base_model.model.visual.blocks.0.attn.qkv.weight" in state
    if opts["module_prefix"]:
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path_factory.mktemp(f"official_{request.param}") / "epoch_4_full_model_fp32.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not opts["legacy"])
    return path, model.merge_and_unload().eval(), opts


def latent_qwen_batch(ids, latents, seed=0):
    rng = np.random.default_rng(seed)
    pv, grid = hf_tiny.image_inputs([(84, 84), (56, 112)], seed=seed)
    n_img = (grid.prod(-1) // 4).tolist()
    span = lambda k: [ids["vision_start_token_id"]] + [ids["image_token_id"]] * k + [ids["vision_end_token_id"]]
    text = lambda k: list(rng.integers(3, ids["text_vocab"], k))
    questions = [text(3) + span(n_img[0]) + text(5), text(1) + span(n_img[1]) + text(2)]
    batch = latent_batch(rng, questions, list(latents), [6, 4], ids["latent_id"], ids["eos_token_id"],
                         ids["text_vocab"])
    return batch | {"pixel_values": pv, "image_grid_thw": grid}


@functools.partial(nnx.jit, static_argnames=("cfg", "n", "prefix_len"))
def latent_loss(model, batch, cfg, n, prefix_len):
    return ivtlr_loss(model, batch, cfg, LatentShapes(n, prefix_len))


def test_official_pth_import_matches_the_oracle(base, official, tmp_path):
    folder, ids = base
    path, merged, opts = official
    out = tmp_path / "imported"
    args = ["--pth", str(path), "--base", str(folder), "--out", str(out)]
    if opts["alpha"] != 16:
        args += ["--lora-alpha", str(opts["alpha"]), "--lora-rank", str(opts["rank"])]
    pth_to_flax.main(args)
    model = from_pretrained(out)
    assert model.config.vocab_size == ids["vocab_size"]
    # asked as the official evaluation asks it (ivtlr-ask, ivtlr-serve, the Predictor)
    assert read_settings(out) == InferenceSettings(dataset="m3cot", prompt_format="official", num_selected_patches=32)
    processor = load_processor(out)
    assert len(processor.tokenizer) == ids["vocab_size"]
    assert special_tokens(processor).latent_id == ids["latent_id"]
    # our latent forward on the import = the PyTorch oracle's on PEFT's merge_and_unload(): rows with 3 and 1
    # latents, 3 x 3 patches > row 2's 8 image tokens (its last pass is filled with picked patches)
    cfg = LatentConfig(ids["latent_id"], 3)
    batch = latent_qwen_batch(ids, (3, 1))
    with torch.no_grad():
        loss_t, selected_t, _, _ = oracle_ivtlr(merged, "qwen2vl", batch, cfg.num_selected_patches)
    n, _ = latent_layout(batch["input_ids"], cfg.latent_token_id)
    loss, aux = latent_loss(model, to_jax(batch), cfg, n, batch["input_ids"].shape[1])
    np.testing.assert_array_equal(np.asarray(aux.selected), np.asarray(selected_t).reshape(n, 2, 3))
    assert abs(float(loss) - float(loss_t)) <= 1e-5 * abs(float(loss_t)), (float(loss), float(loss_t))
    # the importer's merge is PEFT's: the weights equal merge_and_unload()'s
    q = np.asarray(model.layers.q_weight_dnh[...])[1]  # [D, N, H]
    q = q.reshape(q.shape[0], -1).T
    np.testing.assert_array_equal(q, merged.model.language_model.layers[1].self_attn.q_proj.weight.detach().numpy())
    assert np.abs(q - tensors_of(folder)["model.layers.1.self_attn.q_proj.weight"]).max() > 1e-2  # the merge matters


def test_official_import_without_torch_is_one_line_before_any_download(tmp_path, monkeypatch, capsys):
    """On an install without PyTorch (e.g. `pip install -e '.[cuda]'`) the import says what to install, before
    the base model (a hub id: a 7B download) is resolved."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    resolved = []
    monkeypatch.setattr("ivtlr_jax.io.official.resolve_folder", lambda *a, **k: resolved.append(a))
    with pytest.raises(SystemExit) as exit_:
        pth_to_flax.main(["--pth", str(tmp_path / "model.pth"), "--base", "Qwen/Qwen2-VL-7B-Instruct",
                          "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and not resolved
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "needs PyTorch" in line and "pip install torch" in line


def test_official_pth_errors_name_the_file_and_the_keys(base, official, tmp_path):
    folder, _ = base
    path = official[0]
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialCheckpointError, match=r"truncated\.pth: cannot read.*truncated or corrupt"):
        import_official(bad, folder, tmp_path / "o1")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(OfficialCheckpointError, match=r"garbage\.pth: cannot read"):
        import_official(tmp_path / "garbage.pth", folder, tmp_path / "o1")

    state = torch.load(path, map_location="cpu", weights_only=True)
    dropped = [k for k in state if k.endswith(("layers.1.post_attention_layernorm.weight", "blocks.0.norm1.bias"))]
    assert len(dropped) == 2
    partial = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k not in dropped}, partial)
    with pytest.raises(WeightLoadError, match=r"missing\.pth: 2 missing tensor\(s\): "
                                              r"model\.layers\.1\.post_attention_layernorm\.weight, "
                                              r"visual\.blocks\.0\.norm1\.bias"):
        import_official(partial, folder, tmp_path / "o2")
    no_b = [k for k in state if k.endswith("layers.2.mlp.down_proj.lora_B.default.weight")]
    torch.save({k: v for k, v in state.items() if k not in no_b}, partial)
    with pytest.raises(OfficialCheckpointError, match=r"layers\.2\.mlp\.down_proj' has lora_A .* but no lora_B"):
        import_official(partial, folder, tmp_path / "o3")
    rank = official[2]["rank"]
    with pytest.raises(OfficialCheckpointError, match=f"--lora-rank 7 but the lora_A matrices have rank {rank}"):
        import_official(path, folder, tmp_path / "o4", lora_rank=7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(FileExistsError, match="full is not empty"):
        import_official(path, folder, tmp_path / "full")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing half-written


def test_peft_on_a_run_trained_without_lora_says_so(tmp_path, capsys):
    """`convert/flax_to_hf.py --checkpoint <run> --peft` on a full fine-tuning run: one line saying the run
    was trained without LoRA, before anything is loaded (it said "give the training run folder", which it was)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "trainable").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: run\nmodel:\n  model_id: {tmp_path / 'base'}\nlora:\n  enabled: false\n")
    with pytest.raises(SystemExit) as exit_:
        flax_to_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "out"), "--peft"])
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.endswith(f"--peft: the run {run} was trained without LoRA (lora.enabled: "
                                                   "false, every weight trained), so there is no adapter to write; "
                                                   "export it without --peft"), line
