"""Preference objectives for ft's own loop: DPO (sigmoid / hinge / IPO), ORPO and SimPO.

One forward per micro-batch scores both sides of its pairs: the collated batch holds the chosen sequences, then the
rejected ones (2B rows, padded together). A side's log-probability is the sum over its reply tokens (labels != -100)
of log p(token); IPO, ORPO and SimPO use the per-token average, as their papers and TRL do.

The losses follow TRL 1.16 (tests/test_preference.py checks them against TRL's own functions on the same batch):
- dpo: Delta = (pi_c - ref_c) - (pi_r - ref_r); sigmoid: -logsigmoid(beta Delta) (label smoothing e: the
  conservative -(1-e) logsigmoid(beta Delta) - e logsigmoid(-beta Delta)); hinge: relu(1 - beta Delta); ipo:
  (Delta_avg - 1/(2 beta))^2 on per-token average log-ratios. Rewards: beta (pi - ref) per side.
- orpo: the chosen replies' token-mean NLL - beta * mean logsigmoid(log odds(avg_c) - log odds(avg_r)), with
  log odds(p) = log p - log(1 - p) (TRL's ORPOTrainer: beta is the paper's lambda). Rewards: beta avg per side.
- simpo: -logsigmoid(beta (avg_c - avg_r) - gamma) (with label smoothing as for dpo). Rewards: beta avg per side.

The DPO reference is the model before training: its log-probabilities are computed once, before the first step
(or read from ft's cache, as on resume), with the adapter disabled for PEFT methods (no second copy of the model)
and from the freshly loaded weights for full/freeze, in eval mode without grad, and stored with the rows
(ft_cli.reference).

Normalisation is ft's usual one: a step's loss is the sum of pair losses over every pair of the step (all
micro-batches, all processes) divided by their number (ORPO's NLL term: by the chosen reply tokens), so
grad_accum and the number of processes do not change the maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ft_cli.batches import rows_at

IGNORE = -100
STAT_KEYS = ("pairs", "loss_sum", "rewards_chosen", "rewards_rejected", "correct", "logps_chosen", "logps_rejected")


def preference_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pair rows -> one padded batch: the chosen sequences, then the rejected ones; `ref_logps` when precomputed."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [(r["input_ids"], r["labels"]) for r in rows] + [(r["rejected_input_ids"], r["rejected_labels"])
                                                                 for r in rows]
        n = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, :len(ids)] = torch.as_tensor(ids)
            labels[i, :len(ids)] = torch.as_tensor(lab)
            attention_mask[i, :len(ids)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "pairs": torch.tensor(len(rows))}
        if rows and "ref_chosen_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                              + [r["ref_rejected_logps"] for r in rows], dtype=torch.float64)
        return batch

    return collate


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's scored tokens, their number); position t predicts label t+1."""
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def reply_logps(model: Any, batch: dict[str, Any], device: Any,
                share: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probabilities and reply token counts of every row of a collated pair batch. The logits of
    prompt positions that no row scores are never computed (transformers' `logits_to_keep`: the last k positions),
    which saves the lm_head and the log-softmax over the vocabulary for the shared prompt length. With `share` (a
    mask kind, ft_cli.pair_rows) each pair's prompt is computed once, in one row with both replies."""
    if share is not None:
        from ft_cli.pair_rows import shared_layout, shared_reply_logps

        layout = shared_layout(batch)
        if layout is not None:
            return shared_reply_logps(model, layout, device, share)
    labels = batch["labels"].to(device)
    scored = (labels[:, 1:] != IGNORE).any(0).nonzero()
    first = int(scored[0]) if len(scored) else 0  # the first label position any row scores is first + 1
    keep = labels.shape[1] - first  # logits positions first .. L-1 predict labels first+1 .. L (the last unused)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False, logits_to_keep=keep)
    logits = out.logits
    if logits.shape[1] != keep:  # a model without logits_to_keep returned every position
        logits = logits[:, -keep:]
    return sequence_logps(logits, labels[:, first:])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (as TRL's log1mexp)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(objective: str, cfg: Any, logps: torch.Tensor, counts: torch.Tensor,
                ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen / rejected rewards. `logps`, `counts`, `ref_logps`: (2B,), chosen first."""
    beta, ls = cfg.beta, cfg.label_smoothing
    pc, pr = logps.chunk(2)
    nc, nr = counts.clamp(min=1).to(logps.dtype).chunk(2)
    if objective == "dpo":
        assert ref_logps is not None
        rc, rr = ref_logps.to(logps.dtype).chunk(2)
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        delta = chosen_ratio - rejected_ratio
        if cfg.loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif cfg.loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:  # ipo: on per-token average log-ratios (TRL, confirmed with the IPO authors)
            losses = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    avg_c, avg_r = pc / nc, pr / nr
    if objective == "orpo":
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        losses = -beta * F.logsigmoid(log_odds)
    elif objective == "simpo":
        margin = beta * (avg_c - avg_r) - cfg.simpo_gamma
        losses = -F.logsigmoid(margin) * (1 - ls) - F.logsigmoid(-margin) * ls
    else:
        raise ValueError(f"unknown preference objective {objective!r}")
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


class PreferenceObjective:
    """The loop's hooks for objective dpo / orpo / simpo (ft_cli.train calls these where SFT scores tokens)."""

    def __init__(self, recipe: Any):
        self.name = recipe.objective
        self.cfg = recipe.preference
        self.share: str | None = None  # preference.share_prompt, once checked on the model (choose_sharing)

    def choose_sharing(self, model: Any, batch: dict[str, Any], device: Any) -> str:
        """Turn prompt sharing on when the recipe asks for it and, on this batch, the shared rows give the same
        reply log-probabilities as separate rows; returns what to tell the user."""
        from ft_cli.pair_rows import compute_dtype, mask_kind, shared_layout, shared_reply_logps

        if not self.cfg.share_prompt:
            return ""
        kind = mask_kind(model)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if kind is None:
            return (f"preference.share_prompt: off (attention {impl} takes no custom attention mask): each pair's "
                    "prompt is computed twice")
        layout = shared_layout(batch)
        if layout is None:
            return ""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            separate, _ = reply_logps(model, batch, device)
            shared, _ = shared_reply_logps(model, layout, device, kind)
        model.train(was_training)
        worst = float(((separate - shared).abs() / separate.abs().clamp(min=1)).max())
        tolerance = 1e-4 if separate.dtype == torch.float32 and compute_dtype(model) == torch.float32 else 2e-2
        if not worst <= tolerance:
            return (f"preference.share_prompt: off: on this model ({impl} attention) the shared rows' reply "
                    f"log-probabilities differ from separate rows' by {worst:.1e} relative (more than {tolerance:g}); "
                    "each pair's prompt is computed twice")
        self.share = kind
        return ""

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def units(self, batch: dict[str, Any]) -> tuple[int, int]:
        """What a step's loss is divided by: (pairs, chosen reply tokens - ORPO's NLL term)."""
        pairs = int(batch["pairs"])
        chosen_labels = batch["labels"][:pairs, 1:]
        return pairs, int((chosen_labels != IGNORE).sum())

    def loss(self, model: Any, batch: dict[str, Any], device: Any, pairs_denom: float,
             tokens_denom: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss (sum of its pair losses / pairs_denom, ...) and its stats."""
        logps, counts = reply_logps(model, batch, device, self.share)
        ref = batch["ref_logps"].to(device) if self.needs_reference else None
        losses, chosen_rewards, rejected_rewards = pair_losses(self.name, self.cfg, logps, counts, ref)
        loss = losses.sum() / pairs_denom
        if self.name == "orpo":  # + the chosen replies' NLL, token-normalised over the step
            pairs = int(batch["pairs"])
            loss = loss - logps[:pairs].sum() / tokens_denom
        return loss, _stats(losses, chosen_rewards, rejected_rewards, logps, counts)

    def evaluate(self, model: Any, dataset: Any, collate: Callable, batch_size: int, *, device: Any,
                 rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Sums over this rank's share of the eval pairs (pair losses; ORPO adds its NLL per chosen token)."""
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(STAT_KEYS, 0.0) | {"nll_sum": 0.0, "chosen_tokens": 0.0}
        indices = list(range(rank, len(dataset), world_size))
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                batch = collate(rows_at(dataset, indices[start:start + batch_size]))
                logps, counts = reply_logps(model, batch, device, self.share)
                ref = batch["ref_logps"].to(device) if self.needs_reference else None
                losses, cr, rr = pair_losses(self.name, self.cfg, logps, counts, ref)
                for k, v in _stats(losses, cr, rr, logps, counts).items():
                    sums[k] += v
                pairs = int(batch["pairs"])
                sums["nll_sum"] -= float(logps[:pairs].sum())
                sums["chosen_tokens"] += float(counts[:pairs].sum())
        model.train(was_training)
        return sums

    def eval_record(self, sums: dict[str, float]) -> dict[str, float]:
        """eval_loss (the objective's loss over the eval pairs) and the reward metrics, from summed stats."""
        pairs = max(sums["pairs"], 1)
        loss = sums["loss_sum"] / pairs
        if self.name == "orpo":
            loss += sums["nll_sum"] / max(sums["chosen_tokens"], 1)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in step_metrics(sums).items()},
                "eval_pairs": int(sums["pairs"])}


def step_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means over the pairs of a step (or an evaluation): TRL's rewards/* and logps/* under flat names."""
    pairs = max(sums["pairs"], 1)
    chosen, rejected = sums["rewards_chosen"] / pairs, sums["rewards_rejected"] / pairs
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
            "reward_accuracy": sums["correct"] / pairs, "logps_chosen": sums["logps_chosen"] / pairs,
            "logps_rejected": sums["logps_rejected"] / pairs}


def _stats(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: torch.Tensor,
           counts: torch.Tensor) -> dict[str, float]:
    pc, pr = logps.detach().chunk(2)
    return {"pairs": float(len(losses)), "loss_sum": float(losses.detach().sum()),
            "rewards_chosen": float(chosen_rewards.sum()), "rewards_rejected": float(rejected_rewards.sum()),
            "correct": float((chosen_rewards > rejected_rewards).sum()),
            "logps_chosen": float(pc.sum()), "logps_rejected": float(pr.sum())}

