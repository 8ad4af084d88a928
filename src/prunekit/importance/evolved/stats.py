"""Per-class activation statistics of a group's channels, streamed over calibration batches.

Which activation is scored (the evolved functions and their seeds read feature maps *after*
the norm and the activation, what the next layer sees):

1. the input of the group's first consumer conv (groups=1) or Linear, i.e. the tensor that
   layer reads, after any norm, activation, pooling or flatten in between (conv1-out -> bn ->
   relu -> conv2 gives relu(bn(conv1(x))); a residual stream gives the summed stream; a
   conv -> flatten -> Linear group gives the H*W Linear columns of each channel);
2. else the output of the group's first producing conv/Linear (a group that only feeds the
   model's output, or a consumer that is not a plain conv/Linear);
3. else the output of a normalisation layer in the group (a group with no conv/Linear at all).

Each rule gives at most one candidate; hooks sit on all of them and the first one whose module
ran is used (a Linear inside nn.MultiheadAttention is applied functionally, never by its own
forward). The statistics keep one row per class seen, in order of arrival (memory follows the
number of classes, not the labels' values).

A channel's feature map is X_k in R^{N x D} (D = H*W for a conv input, the columns of one
channel for a Linear, 1 for a plain FC unit). Statistics kept per group, independent of N:
counts n (C,), column sums (C, K, D) and sums of squares (C, K), all float64 (sums of squares
of 50k images lose digits in float32).

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1))
>>> g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
>>> s = collect_class_stats(m, [g], [(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]))])["0"]
>>> s.colsum.shape, s.counts.tolist()
(torch.Size([2, 3, 4]), [2.0, 2.0])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.modes import evaluating
from ...graph import Group
from ..calibration import forward, labelled

WHO = "class statistics"  # how calibration errors name these criteria

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ScoringPoint:
    """Where a group's activation is read: a module's input ("input") or output ("output"),
    the channel axis of that tensor, and positions[k] = the indices along that axis of channel k."""

    module: str
    where: str
    axis: int
    positions: list[torch.Tensor]

    def channel_maps(self, t: torch.Tensor) -> torch.Tensor:
        """(N, K, D) feature maps from the hooked tensor `t`; every channel must have the same D."""
        moved = t.detach().movedim(self.axis, 1)
        per = [moved[:, p].reshape(t.shape[0], -1) for p in self.positions]
        if len({v.shape[1] for v in per}) != 1:
            raise ConfigError(f"channels read at {self.module!r} have feature maps of different sizes; "
                              "score this group with a weight criterion (l1, l2, fpgm) instead")
        return torch.stack(per, 1).double()


def _positions(channel: torch.Tensor, size: int) -> list[torch.Tensor] | None:
    pos = [(channel == k).nonzero().flatten() for k in range(size)]
    return pos if all(p.numel() > 0 for p in pos) else None


def scoring_points(model: nn.Module, group: Group) -> list[ScoringPoint]:
    """Where `group` may be read, best first (at most one per rule of the module docstring); the
    first whose module actually runs is used (a Linear inside nn.MultiheadAttention never runs
    its own forward, so its hook never fires)."""
    mods = dict(model.named_modules())
    found: list[ScoringPoint] = []

    def first(match, where, axis_of):
        for m in group.tensor_members():
            mod = mods.get(m.module)
            if match(m, mod) and (pos := _positions(m.channel, group.size)) is not None:
                return ScoringPoint(m.module, where, axis_of(mod), pos)
        return None

    conv = lambda mod: isinstance(mod, nn.modules.conv._ConvNd)
    plain = lambda mod: conv(mod) and mod.groups == 1 and not mod.transposed
    for point in (
        first(lambda m, mod: m.role == "in" and m.name == "weight" and m.dim == 1
              and (plain(mod) or isinstance(mod, nn.Linear)), "input", lambda mod: 1 if conv(mod) else -1),
        first(lambda m, mod: m.role == "out" and m.name == "weight" and (conv(mod) or isinstance(mod, nn.Linear)),
              "output", lambda mod: 1 if conv(mod) else -1),
        first(lambda m, mod: m.role == "through" and isinstance(mod, _NORMS),
              "output", lambda mod: -1 if isinstance(mod, nn.LayerNorm) else 1),
    ):
        if point is not None:
            found.append(point)
    if not found:
        raise ConfigError(f"group {group.name!r} has no conv, Linear or norm layer whose activations can be read; "
                          "score it with a weight criterion (l1, l2, fpgm) or ignore it")
    return found


def scoring_point(model: nn.Module, group: Group) -> ScoringPoint:
    """The preferred activation for `group` (see the module docstring)."""
    return scoring_points(model, group)[0]


@dataclass
class ClassStats:
    """Streamed one-vs-rest statistics of one group: counts (C,), colsum (C, K, D), sumsq (C, K)."""

    counts: torch.Tensor
    colsum: torch.Tensor
    sumsq: torch.Tensor

    @classmethod
    def empty(cls, classes: int, channels: int, d: int) -> "ClassStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        return cls(z(classes), z(classes, channels, d), z(classes, channels))

    def add(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate a batch: maps (B, K, D) float64, labels (B,) int >= 0 (C grows to fit)."""
        need = int(labels.max()) + 1 if labels.numel() else 0
        if need > self.counts.shape[0]:
            pad = need - self.counts.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])
            self.colsum = torch.cat([self.colsum, self.colsum.new_zeros(pad, *self.colsum.shape[1:])])
            self.sumsq = torch.cat([self.sumsq, self.sumsq.new_zeros(pad, self.sumsq.shape[1])])
        self.counts.index_add_(0, labels, torch.ones(labels.shape[0], dtype=torch.float64))
        self.colsum.index_add_(0, labels, maps)
        self.sumsq.index_add_(0, labels, maps.square().sum(2))

    # ---- derived one-vs-rest quantities; P = rows of class c, Q = all other rows ----
    @property
    def d(self) -> int:
        return self.colsum.shape[2]

    def present(self) -> torch.Tensor:
        """Classes that occur in the data (the authors loop over np.unique(y))."""
        return self.counts > 0

    def moments(self) -> dict[str, torch.Tensor]:
        """nP, nQ (C, 1); muP, muQ, varP, varQ (C, K) global over all entries; mP, mQ (C, K, D); mX (K, D)."""
        keep = self.present()
        _two_classes(keep.nonzero().flatten())
        n, col, sq = self.counts[keep], self.colsum[keep], self.sumsq[keep]
        total_n, total_col, total_sq = n.sum(), col.sum(0), sq.sum(0)
        d = self.d
        nP, nQ = n.unsqueeze(1), (total_n - n).unsqueeze(1)
        sP, sQ = col.sum(2), total_col.sum(1) - col.sum(2)
        qP, qQ = sq, total_sq - sq
        muP, muQ = sP / (nP * d), sQ / (nQ * d)
        return {"nP": nP, "nQ": nQ, "muP": muP, "muQ": muQ,
                "varP": (qP / (nP * d) - muP.square()).clamp(min=0), "varQ": (qQ / (nQ * d) - muQ.square()).clamp(min=0),
                "mP": col / nP.unsqueeze(2), "mQ": (total_col - col) / nQ.unsqueeze(2), "mX": total_col / total_n}


