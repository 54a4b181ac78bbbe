"""The benchmark scripts run end to end on small settings (so they cannot rot unnoticed), and the
correctness checks they print hold: the JAX loss equals the PyTorch oracle's, generation matches the
torch baseline, the forward's logits match transformers. Timings are not checked (bench/ reports them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each bench sets its own devices
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, env=env | {"JAX_PLATFORMS": "cpu"}, timeout=600)
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
    out = run_bench("latent_step.py", "--repeats", "1", "--batch", "1", "--latents", "2", "--k", "3",
                    "--threads", "1", "--train", "full", "--unroll-layers")
    assert "full fine-tuning" in out and "layers unrolled" in out
    assert number_after("rel diff", out) < 1e-5


def test_generate_bench_checks_pass():
    out = run_bench("generate.py", "--repeats", "1", "--batches", "1,2", "--new-tokens", "4", "--latents", "1",
                    "--k", "2", "--threads", "1")
    checks = re.findall(r"check: .*?: (True|False)", out)
    assert len(checks) == 3 and set(checks) == {"True"}, out


def test_train_step_bench_losses_agree():
    out = run_bench("train_step.py", "--repeats", "1", "--batch", "4", "--latents", "1", "--k", "2", "--rank", "2",
                    "--threads", "1")
    assert "jax lora 4 devices" in out and "torch full" in out
    assert number_after("max rel diff to torch", out) < 1e-5


def test_forward_bench_matches_transformers():
    out = run_bench("forward.py", "--configs", "qwen2vl-tiny,chameleon-tiny", "--repeats", "1", "--threads", "1")
    diffs = [float(d) for d in re.findall(r"max\|dlogits\| ([-+0-9.e]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out
