"""The planner on a tiny model: XLA's per-device figures are positive and grow with batch and length."""

import yaml

from ivtlr_jax.config import load_config
from ivtlr_jax.plan import plan_generate, plan_train


def test_plan_numbers_grow_with_batch_and_length(tiny_qwen2vl, tmp_path):
    cfg_path = tmp_path / "plan.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"model_id": str(tiny_qwen2vl[0]), "remat": "full"},
                                        "latent": {"num_selected_patches": 8}, "lora": {"rank": 4}}))
    cfg = load_config(cfg_path)
    mesh = {"data": 2, "fsdp": 2, "tensor": 1}
    # the comparisons use XLA's count of the scanned program (loop bodies once: cheap, and it grows with
    # batch and length); the extrapolated full-depth count is checked once against it. One latent pass, not 3:
    # the extrapolation's unrolled programs (each pass a copy) compile a third faster; the figures grow alike
    one = dict(prefix_len=192, num_latents=1)
    small = plan_train(cfg, mesh, batch=1, seq_len=300, **one)  # also counts the scanned program
    longer = plan_train(cfg, mesh, batch=1, seq_len=500, **one, count_flops=False)
    bigger = plan_train(cfg, mesh, batch=2, seq_len=300, **one, count_flops=False)
    full = plan_train(cfg, mesh, batch=1, seq_len=300, **one, full_finetune=True, count_flops=False)
    assert longer.flops_scanned == longer.flops_per_device  # count_flops=False: the scanned program's count
    # every layer and pass counted, not each loop body once
    assert small.flops_per_device > small.flops_scanned > 0
    for p in (small, longer, bigger, full):
        assert p.params_gb > 0 and p.arguments_gb > 0 and p.temporaries_gb > 0 and p.flops_per_device > 0
        assert 0 < p.mfu_ceiling <= 1 and p.step_s_at_peak > 0
    assert longer.flops_per_device > 1.3 * small.flops_scanned
    assert bigger.flops_per_device > 1.6 * small.flops_scanned
    assert longer.temporaries_gb > small.temporaries_gb and bigger.temporaries_gb > small.temporaries_gb
    assert full.optimizer_gb > 10 * small.optimizer_gb  # Adam moments of every parameter vs the adapters'
    gen = plan_generate(cfg, {"data": 1, "fsdp": 4, "tensor": 1}, batch=4, new_tokens=8, count_flops=False)
    assert gen.flops_per_device > 0 and gen.optimizer_gb == 0
    assert "fits" in str(small)


