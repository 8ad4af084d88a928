"""SLR and ADMM updates as plain functions on {param name: tensor} dicts.

Both methods minimise f(W) + Σ_l (ρ/2)||W_l - Z_l + U_l||² over W by SGD (the penalty is added
to the loss every step), with Z_l in the sparsity set S_l and scaled multipliers U = Λ/ρ.
Once per `admm_every` epochs they update Z and U; they differ only there:

- ADMM: Z ← Π_S(W + U); U ← U + W - Z, every time (Λ moves by ρ(W - Z)).
- SLR: two multiplier steps Λ ← Λ + s (W - Z) (U += (s/ρ)(W - Z)), each taken only if a
  surrogate optimality check passes, with an adaptive step
  s ← α_k s Σ_l||W_prev - Z_prev|| / Σ_l||W - Z||, α_k = 1 - 1/(M k^(1 - 1/k^r)).

`slr_update` follows the reference code's order (S10 slr/admm.py `z_u_update`): check 1 with
the old Z, multiplier step 1, Z-step, check 2, multiplier step 2; k grows by one per accepted
step, the first check is forced (k == 1), and Z is replaced whatever check 2 says. W_prev,
Z_prev and f_prev hold the last accepted point.

>>> round(alpha(1, 300, 0.1), 5), round(alpha(10, 300, 0.1), 5)
(0.99667, 0.99792)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import ProjectionSpec

__all__ = [
    "SLRState",
    "alpha",
    "penalty",
    "lagrangian",
    "norm_sum",
    "relative_residual",
    "step_size",
    "multiplier_step",
    "check_w_step",
    "check_z_step",
    "init_state",
    "slr_update",
    "admm_update",
]

Tensors = dict  # {param name: Tensor}


def alpha(k: int, M: float, r: float) -> float:
    """α_k = 1 - 1/(M · k^(1 - 1/k^r)), the geometric decay of SLR's step size."""
    return 1.0 - 1.0 / (M * k ** (1.0 - 1.0 / k**r))


def penalty(W: Tensors, Z: Tensors, U: Tensors, rho: float) -> Tensor:
    """Σ_l (ρ/2)||W_l - Z_l + U_l||²_F as a differentiable scalar (gradient ρ(W - Z + U))."""
    total = None
    for name, w in W.items():
        term = (w - Z[name] + U[name]).pow(2).sum()
        total = term if total is None else total + term
    return total * (rho / 2)


def _sq(t: Tensor) -> float:
    return float(t.detach().double().pow(2).sum())


def lagrangian(f: float, W: Tensors, Z: Tensors, U: Tensors, rho: float) -> float:
    """f + Σ(ρ/2)||W - Z + U||² - Σ(ρ/2)||U||², i.e. f + tr(Λᵀ(W - Z)) + (ρ/2)||W - Z||².

    The reference adds +Σ(ρ/2)||U||² instead; both checks compare points with the same U, so
    the sign does not change any decision.
    """
    pen = sum(_sq(W[n] - Z[n] + U[n]) for n in W)
    mult = sum(_sq(U[n]) for n in W)
    return f + rho / 2 * (pen - mult)


def norm_sum(A: Tensors, B: Tensors) -> float:
    """Σ_l ||A_l - B_l||_F: a sum of per-layer Frobenius norms, as in the step-size rule."""
    return sum(math.sqrt(_sq(A[n] - B[n])) for n in A)


def relative_residual(W: Tensors, Z: Tensors) -> float:
    """||W - Z|| / ||W|| over all layers taken as one vector (0 when W is all zero)."""
    num = sum(_sq(W[n] - Z[n]) for n in W)
    den = sum(_sq(W[n]) for n in W)
    return math.sqrt(num / den) if den > 0 else 0.0


def step_size(s: float, a: float, n_prev: float, n_new: float) -> float:
    """s ← α s n_prev / n_new; unchanged when either norm is 0 (as the reference guards)."""
    if n_prev == 0 or n_new == 0:
        return s
    return a * s * n_prev / n_new


def multiplier_step(U: Tensors, W: Tensors, Z: Tensors, s: float, rho: float) -> Tensors:
    """Λ ← Λ + s(W - Z) written for U = Λ/ρ: U + (s/ρ)(W - Z), as new tensors."""
    return {n: U[n] + (s / rho) * (W[n] - Z[n]) for n in U}


def check_w_step(f_new: float, f_old: float, W: Tensors, W_prev: Tensors, Z: Tensors, U: Tensors, rho: float) -> bool:
    """Surrogate check 1: L(W, Z, Λ) < L(W_prev, Z, Λ)."""
    return lagrangian(f_new, W, Z, U, rho) < lagrangian(f_old, W_prev, Z, U, rho)


def check_z_step(f_new: float, f_old: float, W: Tensors, Z_new: Tensors, Z_prev: Tensors, U: Tensors, rho: float) -> bool:
    """Surrogate check 2: L(W, Z_new, Λ) < L(W, Z_prev, Λ) (f_old = f_new in the clean form)."""
    return lagrangian(f_new, W, Z_new, U, rho) < lagrangian(f_old, W, Z_prev, U, rho)


