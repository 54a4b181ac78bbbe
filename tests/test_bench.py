"""The benchmark scripts run end to end on small settings (so they cannot rot unnoticed), and the
correctness checks they print hold: the JAX loss equals the PyTorch oracle's, generation matches the
torch baseline, the forward's logits match transformers. Timings are not checked (bench/ reports them)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST_COMPILE_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each bench sets its own devices
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}  # the checks, not the timings, are tested
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return out.stdout


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert match, f"no {label!r} in:\n{text}"
    return float(match.group(1))


def test_latent_step_bench_lora_with_breakdown():
    out = run_bench("latent_step.py", "--repeats", "1", "--batch", "2", "--latents", "1", "--k", "2",
                    "--threads", "1", "--rank", "4", "--breakdown")
    assert "LoRA r=4" in out and "oracle (torch, official-style)" in out and "breakdown:" in out
    assert number_after("rel diff", out) < 1e-5
    jax_loss, oracle_loss = number_after("loss: jax", out), number_after("oracle", out.split("loss:")[1])
    assert abs(jax_loss - oracle_loss) <= 1e-5 * abs(oracle_loss)


def test_latent_step_bench_full_fine_tuning_unrolled():
    """--layouts: the step with the vision tower attending per frame (the baseline) gives the default's loss."""
    out = run_bench("latent_step.py", "--repeats", "1", "--batch", "1", "--latents", "2", "--k", "3",
                    "--threads", "1", "--train", "full", "--unroll-layers", "--layouts")
    assert "full fine-tuning" in out and "layers unrolled" in out
    assert number_after("rel diff", out) < 1e-5
    assert number_after("frame_attention/per-frame", out) > 0 and number_after("loss rel diff", out) < 1e-5


def test_generate_bench_checks_pass():
    out = run_bench("generate.py", "--repeats", "1", "--batches", "1,2", "--new-tokens", "4", "--latents", "1",
                    "--k", "2", "--threads", "1")
    checks = re.findall(r"check: .*?: (True|False)", out)
    assert len(checks) == 3 and set(checks) == {"True"}, out


def test_continuous_bench_checks_pass():
    out = run_bench("continuous.py", "--prompts", "4", "--pool", "6", "--slots", "2", "--max-new", "8",
                    "--min-len", "1", "--repeats", "1", "--latents", "1", "--k", "2")
    checks = re.findall(r"check: .*?: (True|False)", out)
    assert len(checks) == 2 and set(checks) == {"True"}, out
    assert number_after("continuous / static:", out) > 0


def test_train_step_bench_losses_agree():
    out = run_bench("train_step.py", "--repeats", "1", "--batch", "4", "--latents", "1", "--k", "2", "--rank", "2",
                    "--threads", "1")
    assert "jax lora 4 devices" in out and "torch full" in out
    assert number_after("max rel diff to torch", out) < 1e-5


def test_forward_bench_matches_transformers():
    out = run_bench("forward.py", "--configs", "qwen2vl-tiny,chameleon-tiny", "--repeats", "1", "--threads", "1")
    diffs = [float(d) for d in re.findall(r"max\|dlogits\| ([-+0-9.e]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out


def test_gpu_check_smoke(tmp_path):
    """bench/gpu_check.py --smoke (CPU, tiny widths): every section runs and records finite positive numbers,
    or an explicit marker where the CPU has nothing to measure (cudnn, the device's peak FLOP/s and memory)."""
    out_path = tmp_path / "gpu_check.json"
    out = run_bench("gpu_check.py", "--smoke", "--out", str(out_path), "--repeats", "2")
    result = json.loads(out_path.read_text())
    for name in ("setup", "train", "plan", "ratio", "generate", "attention"):
        assert name in result and "error" not in result[name], (name, result.get(name))
        assert f"\n{name} " in out, out  # a line of the summary table
    positive = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
    train = result["train"]
    assert math.isfinite(train["loss"]) and train["finite"] is True, train
    for key in ("compile_s", "step_ms", "tokens_per_s", "real_tokens_per_s", "supervised_tokens_per_s",
                "flops_per_step", "flops_compiled_step", "achieved_flops_per_s"):
        assert positive(train[key]), (key, train[key])
    assert positive(train["xla_memory_bytes"]["total"]), train["xla_memory_bytes"]
    assert train["flops_per_step"] > train["flops_compiled_step"]  # unrolled loops count every iteration
    assert result["meta"]["peak_bf16_flops"] is None and train["mfu"] is None and train["mfu_note"]
    assert positive(train["peak_bytes_in_use"]) or (train["peak_bytes_in_use"] is None and train["peak_note"])
    plan = result["plan"]
    assert positive(plan["predicted_bytes"]) and positive(plan["gpu_estimate_bytes"]), plan
    assert plan["gpu_estimate_bytes"] <= 1.01 * plan["predicted_bytes"], plan  # the CPU's copies left out
    assert all(positive(result["ratio"][k]) for k in ("ivtlr_ms", "plain_ms", "ratio")), result["ratio"]
    generate = result["generate"]
    assert positive(generate["examples_per_s"]) and positive(generate["generated_tokens_per_s"]), generate
    assert generate["every_row_full_length"] is True  # EOS disabled: every row decodes new_tokens
    attention = result["attention"]
    assert positive(attention["xla"]["fwd_ms"]) and positive(attention["xla"]["fwd_bwd_ms"]), attention
    assert attention["cudnn"].startswith("unavailable"), attention
    for impl in ("model_xla", "model_fused"):  # the model's attention_impl options (XLA on CPU either way)
        assert positive(attention[impl]["fwd_ms"]) and positive(attention[impl]["fwd_bwd_ms"]), attention
    assert 0 <= attention["model_max_abs_diff"] < 1e-2, attention  # bf16
    batch = result["setup"]["batch"]
    assert batch["assembled_length"] == batch["collated_length"] + batch["latents"] * batch["k"]
    assert 0 < batch["shared_prefix"] < batch["first_latent"] <= batch["prefix_len"], batch


def test_vision_bench_paths_agree():
    """4 images in one jitted call (grid traced: frame_attention), the old dense mask and one image at a time
    compute the same features and parameter gradients."""
    out = run_bench("vision.py", "--small", "--repeats", "1", "--grad")
    assert "ratios c=" in out and "fwd+bwd:" in out, out
    assert number_after("max|diff| new vs one at a time", out) < 1e-5
    assert number_after("old vs one at a time", out) < 1e-5
    assert number_after("max rel|dgrad| vs one at a time", out) < 1e-5


def test_vision_bench_layouts_agree():
    """--layouts: same-size images stacked (per-frame attention) and flat (frame_attention) give the same
    features and parameter gradients."""
    out = run_bench("vision.py", "--small", "--repeats", "1", "--layouts", "--grad")
    diffs = [float(d) for d in re.findall(r"flat/stacked [0-9.]+, max rel\|diff\| ([-+0-9.e]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out


def test_serve_bench_answers_every_request_once():
    out = run_bench("serve.py", "--requests", "4", "--clients", "2", "--slots", "2", "--tokens", "4")
    assert re.search(r"check: every request answered True, none twice True, concurrent answers equal the "
                     r"sequential ones True", out), out
    assert number_after("concurrent / one after another:", out) > 0