def test_the_command_plans_on_as_many_host_devices_as_its_mesh(tmp_path):
    """`ivtlr-plan` starts JAX on the CPU with the devices its --mesh spans (not the 4 of the default mesh,
    not a GPU a CUDA install would pick); a process that cannot (JAX already up) gets one line."""
    import os
    import subprocess
    import sys

    probe = ("import sys; sys.argv = ['ivtlr-plan', '--config', 'c.yaml', '--mesh', 'data=2,fsdp=4']\n"
             "import ivtlr_jax.plan, jax, os\nprint(jax.device_count(), jax.devices()[0].platform, "
             "os.environ['JAX_PLATFORMS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["8", "cpu", "cpu"], out.stderr[-2000:]


def test_a_mesh_larger_than_the_devices_is_one_line(tmp_path, capsys):
    import pytest

    from ivtlr_jax.plan import main

    (tmp_path / "c.yaml").write_text("latent: {num_selected_patches: 8}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(tmp_path / "c.yaml"), "--mesh", "data=2,fsdp=4"])  # this process has 4
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "needs 8 host (CPU) devices" in line and "--xla_force_host_platform_device_count=8" in line


def test_the_breakdown_attributes_the_peak_to_the_parts_of_the_step(tiny_qwen2vl, tmp_path):
    """`--breakdown`: XLA's buffers live at the peak, grouped by the loss's named parts (forward and
    backward), the arguments and the f32 copies that only the CPU compiler makes of bf16 values (none for
    an fp32 model); the parts add up to about XLA's own peak."""
    from ivtlr_jax.latent import SCOPES
    from ivtlr_jax.plan_memory import ARGUMENTS, CPU_COPIES

    plans = {}
    for dtype in ("float32", "bfloat16"):
        cfg_path = tmp_path / f"{dtype}.yaml"
        cfg_path.write_text(yaml.safe_dump({"model": {"model_id": str(tiny_qwen2vl[0]), "remat": "dots",
                                                      "dtype": dtype, "param_dtype": dtype},
                                            "latent": {"num_selected_patches": 8}, "lora": {"rank": 4}}))
        plans[dtype] = plan_train(load_config(cfg_path), {"data": 1, "fsdp": 4, "tensor": 1}, batch=2, seq_len=300,
                                  prefix_len=192, count_flops=False, breakdown=True)
    for dtype, plan in plans.items():
        parts = plan.breakdown.parts
        assert parts[ARGUMENTS] > 0 and all(size > 0 for size in parts.values())
        scoped = {part.rpartition(" (")[0] for part in parts if " (" in part}
        assert {SCOPES.latent_chain, SCOPES.final_pass} <= scoped, parts
        assert any(part.endswith("(backward)") for part in parts), parts
        assert 0.7 * plan.total_gb * 1e9 <= plan.breakdown.peak_bytes <= 1.01 * plan.total_gb * 1e9
        assert str(plan).count("GB (") >= len(parts)
    assert CPU_COPIES not in plans["float32"].breakdown.parts
    bf16 = plans["bfloat16"].breakdown
    assert bf16.parts[CPU_COPIES] > 0 and bf16.gpu_estimate_bytes < bf16.peak_bytes
    # the verdict is the GPU estimate's (the copies are the CPU compiler's, which a GPU run never makes)
    verdict = plans["bfloat16"].verdict()
    assert f"on XLA CPU, counting its f32 copies of bf16 values; a GPU's estimate without them " \
           f"~{bf16.gpu_estimate_bytes / 1e9:.2f} GB (fits, " in verdict, verdict


def test_a_plan_fits_an_h100_with_ten_percent_headroom():
    from ivtlr_jax.plan import fits_in_memory

    assert fits_in_memory(46.16) == "fits, 42% headroom"
    assert fits_in_memory(72.0) == "fits, 10% headroom"
    assert fits_in_memory(75.0) == "fits, under the 10% headroom"
    assert fits_in_memory(80.5) == "DOES NOT FIT"


def test_the_sweep_prints_each_remat_policy_and_refuses_an_unknown_one(tiny_qwen2vl, tmp_path, capsys):
    """`ivtlr-plan --sweep full,dots`: one row per policy and micro-batch; saving nothing (full) peaks lower
    than saving the dots' outputs; an unknown policy is one line naming it."""
    import pytest

    from ivtlr_jax.plan import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"model_id": str(tiny_qwen2vl[0]), "dtype": "bfloat16",
                                             "param_dtype": "bfloat16"},
                                   "latent": {"num_selected_patches": 8}, "lora": {"rank": 4}}))
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(cfg), "--mesh", "data=1,fsdp=4", "--sweep", "full,dotz"])
    assert stop.value.code == 2 and "unknown remat policies ['dotz']" in capsys.readouterr().err
    main(["--config", str(cfg), "--mesh", "data=1,fsdp=4", "--sweep", "full,dots", "--batch", "1",
          "--seq-len", "300"])  # shorter than the official prefix bound (512): the bound follows it
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["full"], ["dots"])}
    assert set(rows) == {"full", "dots"} and all(row[1] == "1" for row in rows.values())
    peak = {remat: float(row[2]) for remat, row in rows.items()}
    without_copies = {remat: float(row[3]) for remat, row in rows.items()}
    assert 0 < peak["full"] < peak["dots"] and 0 < without_copies["full"] <= peak["full"]


