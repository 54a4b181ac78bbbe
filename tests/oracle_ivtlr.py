"""A PyTorch implementation of REFERENCE.md section 3, written independently of ivtlr_jax, on top of
transformers' own models with eager attention: the oracle the JAX latent loop is tested against.

It does what the official code does (n + 1 full forwards over a growing sequence, full attention
matrices) with this project's documented choices: ties break to the lower index, patches inserted in
descending score order (or raster order), fewer than K eligible patches filled with the lowest-index
already-picked ones, each row's own image span, latent hidden states cut from the graph without
routing their gradient to the `<|latent|>` embedding row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def _embed(hf, family, ids, image_inputs):
    model = hf.model
    embeds = model.get_input_embeddings()(ids)
    if family == "qwen2vl":
        pv, grid = image_inputs
        feats = model.visual(pv, grid_thw=grid).pooler_output
        image_token = hf.config.image_token_id
    else:
        (pv,) = image_inputs
        tokens = model.get_image_tokens(pv)
        feats = model.get_input_embeddings()(tokens).reshape(-1, embeds.shape[-1])
        image_token = model.vocabulary_mapping.image_token_id
    mask = (ids == image_token).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype)), image_token


def _lm(hf, family, embeds, mask, positions, attentions=False):
    if family == "qwen2vl":
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
                 official_compute: bool = False):
    """-> (loss with graph, selected [n][B][K] lists, final embeds, final mask).

    official_compute: also do what the official code computes without effect on the result (for timing
    it the way it runs): every pass's LM-head logits are kept, and the loss is the cross-entropy of all
    passes' logits concatenated along the sequence with the labels right-aligned to the total (so the
    passes' rows are all -100: the same value), whose backward runs through every pass."""
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    labels = torch.tensor(batch["labels"])
    collator_pos = torch.tensor(batch["position_ids"])
    latent_id = batch["latent_token_id"]
    if family == "qwen2vl":
        image_inputs = (torch.tensor(batch["pixel_values"]), torch.tensor(batch["image_grid_thw"]))
    else:
        image_inputs = (torch.tensor(batch["pixel_values"]),)
    b, s = ids.shape
    embeds, image_token = _embed(hf, family, ids, image_inputs)

    counts = (ids == latent_id).sum(1)
    n = int(counts.max())
    p = int((ids[counts.argmax()] == latent_id).nonzero()[0]) if n else s

    def positions_for(length, first_pass):
        if rope == "mrope":
            grid = image_inputs[1]
            prefix_mask = mask[:, :p].clone()
            mm = (ids[:, :p] == image_token).long()
            pos3, _ = hf.model.get_rope_index(ids[:, :p], mm, grid, None, prefix_mask)
            base = pos3.amax(dim=(0, 2)) + 1  # [B]
            tail = base[:, None] + torch.arange(length - p)[None]
            return torch.cat([pos3, tail[None].expand(3, -1, -1)], dim=2)
        if family == "chameleon" or not first_pass:  # the official code: arange over the whole row
            return torch.arange(length)[None].expand(b, -1)
        return collator_pos[:, :length]

    image_pos = [[j for j in range(p) if ids[row, j] == image_token] for row in range(b)]
    picked = [set() for _ in range(b)]
    selected = []
    cur, cur_mask, end = embeds, mask, p
    pass_logits = []
    for i in range(n):
        pos = positions_for(cur.shape[1], first_pass=(i == 0))
        out = _lm(hf, family, cur[:, :end], cur_mask[:, :end], pos[..., :end], attentions=True)
        if official_compute:
            pass_logits.append(_logits(hf, family, out.last_hidden_state))
        att = torch.stack(out.attentions)  # [L, B, N, end, end]
        score = att[:, :, :, end - 1, :].mean(dim=2).mean(dim=0)  # [B, end]
        hidden = out.last_hidden_state  # final-norm hidden states
        chosen_rows = []
        for row in range(b):
            cands = [j for j in image_pos[row] if j not in picked[row]]
            ranked = sorted(cands, key=lambda j: (-float(score[row, j]), j))[:k]
            fill = sorted(picked[row])[: k - len(ranked)]
            picked[row].update(ranked)
            chosen = ranked + fill
            chosen_rows.append(sorted(chosen) if order == "position" else chosen)
        selected.append(chosen_rows)
        patches = torch.stack([cur[row, chosen_rows[row]] for row in range(b)])  # [B, K, D] input embeddings
        cur = cur.clone()
        for row in range(b):
            if counts[row] > i:  # this row has an i-th latent, at index `end`
                cur[row, end] = hidden[row, end - 1].detach()
        cur = torch.cat([cur[:, :end], patches, cur[:, end:]], dim=1)
        cur_mask = torch.cat([cur_mask[:, :end], torch.ones(b, k, dtype=cur_mask.dtype), cur_mask[:, end:]], dim=1)
        end += 1 + k

    out = _lm(hf, family, cur, cur_mask, positions_for(cur.shape[1], first_pass=(n == 0)))
    logits = _logits(hf, family, out.last_hidden_state)
    final_labels = torch.cat([torch.full((b, n * k), IGNORE, dtype=labels.dtype), labels], dim=1)
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
    """REFERENCE section 4 for one unpadded prompt (question + latents): the section-3 forward with
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