def _forward_all(model: nn.Module, hooks: list, batches: Iterable, on_labels) -> None:
    """Run every batch in eval mode with `hooks` in place, telling `on_labels(y)` each batch's labels first."""
    try:
        with torch.no_grad(), evaluating(model):
            for i, x, y in labelled(batches, WHO, labels="classes"):
                if y.numel() and int(y.min()) < 0:  # said before the forward, which would be blamed
                    raise ConfigError(f"{WHO}: calibration batch {i} holds the label {int(y.min())}; class-conditional "
                                      "criteria take class indices >= 0, one per sample")
                on_labels(y)
                forward(model, x, i, WHO)
    finally:
        for h in hooks:
            h.remove()


def _hook(model: nn.Module, point: ScoringPoint, sink):
    mod = model.get_submodule(point.module)
    if point.where == "input":
        return mod.register_forward_pre_hook(lambda _m, args: sink(point.channel_maps(args[0])))
    return mod.register_forward_hook(lambda _m, _a, out: sink(point.channel_maps(out)))


def _collect(model: nn.Module, groups: list[Group], batches: Iterable, make_sink) -> dict:
    """One pass with hooks at every candidate point of every group; name -> what the best
    candidate that ran collected. `make_sink(store)` returns a hook sink writing into `store`."""
    stores = {g.name: [(p, {}) for p in scoring_points(model, g)] for g in groups}
    labels: list[torch.Tensor] = []
    hooks = [_hook(model, p, make_sink(store, labels)) for cands in stores.values() for p, store in cands]
    _forward_all(model, hooks, batches, labels.append)
    out, missing = {}, []
    for name, cands in stores.items():
        got = next((store for _, store in cands if store), None)
        if got is None:
            missing.append(name)
        else:
            out[name] = got
    if missing:
        raise ConfigError(f"no calibration batch reached the layers of group(s) {missing}; "
                          "pass batches of (inputs, labels)")
    return out


