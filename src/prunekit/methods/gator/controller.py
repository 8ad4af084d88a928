"""Reaching a requested fraction: lambda control during training, budgeted masking, final search.

Three pieces, each a plain function or a small object:

1. `LambdaController`: the fraction of the target metric that remains falls along a planned
   line, 1 -> target over the first `ramp` of gated training. Every update, log(lambda) moves by
   gain * 10 / (tolerance * steps) * (current - planned), at most `max_move` per step (ln 2 per
   momentum time constant of the logits, 1 / (1 - 0.9) = 10 steps, by default): a persistent
   lag of one tolerance multiplies lambda by e^(gain/2) every 5% of the run; running ahead
   lowers it the same way. The hook feeds it the mean of the fraction a conversion would give
   now (logits >= 0) and the expected one (sigmoid of the logits): the first only moves when
   logits cross 0, the second moves as soon as they fall, so lambda does not wind up while the
   logits travel from 5.3 to 0.
2. `mask_within_budget`: logits below 0 switch channels off for good, lowest logit first, but
   never below the target: the extra ones stay merely unlikely (they may recover).
3. `final_masks`: after training, channels are closed in order of rising logit until the
   fraction is nearest the target (bisection over how many). With a fixed lambda instead of a
   target, the threshold is 0: open iff active and logit >= 0.
4. `rounded_masks`: open widths rounded to a multiple jointly with the target, by the core's
   `importance.rounding.round_to_target` with the logits as importance: each group starts at
   its nearest multiple, then whole multiples close where the least logit is lost per unit of
   the target measure, and are given back while the target holds. The hook rounds once, when
   the run settles (hook.py), so that the rest of gated training trains the rounded network;
   after training (a run that never settled) it rounds again, reopening only channels the final
   search closed (the network trained with them), never one switched off during training (it
   trained on without it). Rounding each group on its own after
   training and then closing channels by logit could miss the target or close channels whose
   gates were still fully open (a ResNet-20 run closed 47 after the rounding went over the MACs
   budget), and any rounding after training costs accuracy before fine-tuning (the digits CNN
   lost 8-17 points to 4 closed channels; a ResNet-20 fell to 33%).

>>> c = LambdaController(target=0.5, tolerance=0.03, total_steps=100, lam=1.0, ramp=0.5)
>>> c.planned(0), c.planned(25), c.planned(80)
(1.0, 0.75, 0.5)
>>> c.update(step=25, fraction=0.9) > 1.0
True
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ...importance.select import smaller_multiple

Masks = list  # list[torch.Tensor] of bool, one per gated group
Fraction = Callable[[Masks], float]


class LambdaController:
    """Integral control of log(lambda) toward a linearly falling planned fraction."""

    def __init__(self, target: float, tolerance: float, total_steps: int, lam: float,
                 ramp: float = 0.7, gain: float = 1.0, lam_range: tuple[float, float] = (1e-6, 1e6),
                 max_move: float = 0.07):
        self.target, self.tolerance, self.ramp, self.gain = target, tolerance, ramp, gain
        self.max_move = max_move
        self.total_steps = max(int(total_steps), 1)
        self.lam, self.lam_range = float(lam), lam_range
        self.history: list[tuple[int, float, float, float]] = []  # step, fraction, planned, lambda

    def planned(self, step: int) -> float:
        progress = min(step / (self.ramp * self.total_steps), 1.0)
        return 1.0 - (1.0 - self.target) * progress

    def update(self, step: int, fraction: float, every: int = 1) -> float:
        """Move lambda after `every` steps at `fraction`; returns the new lambda."""
        gap = fraction - self.planned(step)
        rate = self.gain * 10.0 / (self.tolerance * self.total_steps)
        move = max(min(rate * gap, self.max_move), -self.max_move) * every
        lo, hi = self.lam_range
        self.lam = min(max(self.lam * math.exp(move), lo), hi)
        self.history.append((step, fraction, self.planned(step), self.lam))
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.history = float(state["lam"]), [tuple(h) for h in state["history"]]


def logit_travel(theta0: float, temperature: float = 1.0, points: int = 200) -> float:
    """Integral of d(theta) / E[ds/dtheta] from 0 to theta0: steps x (step size) to reach 0.

    Under the scaled auxiliary loss alone, a logit moves by lr * gamma * lambda * E[ds/dtheta] per
    step (the channel's cost cancels against its cost-scaled learning rate), with s the sigmoid
    of the noisy logit. E[ds/dtheta] is 0.017 at theta = 5.3 and 0.167 at 0, so the logit
    accelerates; for theta0 = 5.293 and T = 1 this integral is about 93.
    """
    q = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    noise = torch.log(q) - torch.log1p(-q)  # logistic quantiles: a deterministic expectation
    thetas = torch.linspace(0.0, theta0, points + 1, dtype=torch.float64)
    mid = (thetas[1:] + thetas[:-1]) / 2
    s = torch.sigmoid((mid[:, None] + noise[None, :]) / temperature)
    slope = (s * (1 - s)).mean(dim=1) / temperature
    return float(((thetas[1:] - thetas[:-1]) / slope).sum())


def initial_lambda(theta0: float, lr_sum: float, gamma: float, momentum: float, temperature: float = 1.0) -> float:
    """The lambda that brings an unresisted logit from theta0 to 0 within a learning-rate budget.

    lr_sum is the sum of the logits' learning rates over the steps allowed (the ramp); momentum
    multiplies a steady step by 1 / (1 - momentum). The task loss resists, so the controller
    raises lambda from there as needed.
    """
    return logit_travel(theta0, temperature) * (1.0 - momentum) / (gamma * max(lr_sum, 1e-12))


def mask_within_budget(logits: list[torch.Tensor], active: list[torch.Tensor], prunable: list[torch.Tensor],
                       fraction: Fraction | None, target: float | None) -> int:
    """Switch off (in place in `active`) channels whose logit is < 0; returns how many.

    Without a target all of them go. With one, they go lowest logit first while the fraction
    with the switched-off channels closed stays >= target.
    """
    logits = [t.detach() for t in logits]
    cands = [(float(t[c]), i, int(c)) for i, t in enumerate(logits)
             for c in ((t < 0) & active[i] & prunable[i]).nonzero().flatten().tolist()]
    if not cands:
        return 0
    cands.sort()

    def closed(k: int) -> Masks:
        masks = [~p | a for a, p in zip(active, prunable)]
        masks = [m.clone() for m in masks]
        for _, i, c in cands[:k]:
            masks[i][c] = False
        return masks

    k = len(cands)
    if target is not None and fraction is not None and fraction(closed(k)) < target:
        lo, hi = 0, k  # fraction(closed(lo)) >= target > fraction(closed(hi))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fraction(closed(mid)) >= target else (lo, mid)
        k = lo
    for _, i, c in cands[:k]:
        active[i][c] = False
    return k


def final_masks(logits: list[torch.Tensor], active: list[torch.Tensor], prunable: list[torch.Tensor],
                fraction: Fraction, target: float | None) -> tuple[Masks, dict]:
    """The open channels to keep, and a report: threshold, fraction reached, channels closed."""
    logits = [t.detach() for t in logits]
    base = [~p | a for a, p in zip(active, prunable)]
    order = sorted((float(t[c]), i, int(c)) for i, t in enumerate(logits)
                   for c in (active[i] & prunable[i]).nonzero().flatten().tolist())

    def masks_at(k: int) -> Masks:
        masks = [b.clone() for b in base]
        for _, i, c in order[:k]:
            masks[i][c] = False
        return masks

    if target is None:
        k = sum(1 for theta, _, _ in order if theta < 0)
    elif fraction(masks_at(0)) <= target:
        k = 0
    else:
        lo, hi = 0, len(order)  # fraction(lo) > target; find the first k with fraction <= target
        if fraction(masks_at(hi)) > target:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fraction(masks_at(mid)) > target else (lo, mid)
        k = hi if abs(fraction(masks_at(hi)) - target) <= abs(fraction(masks_at(lo)) - target) else lo
    masks = masks_at(k)
    threshold = order[k - 1][0] if k > 0 else None
    return masks, {"closed_by_threshold": k, "threshold": threshold, "fraction": fraction(masks),
                   "masked_before": int(sum(int((~a & p).sum()) for a, p in zip(active, prunable)))}


def rounded_within(masks: Masks, logits: list[torch.Tensor], prunable: list[torch.Tensor], fraction: Fraction,
                   budget: float, multiple: int, graph, names: list[str], **kwargs) -> tuple[Masks, dict]:
    """`rounded_masks`, with the multiple halved (down to 2) while the rounded widths cannot get
    within `budget` (multiples of 48 on 32- and 64-wide layers kept 0.56 of the MACs for a 0.5
    target); the report says which multiple was asked for and which was used."""
    asked = multiple
    while True:
        out, info = rounded_masks(masks, logits, prunable, fraction, budget, multiple, graph, names, **kwargs)
        if info["fraction"] <= budget + 1e-12 or multiple <= 2:
            return out, {**info, "asked": asked}
        multiple = smaller_multiple(multiple)


def rounded_masks(masks: Masks, logits: list[torch.Tensor], prunable: list[torch.Tensor], fraction: Fraction,
                  budget: float, multiple: int, graph, names: list[str], reopen: bool = False,
                  trained: Masks | None = None) -> tuple[Masks, dict]:
    """Open widths of `masks` rounded to multiples of `multiple` (halved below narrow groups' widths)
    with fraction <= `budget`, jointly (see the module doc); groups closed entirely stay closed.
    Closed channels are reopened (highest logit first) with `reopen` (while training goes on, on
    settling); after training, with `trained` (the channels the network trained with), a group
    may reopen up to as many channels as it trained with, never a channel switched off in training.
    `graph` holds the gated groups under `names`. Returns the masks and a report."""
    from ...importance.rounding import round_to_target

    closed = {n: (~m & p).nonzero().flatten().tolist() for n, m, p in zip(names, masks, prunable)}
    live = [n for n, m, p in zip(names, masks, prunable) if bool((m & p).any())]
    cut = {n: closed[n] for n in names if n not in live}  # cut branches: nothing to round
    at = {n: i for i, n in enumerate(names)}

    def to_masks(removal) -> Masks:
        out = [torch.ones_like(p) for p in prunable]
        for n, idx in removal.items():
            if len(idx):
                out[at[n]][torch.as_tensor(idx, dtype=torch.long)] = False
        return out

    scores = {n: logits[at[n]].detach().float() for n in live}
    if trained is not None and not reopen:  # a channel switched off in training ranks below every other: never reopened
        scores = {n: torch.where(trained[at[n]].bool(), t, t.min() - 1e6) for n, t in scores.items()}
    res = round_to_target(graph, scores, {n: closed[n] for n in live}, multiple,
                          lambda removal: fraction(to_masks({**cut, **removal})), budget, max_ratio=1.0,
                          normalizer="none", nearest=True, best_effort=True,
                          max_kept=None if reopen else {n: int((trained or masks)[at[n]].sum()) for n in live})
    out = to_masks({**cut, **res.removal})
    closed_now = sum(int((a & ~b).sum()) for a, b in zip(masks, out))
    return out, {"multiple": multiple, "budget": budget, "fraction": fraction(out), "closed": closed_now,
                 "reopened": sum(int((~a & b).sum()) for a, b in zip(masks, out)), "picks": res.picks}
