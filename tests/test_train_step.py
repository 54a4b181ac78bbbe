"""Training components: LoRA, vocabulary extension, config loading, the sharded train step, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivtlr_jax.config import ConfigError, OptimSection, load_config
from ivtlr_jax.latent import LatentConfig, LatentShapes
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import ShardingRules, make_mesh
from ivtlr_jax.train.checkpoint import TrainCheckpointer
from ivtlr_jax.models.common.lora import LoRAConfig, add_lora, merge_lora, trainable_filter
from ivtlr_jax.train.optim import make_optimizer
from ivtlr_jax.train.step import StepConfig, init_optimizer, make_train_step, split_trainable, step_shardings
from ivtlr_jax.models.common.vocab import resize_vocab
from ivtlr_jax.models.common.sharding import batch_shardings, state_shardings
from tests.test_latent import QWEN_LATENT, qwen_batch, to_jax

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.05)


def batch4(seed=3):
    b = qwen_batch((2, 2), seed=seed)
    return to_jax({k: (np.concatenate([v, v]) if isinstance(v, np.ndarray) else v) for k, v in b.items()})


def logits(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]).logits


def test_fresh_lora_leaves_the_model_unchanged_and_merging_equals_the_branch(tiny_qwen2vl):
    batch = batch4()
    base = logits(from_pretrained(tiny_qwen2vl[0]), batch)
    model = add_lora(from_pretrained(tiny_qwen2vl[0]), LORA)
    np.testing.assert_array_equal(np.asarray(logits(model, batch)), np.asarray(base))
    # give B non-zero values: the branch changes the output, and merging reproduces it
    rng = np.random.default_rng(0)
    for name in LORA.target_modules:
        var = getattr(model.layers.lora, f"{name}_b")
        var[...] = jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32)
    with_branch = np.asarray(logits(model, batch))
    assert np.abs(with_branch - np.asarray(base)).max() > 1e-3
    merged = np.asarray(logits(merge_lora(model), batch))
    assert not hasattr(model.layers, "lora")
    np.testing.assert_allclose(merged, with_branch, atol=2e-5)


def test_lora_training_changes_only_the_adapters(tiny_qwen2vl):
    model = add_lora(from_pretrained(tiny_qwen2vl[0]), LORA)
    graphdef, trainable, frozen = split_trainable(model, trainable_filter(LORA))
    frozen_before = jax.tree.map(np.asarray, frozen)
    assert all("lora" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable))
    tx = make_optimizer(OptimSection(lr=1e-2, gradient_accumulation_steps=1))
    step = make_train_step(graphdef, tx, StepConfig(LatentConfig(QWEN_LATENT, 3), group_size=2))
    opt = init_optimizer(tx, trainable)
    batch = batch4()
    before = jax.tree.map(np.asarray, trainable)
    trainable, opt, metrics = step(trainable, frozen, opt, batch, jax.random.key(0), jnp.float32(1),
                                   LatentShapes(2, batch["input_ids"].shape[1]))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["tokens"]) > 0
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [np.abs(np.asarray(b) - a).max() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainable))]
    assert max(moved) > 1e-4


def test_sharded_step_equals_single_device_step(tiny_qwen2vl):
    """data=2 x fsdp=2 mesh, explicit in/out shardings: same loss and parameters after two steps."""
    batch = batch4()
    s = batch["input_ids"].shape[1]
    tx = make_optimizer(OptimSection(lr=1e-2, gradient_accumulation_steps=1))
    cfg = StepConfig(LatentConfig(QWEN_LATENT, 3), group_size=2)

    def run(rules):
        model = add_lora(from_pretrained(tiny_qwen2vl[0], rules=rules), LORA)
        graphdef, trainable, frozen = split_trainable(model, trainable_filter(LORA))
        b = batch
        if rules is not None:
            trainable = jax.device_put(trainable, state_shardings(trainable, rules))
        opt = init_optimizer(tx, trainable, rules)
        if rules is not None:
            b = jax.device_put(batch, batch_shardings(batch, rules))
            step = make_train_step(graphdef, tx, cfg, rules=rules,
                                   shardings=step_shardings(trainable, frozen, opt, b, rules))
        else:
            step = make_train_step(graphdef, tx, cfg)
        losses = []
        for i in range(2):
            trainable, opt, m = step(trainable, frozen, opt, b, jax.random.key(i), jnp.float32(1), LatentShapes(2, s))
            losses.append(float(m["loss"]))
        return losses, trainable

    single_losses, single = run(None)
    rules = ShardingRules(make_mesh(data=2, fsdp=2, tensor=1))
    mesh_losses, sharded = run(rules)
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-6)
    # Adam divides each gradient by its own magnitude, so the reassociated sums of a sharded step move
    # elements with gradients near eps by a visible fraction of lr: bound the difference by lr / 1000
    # (jax 0.10.2 on CPU: 3.8e-6 after two steps at lr 1e-2; a wrong sharding moves them by ~lr)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-3 * 1e-2


def test_resize_vocab_sets_new_head_rows_from_the_copy_token(tiny_qwen2vl):
    model = from_pretrained(tiny_qwen2vl[0])
    old_embed = np.asarray(model.embed_vd[...])
    resize_vocab(model, 303, [300, 301, 302], copy_from_id=7)
    head = np.asarray(model.lm_head_dv[...])
    assert head.shape[1] == 303 and model.config.vocab_size == 303
    for i in (300, 301, 302):
        np.testing.assert_array_equal(head[:, i], head[:, 7])
    np.testing.assert_array_equal(np.asarray(model.embed_vd[...])[:300], old_embed)
    resize_vocab(model, 296, [293, 294, 295], copy_from_id=7)  # shrinking, as for Qwen2-VL-7B
    assert model.embed_vd[...].shape[0] == 296 and np.asarray(model.lm_head_dv[...]).shape[1] == 296


def test_checkpoint_round_trip(tiny_qwen2vl, tmp_path):
    model = add_lora(from_pretrained(tiny_qwen2vl[0]), LORA)
    _, trainable, _ = split_trainable(model, trainable_filter(LORA))
    tx = make_optimizer(OptimSection(gradient_accumulation_steps=4))
    opt = init_optimizer(tx, trainable)
    changed = jax.tree.map(lambda x: x + 1.5, trainable)
    ckpt = TrainCheckpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, changed, opt, {"step": step, "epoch": 0, "position": 7})
    ckpt.wait()
    assert ckpt.latest_step() == 3 and len(list((tmp_path / "ckpt").iterdir())) == 2  # keeps the last 2
    restored, opt2, meta = ckpt.restore(3, trainable, opt)
    assert meta == {"step": 3, "epoch": 0, "position": 7}
    for a, b in zip(jax.tree.leaves(changed), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(opt2) == jax.tree.structure(opt)
    ckpt.close()


def test_bad_config_key_is_named(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: t\noptim:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: optim: unknown key\(s\) \['learning_rate'\]"):
        load_config(cfg)
    cfg.write_text("train:\n  num_epochs: many\n")
    with pytest.raises(ConfigError, match=r"train\.num_epochs: expected int"):
        load_config(cfg)
    cfg.write_text("optim:\n  lr: 1e-4\n")
    assert load_config(cfg).optim.lr == 1e-4


def train_refusal(argv: list[str], capsys) -> str:
    """train.py's one-line refusal (it exits before loading anything)."""
    import train

    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert capsys.readouterr().err == ""
    return str(exit_.value.code)


