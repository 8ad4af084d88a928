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

import re
import time

import numpy as np
import torch
from deap import gp

from ...core.errors import ConfigError
from ...graph import Group
from ..context import ScoreContext
from .space import OPS, TERMINALS, EvalError
from .stats import collect_feature_maps
from .text import expression_text, parse_expression

_ERRORS = (ArithmeticError, ValueError, TypeError, IndexError, np.linalg.LinAlgError, MemoryError)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# Terminals that do not change with the class (P, Q, N, mP, mQ do), and with the channel either (W).
_PER_CHANNEL = frozenset({"X", "mX", "WI", "W"})
_PER_GROUP = frozenset({"W"})


class _Reuse:
    """Which subtrees of a tree can be computed once per group or once per channel.

    `channel_scores` evaluates a tree for every (channel, class) pair; a subtree that reads only W
    (e.g. geo_median(W), a medoid over all filters) has the same value for all of them, and one that
    reads only X, mX, WI and W the same value for every class of a channel. `store[i]` is 0 (keep
    node i's value for the group), 1 (for the channel) or None; only the largest such subtrees are
    kept. `ends[i]` is where node i's subtree ends in the prefix list.
    """

    def __init__(self, tree: gp.PrimitiveTree):
        n = len(tree)
        ends, reads, stack = [0] * n, [frozenset()] * n, []
        for i in reversed(range(n)):
            node = tree[i]
            if node.arity == 0:
                name = node.format()
                reads[i], ends[i] = frozenset({name} if name in TERMINALS else ()), i + 1
            else:
                kids = [stack.pop() for _ in range(node.arity)]
                reads[i], ends[i] = frozenset().union(*(reads[k] for k in kids)), ends[kids[-1]]
            stack.append(i)
        level = [0 if r <= _PER_GROUP else 1 if r <= _PER_CHANNEL else 2 for r in reads]
        parent_level = [3] * n
        for i in range(n):
            j = i + 1
            for _ in range(tree[i].arity):
                parent_level[j] = level[i]
                j = ends[j]
        self.ends = ends
        self.store = [level[i] if tree[i].arity and level[i] < 2 and parent_level[i] > level[i] else None
                      for i in range(n)]


def evaluate_tree(tree: gp.PrimitiveTree, env: dict, deadline: float | None = None,
                  reuse: _Reuse | None = None, caches: tuple[dict, dict] | None = None):
    """Value of `tree` with terminals bound by `env` (name -> value); EvalError when it has none.
    `deadline` (time.monotonic()) bounds the time: checked between operators. With `reuse` and
    `caches` (a per-group and a per-channel dict, node index -> value), a subtree whose value is
    already in a cache is read from it instead of computed, and new values of reusable subtrees
    are put there."""
    if reuse is None or caches is None:
        order = range(len(tree))
    else:  # the prefix list with every cached subtree collapsed to its root
        order, i = [], 0
        while i < len(tree):
            order.append(i)
            level = reuse.store[i]
            i = reuse.ends[i] if level is not None and i in caches[level] else i + 1
    stack: list = []
    with np.errstate(all="ignore"):
        for i in reversed(order):
            node = tree[i]
            level = reuse.store[i] if caches is not None and reuse is not None else None
            if level is not None and i in caches[level]:
                stack.append(caches[level][i])
                continue
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
            if level is not None:
                caches[level][i] = stack[-1]
    return stack[0]


def channel_scores(tree: gp.PrimitiveTree, maps: np.ndarray, labels: np.ndarray, filters: np.ndarray,
                   deadline: float | None = None) -> np.ndarray:
    """Score every channel: maps (N, K, D), labels (N,), filters (K, F) -> (K,) finite scores.
    Subtrees that do not depend on the class (or on the channel) are computed once per channel
    (or once per group): the same values, without repeating e.g. a medoid over all filters."""
    classes = np.unique(labels)
    masks = [labels == c for c in classes]
    out = np.empty(maps.shape[1])
    reuse, per_group = _Reuse(tree), {}
    for k in range(maps.shape[1]):
        x = maps[:, k, :]
        env = {"X": x, "mX": x.mean(0), "WI": filters[k], "W": filters}
        caches = (per_group, {})
        total = 0.0
        for mask in masks:
            p, q = x[mask], x[~mask]
            env.update(P=p, Q=q, N=float(len(p)), mP=p.mean(0), mQ=q.mean(0) if len(q) else np.zeros(x.shape[1]))
            total = total + np.sum(evaluate_tree(tree, env, deadline, reuse, caches))
        # past float32's range a score turns inf where the pruner ranks it (in float32)
        if not np.isfinite(total) or np.ndim(total) != 0 or abs(total) > _FLOAT32_MAX:
            shown = float(total) if np.ndim(total) == 0 else f"an array of shape {np.shape(total)}"
            raise EvalError(f"channel {k} has no finite score in float32 ({shown})")
        out[k] = total
    return out


DEFAULT_SAMPLES = 256  # calibration images an `evolved:` criterion reads unless told


class EvolvedCriterion:
    """A criterion from an expression text; the text is parsed (not evaluated) on construction."""

    def __init__(self, text: str, max_samples: int = DEFAULT_SAMPLES, time_limit_s: float | None = None):
        self.tree = parse_expression(text)
        self.text = expression_text(self.tree)
        self.max_samples = max_samples
        self.time_limit_s = time_limit_s  # for all groups together, counted from the first call
        self._deadline: float | None = None
        self.__doc__ = f"evolved function {self.text}"

    def __repr__(self) -> str:
        more = "" if self.max_samples == DEFAULT_SAMPLES else f", max_samples={self.max_samples}"
        return f"EvolvedCriterion({self.text!r}{more})"

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


_SAMPLES = re.compile(r"\s*samples\s*=\s*([^:]*):(.*)", re.DOTALL)


def create_evolved_criterion(text: str) -> EvolvedCriterion:
    """Factory for the `evolved:` criterion prefix: `evolved:<text>` reads the first 256
    calibration images, `evolved:samples=<n>:<text>` the first n (what a search with
    calib_samples=n scored)."""
    found = _SAMPLES.fullmatch(text)
    if found is None:
        return EvolvedCriterion(text)
    n = found.group(1).strip()
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"evolved:samples={n}: the number of calibration images must be a whole number >= 1, "
                          "as in 'evolved:samples=512:<text>'")
    return EvolvedCriterion(found.group(2), int(n))


def criterion_spec(text: str, samples: int) -> str:
    """The criterion that scores as a search with calib_samples=`samples` did."""
    return f"evolved:{text}" if samples == DEFAULT_SAMPLES else f"evolved:samples={samples}:{text}"