@dataclass
class SLRState:
    """Everything SLR/ADMM carries between updates; tensors keyed by parameter name.

    Z and U are owned by the state and replaced, never edited in place, so Z_prev may share
    tensors with an old Z. W_prev is a clone of the weights unless the state reproduces the
    reference's aliasing (clone_previous=False), where it *is* the live weights.
    """

    spec: ProjectionSpec
    Z: Tensors
    U: Tensors
    W_prev: Tensors
    Z_prev: Tensors
    s: float
    k: int = 1
    f_prev: float | None = None  # loss at W_prev (clean bookkeeping)
    f_last: float | None = None  # loss at the previous update (reference bookkeeping)
    aliased: bool = False  # W_prev is the live weights (reference behaviour)
    history: list = field(default_factory=list)

    def multipliers(self, rho: float) -> Tensors:
        """Λ = ρU (only U is stored)."""
        return {n: rho * u for n, u in self.U.items()}

    def to(self, device: Any) -> "SLRState":
        """Move Z, U, Z_prev (and W_prev unless it aliases the weights) to `device`; returns self."""
        names = ("Z", "U", "Z_prev") if self.aliased else ("Z", "U", "Z_prev", "W_prev")
        for d in names:
            setattr(self, d, {n: t.to(device) for n, t in getattr(self, d).items()})
        return self


def _keep(W: Tensors, clone: bool) -> Tensors:
    return {n: (w.detach().clone() if clone else w.detach()) for n, w in W.items()}


def init_state(W: Tensors, spec: ProjectionSpec, initial_s: float, clone_previous: bool = True) -> SLRState:
    """Z⁰ = Π_S(W⁰), U⁰ = 0, s⁰ = initial_s, W_prev = W⁰, Z_prev = Z⁰, k = 1.

    (The reference starts W_prev and Z_prev at zero, which makes its first multiplier step
    s·W instead of s·(W - Z⁰); that is not reproduced.)
    """
    W0 = {n: w.detach() for n, w in W.items()}
    Z = spec.project(W0)
    U = {n: torch.zeros_like(w) for n, w in W0.items()}
    state = SLRState(spec, Z, U, _keep(W0, clone_previous), dict(Z), float(initial_s))
    state.aliased = not clone_previous
    return state


def slr_update(state: SLRState, W: Tensors, f: float, rho: float, M: float, r: float) -> dict:
    """One SLR outer iteration at the current weights W with task-loss value f.

    Mutates `state` (never W) and returns what happened: accepted_w, accepted_z, s, k, alpha.
    With `state.aliased` (reference behaviour) W must be the live weights (detached views).
    """
    clone_previous = not state.aliased
    W = {n: w.detach() for n, w in W.items()}
    a1 = alpha(state.k, M, r)
    n_prev, n_new = norm_sum(state.W_prev, state.Z_prev), norm_sum(W, state.Z_prev)
    f_old = state.f_prev if clone_previous else state.f_last
    ok_w = state.k == 1 or check_w_step(f, f_old, W, state.W_prev, state.Z_prev, state.U, rho)
    if ok_w:  # Eq. 5: Λ^{k+1/2} = Λ^k + s (W^{k+1} - Z^k)
        state.k += 1
        state.s = step_size(state.s, a1, n_prev, n_new)
        state.U = multiplier_step(state.U, W, state.Z_prev, state.s, rho)
        state.W_prev, state.Z_prev, state.f_prev = _keep(W, clone_previous), state.Z, f

    Z_new = state.spec.project({n: W[n] + state.U[n] for n in W})
    n_prev, n_new = norm_sum(state.W_prev, state.Z_prev), norm_sum(W, Z_new)
    # Same W on both sides: in the clean form f cancels; the reference compares f with the
    # previous update's f (before any update there is none, and f is compared with itself).
    f_old = f if clone_previous or state.f_last is None else state.f_last
    ok_z = check_z_step(f, f_old, W, Z_new, state.Z_prev, state.U, rho)
    a2 = alpha(state.k, M, r)
    if ok_z:  # Eq. 7: Λ^{k+1} = Λ^{k+1/2} + s (W^{k+1} - Z^{k+1})
        state.k += 1
        state.s = step_size(state.s, a2, n_prev, n_new)
        state.U = multiplier_step(state.U, W, Z_new, state.s, rho)
        state.W_prev, state.Z_prev, state.f_prev = _keep(W, clone_previous), Z_new, f
    state.Z = Z_new
    state.f_last = f
    info = {"accepted_w": int(ok_w), "accepted_z": int(ok_z), "s": state.s, "k": state.k, "alpha": a1}
    state.history.append(info)
    return info


def admm_update(state: SLRState, W: Tensors) -> dict:
    """One ADMM outer iteration: Z ← Π_S(W + U); U ← U + W - Z (unconditional, step ρ on Λ)."""
    W = {n: w.detach() for n, w in W.items()}
    state.Z = state.spec.project({n: W[n] + state.U[n] for n in W})
    state.U = {n: state.U[n] + W[n] - state.Z[n] for n in W}
    state.k += 1
    info = {"k": state.k}
    state.history.append(info)
    return info
