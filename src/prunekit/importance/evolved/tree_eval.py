"""Evaluate an expression tree: a stack walker over DEAP nodes (no compile, no eval).

`channel_scores` applies a tree the authors' way: for each channel k and each class c present,
f(P_c, Q_c, N_c, X_k, mX, mP_c, mQ_c, WI_k, W), summed over classes. `EvolvedCriterion` makes a
text expression a criterion of the core pruner (`criterion: "evolved:<expression>"`); it reads
the raw feature maps of the first `max_samples` calibration images (an expression may multiply
matrices, so streamed sums are not enough), at the point `stats.scoring_point` documents.

>>> import numpy as np
>>> from prunekit.importance.evolved.text import parse_expression
>>> maps, labels = np.arange(12.).reshape(6, 1, 2), np.array([0, 1, 0, 1, 0, 1])
>>> channel_scores(parse_expression("sub(g_mean(P), g_mean(Q))"), maps, labels, np.ones((1, 3))).tolist()
[0.0]
"""
from __future__ import annotations

import time

import numpy as np
import torch
from deap import gp

from ...core.errors import ConfigError
from ...graph import Group
from ..context import ScoreContext
from .space import OPS, EvalError
from .stats import collect_feature_maps
from .text import expression_text, parse_expression

_ERRORS = (ArithmeticError, ValueError, TypeError, IndexError, np.linalg.LinAlgError, MemoryError)


def evaluate_tree(tree: gp.PrimitiveTree, env: dict, deadline: float | None = None):
    """Value of `tree` with terminals bound by `env` (name -> value); EvalError when it has none.
    `deadline` (time.monotonic()) bounds the time: checked between operators."""
    stack: list = []
    with np.errstate(all="ignore"):
        for node in reversed(tree):
            if node.arity == 0:
                stack.append(env[node.format()])
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise EvalError("time limit exceeded")
            args = [stack.pop() for _ in range(node.arity)]
            try:
                stack.append(OPS[node.name][0](*args))
            except EvalError:
                raise
            except _ERRORS as err:
                raise EvalError(f"{node.name}: {type(err).__name__}: {str(err)[:120]}") from None
    return stack[0]


def channel_scores(tree: gp.PrimitiveTree, maps: np.ndarray, labels: np.ndarray, filters: np.ndarray,
                   deadline: float | None = None) -> np.ndarray:
    """Score every channel: maps (N, K, D), labels (N,), filters (K, F) -> (K,) finite scores."""
    classes = np.unique(labels)
    masks = [labels == c for c in classes]
    out = np.empty(maps.shape[1])
    for k in range(maps.shape[1]):
        x = maps[:, k, :]
        env = {"X": x, "mX": x.mean(0), "WI": filters[k], "W": filters}
        total = 0.0
        for mask in masks:
            p, q = x[mask], x[~mask]
            env.update(P=p, Q=q, N=len(p), mP=p.mean(0), mQ=q.mean(0) if len(q) else np.zeros(x.shape[1]))
            total = total + np.sum(evaluate_tree(tree, env, deadline))
        if not np.isfinite(total) or np.ndim(total) != 0:
            raise EvalError(f"channel {k} has no finite score ({total!r})")
        out[k] = total
    return out


class EvolvedCriterion:
    """A criterion from an expression text; the text is parsed (not evaluated) on construction."""

    def __init__(self, text: str, max_samples: int = 256, time_limit_s: float | None = None):
        self.tree = parse_expression(text)
        self.text = expression_text(self.tree)
        self.max_samples = max_samples
        self.time_limit_s = time_limit_s  # for all groups together, counted from the first call
        self._deadline: float | None = None
        self.__doc__ = f"evolved function {self.text}"

    def __repr__(self) -> str:
        return f"EvolvedCriterion({self.text!r})"

    def __call__(self, group: Group, ctx: ScoreContext) -> torch.Tensor:
        from .shipped import incoming_filters

        maps, labels = self._maps(group, ctx)
        try:
            filters = incoming_filters(group, ctx).numpy()
        except ConfigError:
            filters = np.zeros((group.size, 1))
        if self.time_limit_s is not None and self._deadline is None:
            self._deadline = time.monotonic() + self.time_limit_s
        try:
            scores = channel_scores(self.tree, maps, labels, filters, self._deadline)
        except EvalError as err:
            raise ConfigError(f"evolved function {self.text!r} has no finite score on group {group.name!r} ({err}); "
                              "use another function or criterion") from None
        return torch.from_numpy(scores).float()

    def _maps(self, group: Group, ctx: ScoreContext) -> tuple[np.ndarray, np.ndarray]:
        cache = ctx.cache.setdefault(f"evolved_feature_maps:{self.max_samples}", {})
        if group.name not in cache:
            batches = ctx.require_batches("evolved")
            groups = ctx.graph.prunable_groups() if ctx.graph is not None else [group]
            if group.name not in {g.name for g in groups}:
                groups = [group]
            cache.update(collect_feature_maps(ctx.model, groups, batches, self.max_samples))
        maps, labels = cache[group.name]
        return maps.numpy(), labels.numpy()


def create_evolved_criterion(text: str) -> EvolvedCriterion:
    """Factory for the `evolved:` criterion prefix."""
    return EvolvedCriterion(text)
