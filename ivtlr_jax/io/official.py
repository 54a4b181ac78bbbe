"""Importing a checkpoint of the official IVT-LR training scripts into a Flax folder.

The official scripts save `torch.save(state_dict)` of their wrapper module (`IVTLR`), which holds the
PEFT-wrapped Hugging Face model in `base_causallm` and an alias of its input embeddings in
`embedding`; under DeepSpeed every key may carry a `module.` prefix. So a key reads

    [module.]base_causallm.base_model.model.<HF name>                 (PEFT's prefix)
    ... .layers.N.self_attn.q_proj.base_layer.weight                  (a LoRA-wrapped projection)
    ... .layers.N.self_attn.q_proj.lora_A.default.weight              ([r, in])
    ... .layers.N.self_attn.q_proj.lora_B.default.weight              ([out, r])
    [module.]embedding.weight                                         (the alias; dropped)

with <HF name> in the hub layout of transformers 4.51 (`model.layers.*`, `visual.*`, `lm_head.*`) or
transformers 5's in-memory layout (`model.language_model.*`, `model.visual.*`); both are accepted.
Each adapter is merged into its base weight as PEFT's `merge_and_unload` does,
W + (B @ A) * alpha / r in float32, one tensor at a time while the Flax parameters are filled (the
.pth is memory-mapped, so the import holds about one copy of the model). The vocabulary is the .pth's
(its embedding rows: the official resize to len(tokenizer) after adding the latent tokens); the
processor of the base folder gets the three latent tokens and must then have exactly that many.

    import_official("epoch_16_full_model_fp32.pth", "Qwen/Qwen2-VL-7B-Instruct", "checkpoints/ivtlr-m3cot")
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from ..models import abstract_model, read_config
from ..models.common.layers import DType
from ..models.common.loading import WeightLoadError, load_params
from ..config import InferenceSettings
from .atomic import atomic_output_folder, check_output_folder, write_atomic
from .model_folder import FLAX_MARKER, FLAX_PARAMS_DIR, copy_side_files, resolve_folder
from .settings_file import write_settings

OFFICIAL_LORA_ALPHA = 16.0  # lora_alpha of the official LoraConfig (r=64)
WRAPPER_PREFIX = "base_causallm."
PEFT_PREFIX = "base_model.model."
WRAPPER_ALIASES = ("embedding.weight",)  # IVTLR.embedding = base_causallm.get_input_embeddings()
DTYPE_NAMES = tuple(member.value for member in DType)

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
_UNSUPPORTED = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_bias)\b")


class OfficialCheckpointError(ValueError):
    """An unreadable .pth or one that is not an official IVT-LR state dict; the message names the file."""


def require_torch() -> None:
    """Reading a .pth needs torch (a test and conversion dependency, not a runtime one): say so at once."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise OfficialCheckpointError("reading an official .pth needs PyTorch, which is not installed: "
                                      "pip install torch (the CPU build is enough: pip install torch --index-url "
                                      "https://download.pytorch.org/whl/cpu), then run this command again")


