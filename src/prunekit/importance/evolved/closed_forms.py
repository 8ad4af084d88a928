"""Closed forms of the evolved pruning functions and of the seven hand-made seed metrics.

Every function scores channel k as a sum over classes c of a one-vs-rest expression of
P_c (the rows of X_k with label c), Q_c (the other rows), their global (all-entry) means
mu_P, mu_Q and variances var_P, var_Q, their counts n_P, n_Q, the column means mX (D,),
mQ (D,) and, for the weight seeds, the channel's incoming filter WI. "Sum over d" means
the authors' `np.sum(scalar + vector)`, so a scalar term is counted D times; that factor D
is kept (Eq. 3 included). Higher score = keep.

Inputs are `ClassStats.moments()`: shapes (C, K) for the scalars, (C, K, D) for mP/mQ and
(K, D) for mX, C = classes present, K = channels. Output (K,).

>>> import torch
>>> from prunekit.importance.evolved.stats import ClassStats
>>> s = ClassStats.empty(2, 1, 3); s.add(torch.rand(6, 1, 3, dtype=torch.float64), torch.tensor([0, 1] * 3))
>>> ga_func2(s.moments()).shape
torch.Size([1])
"""
from __future__ import annotations

import torch

Moments = dict[str, torch.Tensor]


def _sym_var_ratio(m: Moments, eps: float) -> torch.Tensor:
    return m["varP"] / (m["varQ"] + eps) + m["varQ"] / (m["varP"] + eps)


def ga_func1(m: Moments) -> torch.Tensor:
    """Sum_c Sum_d [var_P + (var_Q - mX_d)^2 / (var_Q + var_P + 0.05)]."""
    d = m["mX"].shape[1]
    frac = (m["varQ"].unsqueeze(2) - m["mX"]).square().sum(2) / (m["varQ"] + m["varP"] + 0.05)
    return (d * m["varP"] + frac).sum(0)


def ga_func2(m: Moments) -> torch.Tensor:
    """Paper Eq. 3: Sum_c [D (var_P/(var_Q+.05) + var_Q/(var_P+.05))
    + Sum_d (std(mX) var_Q mX_d + var_P - mu_Q)^2 / (var_Q + var_P + .05)]."""
    d = m["mX"].shape[1]
    s_x = m["mX"].std(1, unbiased=False)  # (K,)
    inner = s_x * m["varQ"]  # (C, K)
    num = (inner.unsqueeze(2) * m["mX"] + (m["varP"] - m["muQ"]).unsqueeze(2)).square().sum(2)
    return (d * _sym_var_ratio(m, 0.05) + num / (m["varQ"] + m["varP"] + 0.05)).sum(0)


def ga_func3(m: Moments) -> torch.Tensor:
    """Sum_c Sum_d (mX_d - var_Q)^2 / sqrt(var_P/n_P + var_Q/n_Q + 1e-4)."""
    num = (m["mX"] - m["varQ"].unsqueeze(2)).square().sum(2)
    return (num / (m["varP"] / m["nP"] + m["varQ"] / m["nQ"] + 1e-4).sqrt()).sum(0)


def ga_func4(m: Moments) -> torch.Tensor:
    """Sum_c Sum_d [var_P/(var_Q/n_Q + .05) + |mu_P - mu_Q| + .05 + mQ_d] (mQ: the rest's centroid)."""
    d = m["mX"].shape[1]
    scal = m["varP"] / (m["varQ"] / m["nQ"] + 0.05) + (m["muP"] - m["muQ"]).abs() + 0.05
    return (d * scal + m["mQ"].sum(2)).sum(0)


def abs_snr(m: Moments) -> torch.Tensor:
    """Sum_c |mu_P - mu_Q| / (std_P + std_Q + 1e-4)."""
    return ((m["muP"] - m["muQ"]).abs() / (m["varP"].sqrt() + m["varQ"].sqrt() + 1e-4)).sum(0)


def fdr(m: Moments) -> torch.Tensor:
    """Fisher discriminant ratio: Sum_c (mu_P - mu_Q)^2 / (var_P + var_Q + 1e-4)."""
    return ((m["muP"] - m["muQ"]).square() / (m["varP"] + m["varQ"] + 1e-4)).sum(0)


def sym_div(m: Moments) -> torch.Tensor:
    """Symmetric divergence: Sum_c var_P/(var_Q+.05) + var_Q/(var_P+.05) + (mu_P-mu_Q)^2/(var_P+var_Q+.05)."""
    return (_sym_var_ratio(m, 0.05) + (m["muP"] - m["muQ"]).square() / (m["varP"] + m["varQ"] + 0.05)).sum(0)


def t_stat(m: Moments) -> torch.Tensor:
    """Two-sample t statistic: Sum_c |mu_P - mu_Q| / sqrt(var_P/n_P + var_Q/n_Q + 1e-4)."""
    return ((m["muP"] - m["muQ"]).abs() / (m["varP"] / m["nP"] + m["varQ"] / m["nQ"] + 1e-4).sqrt()).sum(0)


def filter_l1(filters: torch.Tensor) -> torch.Tensor:
    """Sum |WI| per channel; filters (K, F), one incoming filter per row."""
    return filters.abs().sum(1)


def filter_l2(filters: torch.Tensor) -> torch.Tensor:
    """sqrt(Sum WI^2) per channel."""
    return filters.square().sum(1).sqrt()


def filter_geo_median(filters: torch.Tensor) -> torch.Tensor:
    """||WI - W_gm|| where W_gm is the filter with the least summed distance to all others."""
    gm = torch.cdist(filters, filters).sum(1).argmin()
    return (filters - filters[gm]).square().sum(1).sqrt()


# name -> (function of moments, one-line description); these need calibration data
STAT_FUNCTIONS = {
    "ga_func1": ga_func1, "ga_func2": ga_func2, "ga_func3": ga_func3, "ga_func4": ga_func4,
    "abs_snr": abs_snr, "fdr": fdr, "sym_div": sym_div, "t_stat": t_stat,
}
# name -> function of the (K, F) incoming filters; data-free
FILTER_FUNCTIONS = {"seed_l1": filter_l1, "seed_l2": filter_l2, "seed_geo_median": filter_geo_median}
