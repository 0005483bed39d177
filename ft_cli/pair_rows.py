"""Each preference pair's prompt computed once: one row holds prompt, chosen reply and rejected reply.

A pair's chosen and rejected sequences share their prompt token for token, and in a preference batch that prompt
is about half of all tokens (dpo_en_demo.json: 46 %). Laid out as [prompt | chosen reply | rejected reply], with
position ids restarting at the prompt's end for the rejected reply and a 4D attention mask that hides the chosen
reply from the rejected one, the model computes every token once and the two replies score exactly as they do in
separate rows. The first token of a reply is predicted from the prompt's last position, for both replies.

Written here because neither transformers nor TRL offers it for a pair batch (TRL's padding-free mode packs the
two sequences whole, prompt twice). A model that ignores custom 4D masks (flash-attention kernels, some
architectures) would silently attend across replies: ft checks the shared computation against the separate one on
the first batch and turns sharing off, saying so, where they differ (ft_cli.tasks.Preference.prepare).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def shared_layout(batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The batch's pairs as shared rows, or None where a pair's two sequences do not start with the same prompt.

    Returns input_ids / position_ids [B, L], attention_mask [B, 1, L, L] (True: may attend), and for scoring:
    `at` [B, T] logit positions, `target` [B, T] token ids, `side` [B, T] (0 chosen, 1 rejected, -1 nothing)."""
    pairs = int(batch["pairs"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, scores = [], []
    for i in range(pairs):
        c_real, r_real = mask[i].bool(), mask[pairs + i].bool()  # padding on either side
        c_ids, r_ids, c_lab, r_lab = ids[i][c_real], ids[pairs + i][r_real], labels[i][c_real], labels[pairs + i][r_real]
        c_len, r_len = len(c_ids), len(r_ids)
        c_first, r_first = _first_scored(c_lab), _first_scored(r_lab)
        if c_first is None or r_first is None:
            return None
        prompt = min(c_first, r_first)  # tokens before either reply's first scored label
        if prompt < 1 or not torch.equal(c_ids[:prompt], r_ids[:prompt]):
            return None
        row_ids = torch.cat([c_ids, r_ids[prompt:]])
        positions = torch.cat([torch.arange(c_len), torch.arange(prompt, r_len)])
        # logit position predicting label t: t - 1 in its own sequence; for the rejected side past the prompt,
        # shifted behind the chosen reply
        c_t = (c_lab[1:] != IGNORE).nonzero().flatten() + 1
        r_t = (r_lab[1:] != IGNORE).nonzero().flatten() + 1
        r_at = torch.where(r_t - 1 < prompt, r_t - 1, r_t - 1 - prompt + c_len)
        scores.append((torch.cat([c_t - 1, r_at]), torch.cat([c_lab[c_t], r_lab[r_t]]),
                       torch.cat([torch.zeros(len(c_t), dtype=torch.long), torch.ones(len(r_t), dtype=torch.long)])))
        rows.append((row_ids, positions, prompt, c_len))
    length = max(len(r[0]) for r in rows)
    width = max(len(s[0]) for s in scores)
    out_ids = torch.zeros((pairs, length), dtype=torch.long)
    out_pos = torch.zeros((pairs, length), dtype=torch.long)
    allowed = torch.zeros((pairs, 1, length, length), dtype=torch.bool)
    at = torch.zeros((pairs, width), dtype=torch.long)
    target = torch.zeros((pairs, width), dtype=torch.long)
    side = torch.full((pairs, width), -1, dtype=torch.long)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    for i, ((row_ids, positions, prompt, c_len), (a, t, s)) in enumerate(zip(rows, scores, strict=True)):
        n = len(row_ids)
        out_ids[i, :n], out_pos[i, :n] = row_ids, positions
        m = causal[:n, :n].clone()
        m[c_len:, prompt:c_len] = False  # the rejected reply does not see the chosen one
        allowed[i, 0, :n, :n] = m
        allowed[i, 0, n:, :].fill_(False)
        idx = torch.arange(n, length)
        allowed[i, 0, idx, idx] = True  # padding attends to itself only (never a row with nothing to attend to)
        at[i, :len(a)], target[i, :len(t)], side[i, :len(s)] = a, t, s
    return {"input_ids": out_ids, "position_ids": out_pos, "attention_mask": allowed, "at": at, "target": target,
            "side": side}


def mask_kind(model: Any) -> str | None:
    """How this model takes a custom 4D mask: "bool" (sdpa), "additive" (eager), or None (flash-attention and other
    kernels that take none: no sharing)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "additive"}.get(impl)


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in: its input embeddings' (float32 for a model without them)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None else torch.float32


def shared_reply_logps(model: Any, layout: dict[str, torch.Tensor], device: Any,
                       kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed reply log-probabilities and reply token counts, chosen first, as reply_logps returns them."""
    allowed = layout["attention_mask"].to(device)
    if kind == "bool":  # sdpa takes a boolean mask whatever the compute dtype (autocast included)
        mask = allowed
    else:  # eager adds the mask to the attention scores
        dtype = compute_dtype(model)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    first = int(layout["at"].masked_fill(layout["side"] < 0, 1 << 30).min())  # no logits before the first scored
    length = layout["input_ids"].shape[1]
    out = model(input_ids=layout["input_ids"].to(device), position_ids=layout["position_ids"].to(device),
                attention_mask=mask, use_cache=False, logits_to_keep=length - first)
    logits = out.logits
    if logits.shape[1] != length - first:  # a model without logits_to_keep returned every position
        logits = logits[:, first:]
    at, target, side = (layout[k].to(device) for k in ("at", "target", "side"))
    picked = logits.gather(1, (at - first).clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    logp = picked.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    sums, counts = [], []
    for s in (0, 1):
        keep = side == s
        sums.append((logp * keep).sum(-1))
        counts.append(keep.sum(-1))
    return torch.cat(sums), torch.cat(counts)


def _first_scored(labels: torch.Tensor) -> int | None:
    """Index of the first label that is scored (predicted from the position before it), None if none is."""
    scored = (labels[1:] != IGNORE).nonzero()
    return int(scored[0]) + 1 if len(scored) else None