def load_state_dict(path: str | Path) -> dict:
    """The .pth as {key: torch.Tensor}, memory-mapped where the file format allows it. Only plain
    tensors are unpickled (weights_only=True): a file that needs arbitrary code is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure mode of a bad file gets the same clear message
        raise OfficialCheckpointError(
            f"{path}: cannot read the checkpoint; the file is truncated or corrupt, or not a torch.save'd "
            f"state dict of plain tensors ({type(e).__name__}: {str(e)[:300]})") from e
    for key in ("module", "state_dict"):  # a DeepSpeed model-states file / a {"state_dict": ...} wrapper
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and not isinstance(sd.get(key), torch.Tensor):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise OfficialCheckpointError(f"{path}: expected a non-empty state dict, found {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return sd


@dataclasses.dataclass
class ParsedCheckpoint:
    base: dict  # hub-layout name -> tensor (base weights; the LoRA-wrapped ones under their plain name)
    lora: dict  # hub-layout module name -> (A [r, in], B [out, r])
    adapter: str | None  # PEFT adapter name ("default")
    layout: str  # "hub" (transformers 4.x) or "transformers5"


def parse_state_dict(sd: dict, rename, origin: str) -> ParsedCheckpoint:
    """Strip the wrapper / PEFT / DeepSpeed prefixes, separate the LoRA factors from the base weights
    and rename to the hub layout with the family's `rename` (which also maps transformers 5 names)."""
    base, factors, unexpected, unsupported = {}, {}, [], []
    adapters = set()
    layout = "hub"
    for key, tensor in sd.items():
        k = key
        while k.startswith("module."):
            k = k[len("module."):]
        if k in WRAPPER_ALIASES:
            continue
        if k.startswith(WRAPPER_PREFIX):
            k = k[len(WRAPPER_PREFIX):]
        if k.startswith(PEFT_PREFIX):
            k = k[len(PEFT_PREFIX):]
        if k.startswith(("model.language_model.", "model.visual.")):
            layout = "transformers5"
        if _UNSUPPORTED.search(k):
            unsupported.append(key)
            continue
        m = _LORA.match(k)
        if m:
            adapters.add(m["adapter"])
            factors.setdefault(m["module"], {})[m["which"]] = (key, tensor)
            continue
        m = _BASE_LAYER.match(k)
        if m:
            k = f"{m['module']}.{m['param']}"
        if k.startswith((WRAPPER_PREFIX, "base_model.")):
            unexpected.append(key)
            continue
        new = rename(k)
        if new is None:
            continue
        if new in base:
            raise OfficialCheckpointError(f"{origin}: two tensors map to {new!r} (one of them {key!r})")
        base[new] = tensor
    problems = []
    if unsupported:
        problems.append(f"unsupported adapter tensors (only plain LoRA on linear layers is): {unsupported[:10]}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:10]}")
    if len(adapters) > 1:
        problems.append(f"more than one LoRA adapter ({sorted(adapters)}); expected one")
    lora = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            problems.append(f"LoRA module {module!r} has lora_{next(iter(ab))} ({have}) but no "
                            f"lora_{'B' if 'A' in ab else 'A'}")
            continue
        name = rename(module + ".weight")
        if name is None or name not in base:
            problems.append(f"LoRA module {module!r} has no base weight ({module}.base_layer.weight)")
            continue
        (_, a), (_, b) = ab["A"], ab["B"]
        if (a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]
                or tuple(base[name].shape) != (b.shape[0], a.shape[1])):
            problems.append(f"LoRA module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                            f"fit the base weight {list(base[name].shape)}")
            continue
        lora[name] = (a, b)
    if problems:
        raise OfficialCheckpointError(f"{origin}: " + "; ".join(problems))
    return ParsedCheckpoint(base, lora, next(iter(adapters), None), layout)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class MergedSource:
    """A TensorSource over the parsed checkpoint: base weights with their adapter merged on access
    (PEFT's merge: W + (B @ A) * scale, in float32)."""

    def __init__(self, parsed: ParsedCheckpoint, scale: float):
        self.parsed, self.scale = parsed, scale

    def keys(self) -> list[str]:
        return list(self.parsed.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.parsed.base[name].shape)

    def get(self, name: str) -> np.ndarray:
        w = self.parsed.base[name]
        if name in self.parsed.lora:
            a, b = self.parsed.lora[name]
            w = w.float() + (b.float() @ a.float()) * self.scale
        return _to_numpy(w)


def infer_lora_rank(parsed: ParsedCheckpoint, rank: int | None, origin: str) -> int | None:
    ranks = sorted({int(a.shape[0]) for a, _ in parsed.lora.values()})
    if not ranks:
        return rank
    if len(ranks) > 1:
        raise OfficialCheckpointError(f"{origin}: LoRA ranks differ between modules ({ranks}); one alpha/r "
                                      "scaling cannot merge them")
    if rank is not None and rank != ranks[0]:
        raise OfficialCheckpointError(f"{origin}: --lora-rank {rank} but the lora_A matrices have rank {ranks[0]}")
    return ranks[0]


def _with_vocab(raw: dict, vocab_size: int) -> dict:
    raw = json.loads(json.dumps(raw))
    if isinstance(raw.get("text_config"), dict) and "vocab_size" in raw["text_config"]:
        raw["text_config"]["vocab_size"] = vocab_size
    if "vocab_size" in raw or not isinstance(raw.get("text_config"), dict):
        raw["vocab_size"] = vocab_size
    return raw


def import_official(pth: str | Path, base: str | Path, out: str | Path, *, dtype: str = "float32",
                    lora_alpha: float | None = None, lora_rank: int | None = None, dataset: str = "m3cot",
                    log=print) -> Path:
    """Convert an official IVT-LR .pth (LoRA merged) into a Flax folder that `from_pretrained` loads:
    orbax parameters, config.json with the .pth's vocabulary, the base's processor files with the
    latent tokens added, and the settings it is asked with (`ivtlr_settings.json`: `dataset`'s prompt in the
    official evaluation format, 3 latents, the official K, bfloat16). `out` must not exist or be empty; it
    appears only when complete."""
    import jax.numpy as jnp
    from flax import nnx

    from ..data import load_processor
    from ..data.tokenizer import save_processor
    from ..models.common.vocab import LATENT_TOKENS
    from .orbax_params import save_params

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: choose from {DTYPE_NAMES}")
    pth, out = Path(pth), Path(out)
    check_output_folder(out)  # before the (long) load
    require_torch()  # before the base model is resolved (possibly a 7B download)
    src = resolve_folder(base)
    family, config, raw = read_config(src)
    origin = str(pth)

    log(f"reading {origin} (memory-mapped, weights only)")
    parsed = parse_state_dict(load_state_dict(pth), family.hf_renamer(config), origin)
    rank = infer_lora_rank(parsed, lora_rank, origin)
    alpha = OFFICIAL_LORA_ALPHA if lora_alpha is None else float(lora_alpha)
    scale = alpha / rank if parsed.lora else 0.0
    embed_name = family.weight_specs(config)[("embed_vd",)].hf_name
    if embed_name not in parsed.base:
        raise WeightLoadError(f"cannot load {origin}: missing tensor(s): {embed_name} (the input embeddings, "
                              f"expected under '{WRAPPER_PREFIX}{PEFT_PREFIX}')")
    vocab_size = int(parsed.base[embed_name].shape[0])
    config = dataclasses.replace(config, vocab_size=vocab_size)

    try:
        processor = load_processor(src)
    except Exception as e:  # noqa: BLE001
        raise OfficialCheckpointError(f"{src}: cannot load the base model's processor ({e})") from e
    tok = getattr(processor, "tokenizer", processor)
    tok.add_tokens(list(LATENT_TOKENS))
    if len(tok) != vocab_size:
        raise OfficialCheckpointError(
            f"{origin}: the embeddings have {vocab_size} rows but the processor of {src} has {len(tok)} tokens "
            f"with the latent tokens {LATENT_TOKENS} added; the .pth does not belong to this base model")

    log(f"{origin}: {len(parsed.base)} tensors ({parsed.layout} layout), {len(parsed.lora)} LoRA modules "
        f"(adapter {parsed.adapter!r}, r={rank}, alpha={alpha:g}), vocabulary {vocab_size}")
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
    model = abstract_model(family, config, dtype=jdtype, param_dtype=jdtype)
    _, abstract_state = nnx.split(model)
    log(f"merging the LoRA adapters into the weights ({dtype})")
    state = load_params(abstract_state, family.weight_specs(config), MergedSource(parsed, scale),
                        stacked_prefixes=family.stacked, origin=origin)

    log(f"writing {out}")
    with atomic_output_folder(out) as tmp:
        save_params(state, tmp / FLAX_PARAMS_DIR)
        del state
        write_settings(tmp, InferenceSettings(dataset=dataset, prompt_format="official",
                                              num_selected_patches=family.official_shapes["patches"]))
        copy_side_files(src, tmp, skip=("config.json", FLAX_MARKER))  # both written below
        save_processor(processor, tmp)
        write_atomic(tmp / "config.json", json.dumps(_with_vocab(raw, vocab_size), indent=2))
        write_atomic(tmp / FLAX_MARKER, json.dumps(
            {"format": "orbax", "source": str(pth), "base": str(base), "param_dtype": dtype,
             "official_import": {"layout": parsed.layout, "lora_modules_merged": len(parsed.lora), "lora_rank": rank,
                                 "lora_alpha": alpha if parsed.lora else None},
             "converted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return out
