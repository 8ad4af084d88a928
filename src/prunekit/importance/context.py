"""What a criterion may look at: `ScoreContext` (the model, optional data, settings, caches).

Data-dependent criteria read gradients (`gradients()`, summed over `batches`), Hessian-vector
products (`hessian_vector_product(v)`, the same sum of losses differentiated twice) or output
statistics of every layer (`output_stats()`). A criterion that cannot score a group the way it
is meant to and falls back to another one says so through `note_fallback`: the fallback is
recorded in `fallbacks` (methods copy it into their result metrics) and warned about once.

>>> import torch, torch.nn as nn
>>> m = nn.Linear(2, 1, bias=False); _ = m.weight.data.copy_(torch.tensor([[1.0, -1.0]]))
>>> ctx = ScoreContext(m, batches=[(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0]]))],
...                    loss_fn=lambda out, y: 0.5 * ((out - y) ** 2).sum())
>>> ctx.gradients()["weight"].tolist()  # (w.x - y) * x = -1 * [1, 2]
[[-1.0, -2.0]]
>>> ctx.hessian_vector_product({"weight": torch.tensor([[1.0, 0.0]])})["weight"].tolist()  # x x^T v
[[1.0, 2.0]]
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..core.errors import ConfigError, PrunekitWarning, PruningError
from ..core.layout import onednn_safe
from ..core.modes import SCORE_MODES, scoring
from .calibration import NEEDS_DATA, forward, labelled, loss_of


@dataclass
class ScoreContext:
    """What a criterion may look at: the model, optional data, and settings.

    `example_inputs` (what the model was traced with) lets data-free criteria such as SynFlow
    build an input of the right shape. `mode` is the mode of every forward pass over `batches`:
    "eval" (default), or "train" (BatchNorm on the batch's statistics, dropout off; every
    buffer put back afterwards: `core.modes.scoring`). `cache` holds values computed once per context and shared
    by every group (element scores, for instance).
    """

    model: nn.Module
    batches: Iterable | None = None  # iterable of (x, y); needed by data-dependent criteria
    reduction: str = "mean"
    seed: int = 0
    loss_fn: Callable = nn.functional.cross_entropy
    example_inputs: Any = None
    graph: Any = None  # the traced Graph, when known: data passes may then serve all its groups at once
    fallbacks: dict[str, str] = field(default_factory=dict)  # group -> "criterion -> other: why"
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    mode: str = "eval"  # eval | train: the mode of the forward passes over `batches`
    criterion: str = "the criterion"  # named in messages about data it asked for (a lambda says which)
    _grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _outs: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _params: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in SCORE_MODES:
            raise ConfigError(f"ScoreContext mode={self.mode!r}; choose one of {', '.join(SCORE_MODES)}")

    def parameters(self) -> dict[str, torch.Tensor]:
        """name -> parameter of the model (looked up once per context)."""
        if self._params is None:
            self._params = dict(self.model.named_parameters())
        return self._params

    def tensor(self, module: str, name: str) -> torch.Tensor:
        return getattr(self.model.get_submodule(module), name).detach()

    def require_batches(self, who: str) -> Iterable:
        if self.batches is None:
            raise ConfigError(f"criterion {who!r} needs data: {NEEDS_DATA}")
        return self.batches

    def note_fallback(self, group: str, criterion: str, used: str, why: str) -> None:
        """Record that `criterion` scored `group` with `used` instead (and warn once per reason)."""
        self.fallbacks[group] = f"{criterion} -> {used}: {why}"
        if (criterion, used, why) not in self._warned:
            self._warned.add((criterion, used, why))
            warnings.warn(f"criterion {criterion!r} fell back to {used!r} for group {group!r} ({why}); every "
                          "group that falls back is listed in the result's metrics['criterion_fallbacks']",
                          PrunekitWarning, stacklevel=3)

    def gradients(self, who: str | None = None) -> dict[str, torch.Tensor]:
        """Sum of loss gradients of every parameter over `batches` (in `mode`; computed once, cached).
        Frozen parameters (requires_grad=False) get their gradient too; their flags are kept.
        `who`: the criterion named in errors (default `self.criterion`)."""
        who = who or self.criterion
        if self._grads is None:
            params = self.parameters()
            grads = {n: torch.zeros_like(p) for n, p in params.items()}
            held = {n: p.grad for n, p in params.items()}  # the caller's own .grad, put back after
            try:
                with scoring(self.model, self.mode), _differentiable(params.values()), onednn_safe():
                    for i, x, y in labelled(self.batches, who):
                        self.model.zero_grad(set_to_none=True)
                        loss_of(self.loss_fn, forward(self.model, x, i, who), y, i, who).backward()
                        for n, p in params.items():
                            if p.grad is not None:
                                grads[n] += p.grad.detach()
            finally:
                for n, p in params.items():
                    p.grad = held[n]
            self._grads = grads
        return self._grads

    def hessian_vector_product(self, vector: dict[str, torch.Tensor], who: str | None = None) -> dict[str, torch.Tensor]:
        """H v, H the Hessian of the summed batch losses over the parameters named in `vector`.

        Only those parameters vary: the result is the block H[names, names] times v, keyed like
        `vector` (GraSP differentiates only the prunable weights). One double backward per batch:
        z_b = grad(L_b) . v, then grad(z_b) summed over batches (in `mode`, not cached).
        """
        who = who or self.criterion
        params = self.parameters()
        names = list(vector)
        missing = [n for n in names if n not in params]
        if missing:
            raise ConfigError(f"hessian_vector_product: {missing[:4]} are not parameters of the model; "
                              "key the vector by names from model.named_parameters()")
        leaves = [params[n] for n in names]
        out = {n: torch.zeros_like(p) for n, p in zip(names, leaves)}
        with (scoring(self.model, self.mode), _differentiable(leaves), _TwiceDifferentiable(), _second_derivatives(who),
              onednn_safe()):
            for i, x, y in labelled(self.batches, who):
                loss = loss_of(self.loss_fn, forward(self.model, x, i, who), y, i, who)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                terms = [(g * vector[n].to(g.dtype)).sum() for n, g in zip(names, grads) if g is not None]
                z = torch.stack(terms).sum() if terms else None
                if z is None or not z.requires_grad:
                    continue  # the loss is linear in these parameters on this batch: H v = 0
                for n, h in zip(names, torch.autograd.grad(z, leaves, allow_unused=True)):
                    if h is not None:
                        out[n] += h.detach()
        return out

    def output_stats(self) -> dict[str, torch.Tensor]:
        """Mean |output| per output channel of every conv/Linear over `batches` (one pass, cached)."""
        if self._outs is None:
            sums: dict[str, torch.Tensor] = {}
            count = [0]

            def hook(name, conv):
                def record(_m, _inp, out):
                    ch = 1 if conv else out.dim() - 1
                    v = out.detach().abs().movedim(ch, -1).reshape(-1, out.shape[ch]).mean(0)
                    sums[name] = sums.get(name, 0) + v
                return record

            handles = [m.register_forward_hook(hook(n, isinstance(m, nn.modules.conv._ConvNd)))
                       for n, m in self.model.named_modules()
                       if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            try:
                with torch.no_grad(), scoring(self.model, self.mode):
                    for i, x, _ in labelled(self.batches, "activation", labels="ignored"):
                        forward(self.model, x, i, "activation")
                        count[0] += 1
            finally:
                for h in handles:
                    h.remove()
            self._outs = {n: v / max(count[0], 1) for n, v in sums.items()}
        return self._outs


class _TwiceDifferentiable(torch.overrides.TorchFunctionMode):
    """Runs `F.hardsigmoid` (MobileNetV3's and GhostNet's gates) as relu6(x + 3) / 6, the same
    function, whose backward autograd can differentiate again (hardsigmoid's cannot)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.hardsigmoid:
            x, inplace = args[0], (args[1] if len(args) > 1 else kwargs.get("inplace", False))
            y = torch.nn.functional.relu6(x + 3) / 6
            return x.copy_(y) if inplace else y
        return func(*args, **kwargs)


@contextlib.contextmanager
def _second_derivatives(who: str) -> Iterator[None]:
    """A PruningError naming the op when autograd cannot differentiate the model twice."""
    try:
        yield
    except RuntimeError as err:
        if "derivative for" not in str(err) or "not implemented" not in str(err):
            raise
        raise PruningError(f"{who} needs second derivatives of the loss (a Hessian-vector product), and this model "
                           f"runs an op PyTorch cannot differentiate twice ({err}); score it with snip or synflow, "
                           "or replace that op") from None


def refuse_inference_mode(what: str) -> None:
    """ConfigError inside torch.inference_mode(), where no gradient can be taken (torch.no_grad()
    is fine: the scores turn autograd back on)."""
    if torch.is_inference_mode_enabled():
        raise ConfigError(f"{what} needs autograd, which torch.inference_mode() turns off for good: call it outside "
                          "that block (inside torch.no_grad() is fine); the model was left as it was")


@contextlib.contextmanager
def _differentiable(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block every tensor of `params` requires grad (frozen ones too) and autograd is on;
    afterwards each tensor's requires_grad flag as it was."""
    refuse_inference_mode("scoring with gradients")
    held = [(p, p.requires_grad) for p in params]
    try:
        with torch.enable_grad():
            for p, _ in held:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in held:
            p.requires_grad_(flag)
