"""The JAX IVT-LR latent loop against the PyTorch oracle of docs/method.md sections 4-10 (tests/oracle_ivtlr.py)
on tiny random Qwen2-VL, Qwen2.5-VL and Chameleon models: selected patches, assembled sequence, loss, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivtlr_jax.latent import LatentConfig, LatentShapes, ivtlr_loss, latent_layout
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import ShardingRules, make_mesh, read_config
from ivtlr_jax.models.common.loading import variables_by_path
from tests import hf_tiny
from tests.oracle_ivtlr import latent_batch, oracle_ivtlr

QWEN_LATENT, CHAMELEON_LATENT, EOS = 295, 390, 2


def qwen_batch(latents, seed=0, answers=(6, 4), text_lens=((3, 5), (1, 2)), sizes=((84, 84), (56, 112)),
               processed=hf_tiny.image_inputs):
    """Two rows with images of different sizes (by default 9 and 8 image tokens) and questions of different
    lengths (text before and after the image per row), so the rows get different left pads. processed:
    (sizes, seed) -> (pixel_values, image_grid_thw), the family's image processing."""
    rng = np.random.default_rng(seed)
    pv, grid = processed(list(sizes), seed=seed)
    n_img = (grid.prod(-1) // 4).tolist()
    span = lambda k: [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * k + [hf_tiny.VISION_END]
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    questions = [text(before) + span(m) + text(after) for m, (before, after) in zip(n_img, text_lens)]
    batch = latent_batch(rng, questions, list(latents), list(answers), QWEN_LATENT, EOS, hf_tiny.TEXT_VOCAB)
    return batch | {"pixel_values": pv, "image_grid_thw": grid}


def chameleon_batch(latents, seed=0, answers=(5, 7)):
    rng = np.random.default_rng(seed)
    pv = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    img = [hf_tiny.CHAMELEON_IMAGE] * hf_tiny.CHAMELEON_TOKENS_PER_IMAGE
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    questions = [text(4) + img + text(3), text(2) + img + text(1)]
    batch = latent_batch(rng, questions, list(latents), list(answers), CHAMELEON_LATENT, EOS, hf_tiny.TEXT_VOCAB)
    return batch | {"pixel_values": pv}


def to_jax(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "latent_token_id"}


@functools.partial(nnx.jit, static_argnames=("cfg", "n", "prefix_len", "shared"))
def loss_and_grads(model, batch, cfg, n, prefix_len, shared):
    def f(m):
        loss, aux = ivtlr_loss(m, batch, cfg, LatentShapes(n, prefix_len, shared))
        return loss, aux

    (loss, aux), grads = nnx.value_and_grad(f, has_aux=True)(model)
    return loss, aux, grads


def run_jax(model, batch, cfg, shared: str = "max"):
    """shared: the question slots run once for the chain and the final pass: "max" p - 1, "half" p // 2,
    "none" 0 (the chain re-runs the whole prefix)."""
    n, p = latent_layout(batch["input_ids"], cfg.latent_token_id)
    c = {"max": max(p - 1, 0), "half": p // 2, "none": 0}[shared]
    return loss_and_grads(model, to_jax(batch), cfg, n, batch["input_ids"].shape[1], c)


def torch_grads_in_our_layout(folder, hf):
    """The oracle's parameter gradients mapped through our weight table (zeros where torch has none)."""
    family, config, _ = read_config(folder)
    rename = family.hf_renamer(config)
    grads = {rename(k): (v.grad.numpy() if v.grad is not None else np.zeros(v.shape, np.float32))
             for k, v in hf.named_parameters()}
    out = {}
    abstract = variables_by_path(nnx.state(from_pretrained(folder)))
    for path, spec in family.weight_specs(config).items():
        shape = abstract[path].shape
        if "{i}" in spec.hf_name:
            out[path] = np.stack([spec.to_ours(grads[spec.hf_name.format(i=i)], shape[1:]) for i in range(shape[0])])
        else:
            out[path] = spec.to_ours(grads[spec.hf_name], shape)
    return out


def compare(folder, hf, family, model, batch, cfg, check_grads=True, shared="max"):
    hf.zero_grad()
    loss_t, sel_t, emb_t, mask_t = oracle_ivtlr(hf, family, batch, cfg.num_selected_patches, cfg.patch_order,
                                                cfg.rope, patch_deepstack=cfg.patch_deepstack)
    loss, aux, grads = run_jax(model, batch, cfg, shared)
    n = len(sel_t)
    k = cfg.num_selected_patches
    np.testing.assert_array_equal(np.asarray(aux.selected), np.asarray(sel_t, dtype=np.int64).reshape(n, 2, k))
    valid = mask_t.numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(aux.attention_mask), valid)
    assert np.abs(np.asarray(aux.embeds) - emb_t.detach().numpy())[valid].max() <= 1e-5
    assert abs(float(loss) - float(loss_t)) <= 1e-5 * abs(float(loss_t))
    if check_grads:
        loss_t.backward()
        ref = torch_grads_in_our_layout(folder, hf)
        ours = variables_by_path(grads)
        assert set(ours) == set(ref)
        for path, g in ref.items():
            diff = np.abs(np.asarray(ours[path][...]) - g).max()
            assert diff <= 1e-5 * max(np.linalg.norm(g), 1e-2), (path, diff, np.linalg.norm(g))
    return aux


@pytest.mark.parametrize(
    "latents,k,order,rope",
    [
        ((0, 0), 4, "score", "1d"),  # no latents: a plain forward
        ((1, 1), 8, "score", "1d"),
        ((2, 2), 3, "position", "1d"),
        ((3, 3), 5, "score", "1d"),  # 3 x 5 > 8 image tokens: the last pass is filled with picked patches
        ((2, 2), 2, "score", "mrope"),
    ],
)
def test_qwen2vl_matches_oracle(qwen, latents, k, order, rope):
    folder, hf, model = qwen
    cfg = LatentConfig(QWEN_LATENT, k, patch_order=order, rope=rope)
    compare(folder, hf, "qwen2vl", model, qwen_batch(latents), cfg)


@pytest.mark.parametrize(
    "latents,k,order,rope",
    [
        ((2, 2), 3, "score", "1d"),
        ((2, 1), 2, "position", "mrope"),  # and rows with different latent counts
    ],
)
def test_qwen25vl_matches_oracle(qwen25, latents, k, order, rope):
    """Qwen2.5-VL (window-attention vision tower) against the oracle on transformers'
    Qwen2_5_VLForConditionalGeneration: images of 3x3 and 4x5 merged tokens, windows of 2x2, so both
    have partial windows; the gradients reach the vision tower's windowed and full blocks."""
    folder, hf, model = qwen25
    cfg = LatentConfig(QWEN_LATENT, k, patch_order=order, rope=rope)
    compare(folder, hf, "qwen25vl", model, qwen_batch(latents, sizes=hf_tiny.QWEN25VL_IMAGE_SIZES), cfg)


def test_qwen2vl_rows_with_fewer_and_without_latents(qwen):
    """Rows with different latent counts against the oracle, which grows each row on its own (docs/method.md section 10:
    patches only before a row's own latents, labels right-aligned by its own count). A row without latents
    has no left pad, so its supervised answer may lie in the shared question slots: the loss must still
    count it."""
    folder, hf, model = qwen
    for latents, shared in [((3, 1), "max"), ((0, 2), "max")]:
        compare(folder, hf, "qwen2vl", model, qwen_batch(latents, seed=1), LatentConfig(QWEN_LATENT, 2), shared=shared)
    # row 0 (no latents, short question): its whole answer lies before the latent row's question ends
    batch = qwen_batch((0, 2), seed=3, text_lens=((1, 1), (14, 3)))
    answer_slots = np.flatnonzero(batch["labels"][0] != -100)
    _, p = latent_layout(batch["input_ids"], QWEN_LATENT)
    assert answer_slots.max() < p - 1
    compare(folder, hf, "qwen2vl", model, batch, LatentConfig(QWEN_LATENT, 2), shared="max")


def test_qwen2vl_mrope_row_without_latents_keeps_its_own_positions(qwen):
    """M-RoPE, a row without latents whose image lies past p: nothing is inserted into it, so its final
    sequence has the M-RoPE of its whole row (the image's 3-D positions), as alone, not text positions
    continuing from p. (An M-RoPE index over the questions alone cut this image and so gave the next row
    this row's image grid.)"""
    folder, hf, model = qwen
    batch = qwen_batch((0, 2), seed=3, text_lens=((14, 3), (1, 1)))
    _, p = latent_layout(batch["input_ids"], QWEN_LATENT)
    assert np.flatnonzero(batch["input_ids"][0] == hf_tiny.IMAGE_TOKEN).max() >= p
    compare(folder, hf, "qwen2vl", model, batch, LatentConfig(QWEN_LATENT, 2, rope="mrope"))


@pytest.mark.parametrize("shared", ["none", "half"])
def test_qwen2vl_shared_prefix_lengths(qwen, shared):
    """Any split c < p of the question between the shared run and the chain's own prefill is exact."""
    folder, hf, model = qwen
    compare(folder, hf, "qwen2vl", model, qwen_batch((2, 1), seed=2), LatentConfig(QWEN_LATENT, 3), shared=shared)


@pytest.mark.parametrize("latents,k", [((2, 2), 8), ((3, 1), 6)])
def test_chameleon_matches_oracle(chameleon, latents, k):
    folder, hf, model = chameleon
    compare(folder, hf, "chameleon", model, chameleon_batch(latents), LatentConfig(CHAMELEON_LATENT, k))


def test_bad_layouts_are_rejected(qwen):
    _, _, model = qwen
    batch = qwen_batch((2, 2))
    ids = batch["input_ids"].copy()
    ids[1] = np.roll(ids[1], 1)  # second row's latents one slot later
    with pytest.raises(ValueError, match="not aligned on their first <|latent|>"):
        ivtlr_loss(model, to_jax(batch | {"input_ids": ids}), LatentConfig(QWEN_LATENT, 2))
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have \[9, 8\] image tokens .* fewer than"):
        ivtlr_loss(model, to_jax(batch), LatentConfig(QWEN_LATENT, 10))


def test_full_latent_gradients_match_finite_differences(tiny_qwen2vl):
    """latent_grad='full' differentiates through the latent chain: its directional derivative equals a
    central finite difference (float64), and it differs from the stop-gradient one."""
    batch = qwen_batch((2, 2), seed=2)
    with jax.enable_x64(True):
        model = from_pretrained(tiny_qwen2vl[0], dtype=jnp.float64)
        jb = to_jax(batch)
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(0)
        direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), state)

        def loss_of(state, cfg):
            return ivtlr_loss(nnx.merge(graphdef, state), jb, cfg, LatentShapes(2, batch["input_ids"].shape[1]))[0]

        full, stop = LatentConfig(QWEN_LATENT, 3, latent_grad="full"), LatentConfig(QWEN_LATENT, 3)
        dot = lambda g: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
        g_full = dot(jax.jit(jax.grad(lambda s: loss_of(s, full)))(state))
        g_stop = dot(jax.jit(jax.grad(lambda s: loss_of(s, stop)))(state))
        eps = 1e-5
        shifted = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, state, direction)
        f = jax.jit(lambda s: loss_of(s, full))
        fd = (f(shifted(1)) - f(shifted(-1))) / (2 * eps)
        assert abs(float(g_full) - float(fd)) <= 1e-6 * abs(float(fd)), (g_full, fd)
        assert abs(float(g_stop) - float(fd)) > 1e-4 * abs(float(fd)), "stop and full gradients should differ"


