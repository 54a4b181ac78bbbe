"""A PyTorch implementation of docs/method.md sections 4-10, written independently of ivtlr_jax, on top of
transformers' own models with eager attention: the oracle the JAX latent loop is tested against.

It does what the official code does (n + 1 full forwards over a growing sequence, full attention
matrices) with this project's documented choices: ties break to the lower index, patches inserted in
descending score order (or raster order), fewer than K eligible patches filled with the lowest-index
already-picked ones, each row's own image span, latent hidden states cut from the graph without
routing their gradient to the `<|latent|>` embedding row, and rows with different latent counts
treated each as it is alone (docs/method.md section 10: patches only before a row's own latents, labels right-aligned
by its own count), where the official code inserts every pass's patches into every row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
# Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the same image features, M-RoPE and language-model calls
QWEN_FAMILIES = ("qwen2vl", "qwen25vl", "qwen3vl")


def _embed(hf, family, ids, image_inputs):
    """Input embeddings [B, S, D] with the image features scattered in; for Qwen3-VL [B, S, (1 + A) * D]: each
    position's embedding, then its A DeepStack features (zeros at text positions), which travel with it."""
    model = hf.model
    embeds = model.get_input_embeddings()(ids)
    if family in QWEN_FAMILIES:
        pv, grid = image_inputs
        vision = model.visual(pv, grid_thw=grid)
        feats = vision.pooler_output
        image_token = hf.config.image_token_id
        if family == "qwen3vl":
            feats = torch.cat([feats, *vision.deepstack_features], dim=-1)
            embeds = torch.cat([embeds] + [torch.zeros_like(embeds)] * len(vision.deepstack_features), dim=-1)
    else:
        (pv,) = image_inputs
        tokens = model.get_image_tokens(pv)
        feats = model.get_input_embeddings()(tokens).reshape(-1, embeds.shape[-1])
        image_token = model.vocabulary_mapping.image_token_id
    mask = (ids == image_token).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype)), image_token


def _lm(hf, family, embeds, mask, positions, attentions=False):
    if family == "qwen3vl":  # transformers' DeepStack on every position (zeros where there is no image feature)
        d = hf.config.text_config.hidden_size
        addends = embeds[..., d:].reshape(*embeds.shape[:-1], -1, d)  # [B, T, A, D]
        out = hf.model.language_model(
            inputs_embeds=embeds[..., :d], attention_mask=mask, position_ids=positions, output_attentions=attentions,
            visual_pos_masks=torch.ones(embeds.shape[:-1], dtype=torch.bool),
            deepstack_visual_embeds=[addends[..., a, :].reshape(-1, d) for a in range(addends.shape[-2])])
    elif family in QWEN_FAMILIES:
        out = hf.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                      output_attentions=attentions)
    else:
        out = hf.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       output_attentions=attentions)
    return out


