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
    # batch and length); the extrapolated full-depth count is checked once against it
    small = plan_train(cfg, mesh, batch=1, seq_len=300, prefix_len=192)  # also counts the scanned program
    longer = plan_train(cfg, mesh, batch=1, seq_len=500, prefix_len=192, count_flops=False)
    bigger = plan_train(cfg, mesh, batch=2, seq_len=300, prefix_len=192, count_flops=False)
    full = plan_train(cfg, mesh, batch=1, seq_len=300, prefix_len=192, full_finetune=True, count_flops=False)
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