def test_sharded_step_equals_unsharded(tiny_qwen2vl, qwen):
    _, _, model = qwen
    batch = qwen_batch((2, 2), seed=3)
    batch4 = {k: (np.concatenate([v, v]) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
    cfg = LatentConfig(QWEN_LATENT, 3)
    loss, aux, grads = run_jax(model, batch4, cfg)
    rules = ShardingRules(make_mesh(data=2, fsdp=2, tensor=1))
    sharded = from_pretrained(tiny_qwen2vl[0], rules=rules)
    sh = rules.sharding(("batch", "length"), batch4["input_ids"].shape)
    token_keys = ("input_ids", "attention_mask", "labels", "position_ids")
    jb = {k: (jax.device_put(v, sh) if k in token_keys else jnp.asarray(v))
          for k, v in batch4.items() if k != "latent_token_id"}
    _, first = latent_layout(batch4["input_ids"], QWEN_LATENT)
    loss_s, aux_s, grads_s = loss_and_grads(sharded, jb, cfg, 2, batch4["input_ids"].shape[1], first - 1)
    assert abs(float(loss_s) - float(loss)) <= 1e-6 * abs(float(loss))
    np.testing.assert_array_equal(np.asarray(aux_s.selected), np.asarray(aux.selected))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * max(np.linalg.norm(a), 1e-2)


def test_new_batch_content_does_not_retrace(qwen):
    _, _, model = qwen
    cfg = LatentConfig(QWEN_LATENT, 2)
    traces = []

    @functools.partial(nnx.jit, static_argnames=("n", "prefix_len"))
    def f(model, batch, n, prefix_len):
        traces.append(1)
        return ivtlr_loss(model, batch, cfg, LatentShapes(n, prefix_len))[0]

    a, b = qwen_batch((2, 2), seed=4), qwen_batch((2, 2), seed=5)
    assert a["input_ids"].shape == b["input_ids"].shape and (a["input_ids"] != b["input_ids"]).any()
    la = f(model, to_jax(a), 2, a["input_ids"].shape[1])
    lb = f(model, to_jax(b), 2, b["input_ids"].shape[1])
    assert len(traces) == 1 and float(la) != float(lb)


# ---- rows with different latent counts (docs/method.md section 10): every row is what it is alone ---------------
def mixed_features(latents=(3, 1, 2), seed=6):
    """Collator features (input_ids, labels, image) of rows `question + <|latent|> x c + answer + EOS`
    with questions of different lengths (so different left pads) and images of 9, 8 and 6 tokens."""
    rng = np.random.default_rng(seed)
    pv, grid = hf_tiny.image_inputs([(84, 84), (56, 112), (84, 56)], seed=seed)
    sizes = grid.prod(-1)
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    features, start = [], 0
    for m, c, (before, after), answer in zip(grid.prod(-1) // 4, latents, ((2, 4), (6, 1), (1, 2)), (5, 7, 3)):
        q = text(before) + [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * int(m) + [hf_tiny.VISION_END] + text(after)
        a = text(answer) + [EOS]
        image = {"pixel_values": pv[start:start + sizes[len(features)]], "image_grid_thw": grid[len(features)][None]}
        start += sizes[len(features)]
        features.append((q + [QWEN_LATENT] * c + a, [-100] * (len(q) + c) + a, image))
    return features


def collate_tight(features):
    """The collator's batch with tight shapes (S the longest row, prefix_len = p) -> (batch, n, prefix_len, p)."""
    from ivtlr_jax.data.collate import collate

    every = tuple(range(1, 512))
    batch, shapes = collate(features, latent_id=QWEN_LATENT, pad_id=0, length_buckets=every, prefix_buckets=every)
    return batch, shapes.num_latents, shapes.prefix_len, latent_layout(batch["input_ids"], QWEN_LATENT)[1]


@functools.partial(nnx.jit, static_argnames=("cfg", "n", "prefix_len", "shared"))
def loss_only(model, batch, cfg, n, prefix_len, shared):
    return ivtlr_loss(model, batch, cfg, LatentShapes(n, prefix_len, shared))


def test_rows_with_different_latent_counts_equal_rows_alone(qwen):
    """A batch of rows with 3, 1 and 2 latents: each row's selected patches, final sequence, loss terms
    and gradient contribution equal those of the row collated and run alone (the official forward
    would insert 3 chunks of patches into every row and shift every row's labels by 3*K). The rows
    alone run in JAX (forward) and in the oracle (gradients: a batch of one, where nothing is new)."""
    folder, hf, model = qwen
    cfg = LatentConfig(QWEN_LATENT, 3)
    features = mixed_features()
    batch, n, prefix_len, p = collate_tight(features)
    assert n == 3
    _, aux, grads = loss_and_grads(model, to_jax(batch), cfg, n, prefix_len, p - 1)
    ours = variables_by_path(grads)
    expected = {path: np.zeros(g.shape, np.float32) for path, g in ours.items()}
    for r, feature in enumerate(features):
        c = feature[0].count(QWEN_LATENT)
        left = int(np.argmax(batch["attention_mask"][r]))  # the row's left pad in the batch
        single, n_r, prefix_r, p_r = collate_tight([feature])
        _, alone = loss_only(model, to_jax(single), cfg, n_r, prefix_r, p_r - 1)
        assert int(aux.row_tokens[r]) == int(alone.row_tokens[0]) > 0
        nll, nll_alone = float(aux.row_nll[r]), float(alone.row_nll[0])
        assert abs(nll - nll_alone) <= 1e-5 * abs(nll_alone), (r, nll, nll_alone)
        np.testing.assert_array_equal(np.asarray(aux.selected[:c, r]) - left, np.asarray(alone.selected[:, 0]))
        assert (np.asarray(aux.selected[c:, r]) == -1).all()
        # the row's final sequence is its sequence alone after its left pad, then right padding
        span = slice(left, left + alone.embeds.shape[1])
        valid = np.asarray(alone.attention_mask[0])
        np.testing.assert_array_equal(np.asarray(aux.attention_mask[r, span]), valid)
        assert not np.asarray(aux.attention_mask[r, span.stop:]).any()
        np.testing.assert_array_equal(np.asarray(aux.labels[r, span]), np.asarray(alone.labels[0]))
        assert np.abs(np.asarray(aux.embeds[r, span]) - np.asarray(alone.embeds[0]))[valid].max() <= 1e-5
        np.testing.assert_array_equal(np.asarray(aux.positions[r, span])[valid], np.asarray(alone.positions[0])[valid])
        # the batch loss is sum(row_nll) / tokens: row r's gradient enters weighted by its share of the tokens
        hf.zero_grad()
        oracle_ivtlr(hf, "qwen2vl", single | {"latent_token_id": QWEN_LATENT}, cfg.num_selected_patches)[0].backward()
        weight = int(alone.row_tokens[0]) / int(aux.num_tokens)
        for path, g in torch_grads_in_our_layout(folder, hf).items():
            expected[path] += weight * g
    for path, g in expected.items():
        diff = np.abs(np.asarray(ours[path][...]) - g).max()
        assert diff <= 1e-5 * max(np.linalg.norm(g), 1e-2), (path, diff, np.linalg.norm(g))


def test_the_chunked_loss_keeps_one_lm_head_for_the_backward_pass():
    """The cross-entropy's chunks (under remat, label-free ones skipped) keep the LM head once for the
    backward pass, not stacked per chunk ([chunks, D, V]: 5 x 1.1 GB for Qwen2-VL-7B), and give the
    gradients of the unchunked loss (computed here with numpy's log-sum-exp, from the same logits)."""
    from ivtlr_jax.latent import chunked_cross_entropy

    b, t, d, v, chunk = 2, 20, 8, 96, 4
    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    labels = rng.integers(0, v, size=(b, t))
    labels[:, :9] = -100  # the first chunks carry no labels (skipped)

    class Head:  # a model's `logits`, as the families compute them ([B, c, V] fp32)
        def __init__(self, w):
            self.w = w

        def logits(self, h):
            return (h @ self.w).astype(jnp.float32)

    loss = lambda w, h: jnp.sum(chunked_cross_entropy(Head(w), h, jnp.asarray(labels), chunk)[0])  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert f"tensor<{t // chunk}x{d}x{v}x" not in grad.lower(head, hidden).as_text()

    def plain(w, h):  # every position at once, no chunks, no skipping
        logits = (h @ w)[:, :-1]
        targets = jnp.asarray(labels[:, 1:])
        valid = targets != -100
        gold = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - gold, 0.0))

    np.testing.assert_allclose(loss(head, hidden), plain(head, hidden), rtol=1e-5)
    for got, want in zip(grad(head, hidden), jax.grad(plain, argnums=(0, 1))(head, hidden)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