def _logits(hf, family, hidden):
    logits = hf.lm_head(hidden)
    if family == "chameleon":  # as ChameleonForConditionalGeneration.forward
        logits[:, :, hf.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
    return logits


def oracle_ivtlr(hf, family: str, batch: dict, k: int, order: str = "score", rope: str = "1d",
                 official_compute: bool = False, patch_deepstack: bool = True):
    """-> (loss with graph, selected [n][B][K] lists, final embeds, final mask).

    Rows may have different latent counts c_r (docs/method.md section 10, the corrected behaviour, not the official
    one): each row is grown on its own, pass i runs only the rows that have an i-th latent and inserts
    patches only into them; a row without pass i gets [-1] * K in `selected`. The final sequences are
    right-padded (zero embeddings, mask 0) to S + n*K and each row's labels are right-aligned by its own
    c_r*K, so a row contributes what it contributes alone.

    official_compute: also do what the official code computes without effect on the result (for timing
    it the way it runs): every pass's LM-head logits are kept, and the loss is the cross-entropy of all
    passes' logits concatenated along the sequence with the labels right-aligned to the total (so the
    passes' rows are all -100: the same value), whose backward runs through every pass. Equal counts
    only. patch_deepstack (Qwen3-VL): the inserted patch copies keep their DeepStack features, else
    only their embeddings; latent states have none."""
    ids, mask, labels, collator_pos = (torch.tensor(np.asarray(batch[key], np.int64))
                                       for key in ("input_ids", "attention_mask", "labels", "position_ids"))
    latent_id = batch["latent_token_id"]
    if family in QWEN_FAMILIES:
        image_inputs = (torch.tensor(batch["pixel_values"]), torch.tensor(batch["image_grid_thw"]))
    else:
        image_inputs = (torch.tensor(batch["pixel_values"]),)
    b, s = ids.shape
    embeds, image_token = _embed(hf, family, ids, image_inputs)

    counts = [int(c) for c in (ids == latent_id).sum(1)]
    n = max(counts)
    p = min(int((ids[r] == latent_id).nonzero()[0]) for r in range(b) if counts[r]) if n else s
    if official_compute and len(set(counts)) > 1:
        raise ValueError("official_compute needs the same number of latents in every row")

    if rope == "mrope":  # each row's M-RoPE over its whole original row (images and text as transformers)
        # attention_mask by keyword: Qwen2.5-VL's signature has second_per_grid_ts before it
        whole, _ = hf.model.get_rope_index(ids, (ids == image_token).long(), image_inputs[1], None,
                                           attention_mask=mask)

    def row_positions(r, length, first_pass):
        """[length] (or [3, length] for mrope) positions of row r's current sequence."""
        if rope == "mrope":
            if counts[r] == 0:  # nothing is inserted: the original row
                return F.pad(whole[:, r], (0, length - s))
            prefix = whole[:, r, :p]  # the question; then text positions from its largest index on
            tail = prefix.max() + 1 + torch.arange(length - p)
            return torch.cat([prefix, tail[None].expand(3, -1)], dim=1)
        if family == "chameleon" or not first_pass:  # the official code: arange over the whole row
            return torch.arange(length)
        return collator_pos[r, :length]

    def stack_positions(rows, length, first_pass):
        return torch.stack([row_positions(r, length, first_pass) for r in rows], dim=-2)

    image_pos = [[j for j in range(p) if ids[row, j] == image_token] for row in range(b)]
    picked = [set() for _ in range(b)]
    selected = []
    seqs = [embeds[r] for r in range(b)]  # each row's sequence [len_r, D], grown by its own insertions
    seq_masks = [mask[r] for r in range(b)]
    pass_logits = []
    for i in range(n):
        active = [r for r in range(b) if counts[r] > i]  # rows with an i-th latent
        end = p + i * (k + 1)  # where latent i sits in each of them (after i chunks of K + 1)
        x = torch.stack([seqs[r][:end] for r in active])
        m = torch.stack([seq_masks[r][:end] for r in active])
        out = _lm(hf, family, x, m, stack_positions(active, end, first_pass=(i == 0)), attentions=True)
        if official_compute:
            pass_logits.append(_logits(hf, family, out.last_hidden_state))
        att = torch.stack(out.attentions)  # [L, A, N, end, end]
        score = att[:, :, :, end - 1, :].mean(dim=2).mean(dim=0).detach()  # [A, end]
        hidden = out.last_hidden_state  # final-norm hidden states
        chosen_rows = [[-1] * k for _ in range(b)]
        for a, row in enumerate(active):
            cands = [j for j in image_pos[row] if j not in picked[row]]
            ranked = sorted(cands, key=lambda j: (-float(score[a, j]), j))[:k]
            fill = sorted(picked[row])[: k - len(ranked)]
            picked[row].update(ranked)
            chosen = ranked + fill
            chosen_rows[row] = sorted(chosen) if order == "position" else chosen
            patches = seqs[row][chosen_rows[row]]  # [K, D] input embeddings
            width = patches.shape[-1]
            if not patch_deepstack:  # the embedding only, without the features that travel with it
                patches = F.pad(patches[:, :hidden.shape[-1]], (0, width - hidden.shape[-1]))
            latent = F.pad(hidden[a, end - 1].detach()[None], (0, width - hidden.shape[-1]))  # replaces latent i
            seqs[row] = torch.cat([seqs[row][:end], patches, latent, seqs[row][end + 1:]])
            seq_masks[row] = torch.cat([seq_masks[row][:end], torch.ones(k + 1, dtype=mask.dtype),
                                        seq_masks[row][end + 1:]])
        selected.append(chosen_rows)

    length = s + n * k
    cur = torch.stack([F.pad(seqs[r], (0, 0, 0, length - len(seqs[r]))) for r in range(b)])
    cur_mask = torch.stack([F.pad(seq_masks[r], (0, length - len(seq_masks[r]))) for r in range(b)])
    out = _lm(hf, family, cur, cur_mask, stack_positions(range(b), length, first_pass=(n == 0)))
    logits = _logits(hf, family, out.last_hidden_state)
    final_labels = torch.stack([F.pad(labels[r], (counts[r] * k, (n - counts[r]) * k), value=IGNORE)
                                for r in range(b)])
    if official_compute:  # the official loss over every pass's logits, labels right-aligned to the total
        logits = torch.cat(pass_logits + [logits], dim=1)
        final_labels = torch.cat([torch.full((b, logits.shape[1] - final_labels.shape[1]), IGNORE,
                                             dtype=labels.dtype), final_labels], dim=1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), final_labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)
    return loss, selected, cur, cur_mask