HLO = """
ENTRY %main.1 (w: bf16[4,8]) -> f32[] {
  %w.1 = bf16[4,8]{1,0} parameter(0), metadata={op_name="frozen['w']"}
  %wrapped_convert.1 = f32[4,8]{1,0} fusion(%w.1), kind=kLoop, calls=%wrapped_convert_computation.1
  %wrapped_convert.2 = f32[4,8]{1,0} fusion(%w.1), calls=%c.2, metadata={op_name="jit(step)/convert_element_type"}
  %while.3 = (s32[], bf16[16,8]{1,0}) while(%t.9), body=%b, metadata={op_name="jit(step)/jvp(latent_chain)/while"}
  %get-tuple-element.4 = bf16[16,8]{1,0} get-tuple-element(%while.3), index=1
  %wrapped_convert.5 = f32[16,8]{1,0} fusion(%get-tuple-element.4), kind=kLoop, calls=%c.5
  %dot.6 = f32[16,8]{1,0} dot(%a, %b), metadata={op_name="jit(step)/transpose(jvp(final_pass))/dot_general"}
  %copy.7 = f32[16,8]{1,0} copy(%dot.6)
  %add.8 = f32[16,8]{1,0} add(%copy.7, %copy.7), metadata={op_name="jit(step)/cond/branch_0_fun/add"}
  %wrapped_broadcast.9 = bf16[4,16,8]{2,1,0} fusion(%constant.0), kind=kLoop, calls=%wrapped_broadcast_computation.9
  %copy.10 = bf16[4,16,8]{2,1,0} copy(%wrapped_broadcast.9)
  %tuple.11 = (s32[], bf16[4,16,8], bf16[4,16,8]) tuple(%constant.1, %wrapped_broadcast.9, %copy.10)
  %while.12 = (s32[], bf16[4,16,8], bf16[4,16,8]) while(%tuple.11), metadata={op_name="jit(step)/jvp(final_pass)/while"}
}
"""
LIVE = """HloLiveRange (max 9):
  Live ranges at 7 (peak):
    w.1{}: 64 bytes (cumulative: 64 bytes)
    wrapped_convert.1{}: 128 bytes (cumulative: 192 bytes)
    wrapped_convert.2{}: 128 bytes (cumulative: 320 bytes)
    while.3{1}: 256 bytes (cumulative: 576 bytes)
    wrapped_convert.5{}: 512 bytes (cumulative: 1088 bytes)
    copy.7{}: 512 bytes (cumulative: 1600 bytes)
    add.8{}: 512 bytes (cumulative: 2112 bytes)
    wrapped_broadcast.9{}: 1024 bytes (cumulative: 3136 bytes)
    copy.10{}: 1024 bytes (cumulative: 4160 bytes)
  Stack trace breakdown for peak usage: 4160 bytes
"""


def test_the_breakdown_reads_xla_buffers_by_part():
    """A hand-written module and live-range report: parameters are arguments; a compiler-made f32 copy of a
    bf16 value is a CPU-only copy (its bf16 source counted back in the GPU estimate when it is not live), the
    program's own astype is not; a copy belongs to its source's scope; a tuple buffer to its instruction; the
    initial carry of a loop (the stacked activations a layer loop saves, a broadcast and its copies) to the loop."""
    from ivtlr_jax.plan_memory import ARGUMENTS, CPU_COPIES, OTHER, peak_breakdown

    got = peak_breakdown(HLO, LIVE)
    assert got.parts == {ARGUMENTS: 64, CPU_COPIES: 128 + 512, OTHER: 128 + 512, "latent_chain (forward)": 256,
                         "final_pass (backward)": 512, "final_pass (forward)": 2048}
    assert got.peak_bytes == 4160
    assert got.gpu_estimate_bytes == 4160 - 640  # both sources (w.1, while.3{1}) are live at the peak
    without_source = peak_breakdown(HLO, LIVE.replace("    while.3{1}: 256 bytes (cumulative: 576 bytes)\n", ""))
    assert without_source.gpu_estimate_bytes == 3904 - 640 + 256  # a GPU keeps while.3{1}'s bf16 instead


def test_generation_plans_the_runs_deepstack_choice(tiny_qwen3vl, tmp_path):
    """plan_generate compiles the run's latent settings as plan_train does: latent.patch_deepstack false zeroes
    the inserted patch copies' DeepStack columns (`latent.patch_copies`), work XLA counts in the program."""
    def plan(deepstack: bool):
        path = tmp_path / f"plan_{deepstack}.yaml"
        path.write_text(yaml.safe_dump({"model": {"model_id": str(tiny_qwen3vl[0])},
                                        "latent": {"num_selected_patches": 4, "patch_deepstack": deepstack}}))
        return plan_generate(load_config(path), {"data": 1, "fsdp": 4, "tensor": 1}, batch=4, new_tokens=2,
                             num_latents=1, count_flops=False)

    kept, zeroed = plan(True), plan(False)
    assert zeroed.flops_scanned > kept.flops_scanned > 0
