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