def latent_batch(rng: np.random.Generator, question_rows: list[list[int]], latents: list[int], answer_lens: list[int],
                 latent_token_id: int, eos: int, vocab: int) -> dict:
    """The official collator's layout: question + <|latent|> x m + answer + EOS per row, left-padded so
    that the first latents align (rows without latents get no left padding, as in the official
    collator), then right-padded; labels on answer + EOS only; positions 0 on left pads, then 0, 1, 2..."""
    rows, label_rows = [], []
    for q, m, a in zip(question_rows, latents, answer_lens):
        answer = list(rng.integers(3, vocab, a)) + [eos]
        rows.append(q + [latent_token_id] * m + answer)
        label_rows.append([IGNORE] * (len(q) + m) + answer)
    p = max((len(q) for q, m in zip(question_rows, latents) if m), default=0)
    left = [p - len(q) if m else 0 for q, m in zip(question_rows, latents)]
    s = max(start + len(r) for start, r in zip(left, rows))
    ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    pos = np.zeros_like(ids)
    for i, (start, r, lab) in enumerate(zip(left, rows, label_rows)):
        ids[i, start : start + len(r)] = r
        mask[i, start : start + len(r)] = 1
        labels[i, start : start + len(r)] = lab
        pos[i, start : start + len(r)] = np.arange(len(r))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos,
            "latent_token_id": latent_token_id}


def oracle_generate(hf, family: str, batch: dict, k: int, max_new_tokens: int, order: str = "score") -> list[int]:
    """docs/method.md section 17 for one unpadded prompt (question + latents): the forward of sections 7-9 with
    labels = input ids, then greedy decoding (here by re-running the full sequence each step)."""
    batch = dict(batch, labels=batch["input_ids"])
    with torch.no_grad():
        _, _, embeds, mask = oracle_ivtlr(hf, family, batch, k, order)
        tokens = []
        table = hf.model.get_input_embeddings()
        for _ in range(max_new_tokens):
            positions = torch.arange(embeds.shape[1])[None]
            out = _lm(hf, family, embeds, mask, positions)
            token = int(_logits(hf, family, out.last_hidden_state)[0, -1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return tokens