def collect_class_stats(model: nn.Module, groups: list[Group], batches: Iterable) -> dict[str, ClassStats]:
    """One pass over `batches` ((x, y) pairs, integer labels >= 0) for all `groups`: name -> ClassStats."""
    def make_sink(store, labels):
        def sink(maps):
            y = labels[-1].long().cpu()  # >= 0: checked before the forward
            # one row per class seen, in order of arrival: a label's value (e.g. 10**7) does not size the sums
            rows = store.setdefault("rows", {})
            classes, inverse = y.unique(return_inverse=True)
            index = torch.tensor([rows.setdefault(c, len(rows)) for c in classes.tolist()])[inverse]
            if "stats" not in store:
                store["stats"] = ClassStats.empty(len(rows), maps.shape[1], maps.shape[2])
            store["stats"].add(maps.cpu(), index)
        return sink

    got = _collect(model, groups, batches, make_sink)
    for store in got.values():
        _two_classes(torch.tensor(sorted(store["rows"])))  # named by label (a row number would not say which)
    return {n: store["stats"] for n, store in got.items()}


def collect_feature_maps(model: nn.Module, groups: list[Group], batches: Iterable, max_samples: int = 256
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (maps (N, K, D) float64, labels (N,)) of the first `max_samples` calibration images.

    For functions that need raw feature maps (an evolved expression may multiply matrices), so
    memory grows with N: `max_samples` bounds it.
    """
    def make_sink(store, labels):
        def sink(m):
            maps = store.setdefault("maps", [])
            room = max_samples - sum(v.shape[0] for v in maps)
            if room > 0:
                maps.append(m[:room].cpu())
                store["labels"] = store.get("labels", []) + [labels[-1][:room].long().cpu()]
        return sink

    got = _collect(model, groups, _take(batches, max_samples), make_sink)
    out = {n: (torch.cat(s["maps"]), torch.cat(s["labels"])) for n, s in got.items()}
    for _, labels in out.values():
        _two_classes(labels.unique())
    return out


def _two_classes(classes: torch.Tensor) -> None:
    """P against Q needs a Q: with one class every statistic of the rest divides by zero."""
    if len(classes) < 2:
        raise ConfigError(f"class statistics compare each class with the rest, but the calibration batches hold "
                          f"class {classes.tolist()} only; give batches with two classes or more")


def _take(batches: Iterable, n: int):
    got = 0
    for _, x, y in labelled(batches, WHO, labels="classes"):
        if got >= n:
            return
        yield x, y
        got += len(y)