def test_a_misspelt_key_names_who_set_it_and_the_nearest_key(tmp_path, capsys):
    """`train.py --config x.yaml optim.lrr=1` blamed the YAML file and suggested nothing."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: t\nmodel:\n  dtipe: float32\n")
    message = train_refusal(["--config", str(cfg), "optim.lrr=1"], capsys)
    assert message.startswith(f"error: {cfg}: model: unknown key(s) ['dtipe'] (did you mean 'dtype'?)"), message
    cfg.write_text("name: t\n")
    message = train_refusal(["--config", str(cfg), "optim.lrr=1"], capsys)
    assert message.startswith("error: command line 'optim.lrr=1': optim: unknown key(s) ['lrr'] "
                              "(did you mean 'lr'?)"), message
    message = train_refusal(["--config", str(cfg), "optimm.lr=1"], capsys)
    assert message.startswith("error: command line 'optimm.lr=1': unknown key(s) ['optimm'] "
                              "(did you mean 'optim'?)"), message
    message = train_refusal(["--config", str(cfg), "train.num_epochs=many"], capsys)
    assert message == "error: command line 'train.num_epochs=many': train.num_epochs: expected int, got 'many'"
    message = train_refusal(["--config", str(cfg), "optim.lr=-1"], capsys)
    assert message == "error: command line 'optim.lr=-1': optim.lr: -1.0 must be a finite number > 0"
    cfg.write_text("name: t\noptim:\n  lr: -1\n")
    assert train_refusal(["--config", str(cfg), "optim.eps=1e-8"], capsys) == \
        f"error: {cfg}: optim.lr: -1.0 must be a finite number > 0"


def test_float16_training_is_refused_at_config_load(tmp_path, capsys):
    """float16 without loss scaling: refused for training in one line naming bfloat16; evaluation keeps it."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: t\nmodel:\n  dtype: float16\n")
    message = train_refusal(["--config", str(cfg)], capsys)
    assert message == (f"error: {cfg}: model.dtype: float16 cannot train (there is no loss scaling); use bfloat16 "
                       "(float16 stays allowed for evaluation)")
    cfg.write_text("name: t\n")
    assert train_refusal(["--config", str(cfg), "model.dtype=float16"], capsys).startswith(
        "error: command line 'model.dtype=float16': model.dtype: float16 cannot train")
    assert load_config(cfg, ["model.dtype=float16"], training=False).model.dtype == "float16"


def test_loss_scales():
    """micro_batch_mean: the token mean of each replica's rows, averaged over replicas (as DDP averages
    per-GPU means); token_mean: summed token losses over the window's token count."""
    from ivtlr_jax.train.step import batch_loss

    row_nll = jnp.asarray([2.0, 4.0, 9.0, 1.0])  # 2 replicas x 2 rows
    row_tok = jnp.asarray([1, 3, 2, 2])
    cfg = StepConfig(LatentConfig(QWEN_LATENT, 3), group_size=2)
    assert float(batch_loss(row_nll, row_tok, cfg, jnp.float32(1))) == pytest.approx(((2 + 4) / 4 + (9 + 1) / 4) / 2)
    token = StepConfig(LatentConfig(QWEN_LATENT, 3), group_size=2, loss_scale="token_mean")
    assert float(batch_loss(row_nll, row_tok, token, jnp.float32(8))) == pytest.approx(16 / 8)
