"""SLR / ADMM config, and which weights it prunes (layer selection) with what projection.

>>> cfg = SLRConfig(sparsity=0.7, epochs=2)
>>> cfg.optimization, cfg.rho, cfg.initial_s, cfg.M, cfg.r
('slr', 0.1, 0.01, 300, 0.1)
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Union

from torch import Tensor, nn

from ...core.config import Config, check_choice, check_range, check_unused
from ...core.errors import ConfigError, PruningError
from ...importance.targets import check_not_shared, target_weights
from ...surgery.masks import get_mask
from ...surgery.projections import PROJECTIONS, conv_layout, global_irregular_masks, projection_mask, transposed_groups

__all__ = ["SLRConfig", "ProjectionSpec", "resolve_targets"]

# Kinds whose sparsity is fixed by the kind itself (nm: 1 - n/m; pattern: 4/9).
FIXED_SPARSITY_KINDS = ("nm", "pattern")


@dataclass
class SLRConfig(Config):
    """SLR (surrogate Lagrangian relaxation) or its ADMM baseline; defaults from the reference code.

    optimization:   "slr" (adaptive step s and accept/reject checks) or "admm" (U += W - Z).
    sparsity_type:  a projection kind (surgery.projections.PROJECTIONS).
    sparsity:       float in [0, 1) for every selected layer, or {module name: float}; must be
                    None for "nm" (1 - n/m) and "pattern" (4/9).
    layers:         module names or fnmatch patterns whose `weight` is pruned; None = every
                    Conv1d/2d/3d except the first one in definition order (the reference pruned
                    all convs but the stem; it also left out 1x1 shortcut convs, which only
                    exist in some ResNets); for "pattern" only the 3x3 ones, for "nm" only those whose
                    inputs per group divide into runs of m (not depthwise convs). Must be None
                    when `sparsity` is a dict.
    scope:          "layer" (each tensor projected alone) or "global" (irregular only: one
                    magnitude threshold across all selected tensors).
    n, m:           N:M group for sparsity_type "nm".
    rho, initial_s, M, r: penalty weight, initial SLR step, and the alpha^k schedule
                    alpha = 1 - 1/(M k^(1 - 1/k^r)).
    epochs:         training epochs with the penalty; admm_every: epochs between Z/U updates.
    clone_previous: True keeps consistent SLR bookkeeping: W_prev is a clone and the loss f
                    compared in the checks belongs to the stored iterate. False reproduces the
                    reference code: W_prev aliases the live weights (so ||W_prev - Z_prev|| =
                    ||W - Z_prev|| and check 1 reduces to a loss comparison), and f_prev is the
                    previous update's loss.
    recalibrate_bn, recalibrate_batches: recompute BN statistics after hard pruning.
    retrain_epochs: masked retraining epochs after hard pruning (fresh optimizer).
    """

    optimization: str = "slr"
    sparsity_type: str = "irregular"
    sparsity: Union[float, dict, None] = None
    layers: Union[list, None] = None
    scope: str = "layer"
    n: int = 2
    m: int = 4
    rho: float = 0.1
    initial_s: float = 0.01
    M: float = 300
    r: float = 0.1
    epochs: int = 100
    admm_every: int = 1
    clone_previous: bool = True
    recalibrate_bn: bool = False
    recalibrate_batches: int = 50
    retrain_epochs: int = 0

    def validate(self) -> None:
        check_choice("optimization", self.optimization, ("slr", "admm"))
        check_choice("sparsity_type", self.sparsity_type, PROJECTIONS.list())
        check_choice("scope", self.scope, ("layer", "global"))
        self._validate_sparsity()
        if self.layers is not None:
            if isinstance(self.sparsity, dict):
                raise ConfigError("give either layers with a float sparsity, or a {module: sparsity} dict, not both")
            if not isinstance(self.layers, (list, tuple)) or not self.layers or not all(
                isinstance(x, str) for x in self.layers
            ):
                raise ConfigError(f"layers={self.layers!r} must be a non-empty list of module names or patterns")
        if self.scope == "global" and (self.sparsity_type != "irregular" or isinstance(self.sparsity, dict)):
            raise ConfigError("scope='global' needs sparsity_type='irregular' and one float sparsity")
        for name in ("n", "m", "epochs", "admm_every", "recalibrate_batches", "retrain_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name}={v!r} must be an integer")
        if not 1 <= self.n < self.m:
            raise ConfigError(f"n={self.n}, m={self.m}: N:M needs 1 <= n < m (e.g. 2 and 4)")
        if self.sparsity_type != "nm" and (self.n, self.m) != (2, 4):
            raise ConfigError(f"n={self.n}, m={self.m} apply only to sparsity_type='nm' (this config has "
                              f"{self.sparsity_type!r}); set sparsity_type='nm' or leave n and m out")
        check_range("rho", self.rho, 0.0, float("inf"), lo_open=True)
        if self.optimization == "admm":
            check_unused(self, ("initial_s", "M", "r", "clone_previous"),
                         "with optimization='admm' (they set SLR's step size and its bookkeeping)")
        check_range("initial_s", self.initial_s, 0.0, float("inf"), lo_open=True)
        check_range("M", self.M, 1.0, float("inf"))
        check_range("r", self.r, 0.0, float("inf"), lo_open=True)
        check_range("epochs", self.epochs, 0, float("inf"))
        check_range("admm_every", self.admm_every, 1, float("inf"))
        check_range("recalibrate_batches", self.recalibrate_batches, 1, float("inf"))
        check_range("retrain_epochs", self.retrain_epochs, 0, float("inf"))

    def check_model(self, model: nn.Module, example_inputs=None) -> None:
        targets = resolve_targets(model, self)
        if example_inputs is not None and self.sparsity_type == "filter":
            _check_filters_removable(model, [t.rsplit(".", 1)[0] for t in targets], example_inputs)

    def _validate_sparsity(self) -> None:
        s = self.sparsity
        if self.sparsity_type in FIXED_SPARSITY_KINDS:
            if s is not None:
                fixed = "1 - n/m" if self.sparsity_type == "nm" else "4/9"
                raise ConfigError(
                    f"sparsity_type {self.sparsity_type!r} fixes the sparsity at {fixed}; set sparsity to null"
                )
            return
        if s is None:
            raise ConfigError(
                f"sparsity_type {self.sparsity_type!r} needs sparsity: a float in [0, 1) or {{module: float}}"
            )
        values = s.values() if isinstance(s, dict) else [s]
        if isinstance(s, dict) and (not s or not all(isinstance(k, str) for k in s)):
            raise ConfigError("a sparsity dict must map module names (strings) to floats and not be empty")
        for v in values:
            check_range("sparsity", v, 0.0, 1.0, hi_open=True)


@dataclass
class ProjectionSpec:
    """What to project: {param name: sparsity or None}, the kind, scope and kind options.

    `transposed` maps the weights stored (in, out / groups, ...), as transposed convs hold them, to
    their groups: they are projected in a conv's layout (out, in / groups, ...), so filters are
    output channels and N:M runs go along the inputs for them too.

    `masks(tensors)` maps {param name: tensor} to {param name: bool mask}; `project` to W * mask.
    """

    kind: str
    sparsities: dict = field(default_factory=dict)
    scope: str = "layer"
    options: dict = field(default_factory=dict)
    transposed: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: SLRConfig, targets: dict, model: nn.Module | None = None) -> "ProjectionSpec":
        options = {"n": config.n, "m": config.m} if config.sparsity_type == "nm" else {}
        transposed = {} if model is None else {n: g for n in targets if (g := transposed_groups(model, n))}
        return cls(config.sparsity_type, dict(targets), config.scope, options, transposed)

    def masks(self, tensors: dict) -> dict:
        missing = sorted(set(self.sparsities) - set(tensors))
        if missing:
            raise PruningError(f"no tensor given for {', '.join(missing)}")
        names = list(self.sparsities)
        if self.scope == "global":
            sparsity = next(iter(self.sparsities.values()))
            return dict(zip(names, global_irregular_masks([tensors[n] for n in names], sparsity)))
        return {n: self._mask(n, tensors[n]) for n in names}

    def _mask(self, name: str, w: Tensor) -> Tensor:
        groups = self.transposed.get(name)
        if groups is None:
            return projection_mask(w, self.kind, self.sparsities[name], **self.options)
        mask = projection_mask(conv_layout(w, groups), self.kind, self.sparsities[name], **self.options)
        return conv_layout(mask, groups)

    def project(self, tensors: dict) -> dict:
        masks = self.masks(tensors)
        return {n: tensors[n] * masks[n] for n in masks}


def _check_filters_removable(model: nn.Module, layers: list[str], example_inputs) -> None:
    """ConfigError for a layer whose filters are channels the model must keep (its outputs, or
    channels an op fixes): filter sparsity there zeroes them (a classifier's classes), and the
    channel removal that follows cannot take them out, so training grows them back."""
    from ...graph import build_graph

    graph = build_graph(model, example_inputs)
    removable = set()
    for group in graph.groups:
        for m in group.members:
            if m.name == "weight" and m.dim == 0 and m.role == "out" and bool(group.prunable[m.channel[m.channel >= 0]].any()):
                removable.add(m.module)
    kept = [n for n in layers if n not in removable]
    if kept:
        raise ConfigError(f"filter sparsity on {', '.join(map(repr, kept[:3]))}: its filters are channels the model "
                          "must keep (its outputs, such as a classifier's classes, or channels an op fixes), which "
                          "filter pruning would zero and cannot remove; leave it out of layers, or use an "
                          "unstructured sparsity_type")


def _default_layers(model: nn.Module, kind: str, m: int = 4) -> list[str]:
    """Every conv but the first; for 'pattern' the 3x3 ones, for 'nm' those whose inputs per group
    come in runs of m (a depthwise conv's single input cannot)."""
    convs = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if len(convs) < 2:
        raise ConfigError(
            f"the model has {len(convs)} conv layer(s) and the default skips the first; name the layers to prune"
        )
    fits = {"pattern": lambda mod: tuple(mod.kernel_size) == (3, 3), "nm": lambda mod: mod.weight.shape[1] % m == 0}
    chosen = [n for n, mod in convs[1:] if fits.get(kind, lambda mod: True)(mod)]
    if not chosen:
        need = "a 3x3 kernel for 'pattern'" if kind == "pattern" else f"inputs per group in runs of m={m} for 'nm'"
        raise ConfigError(f"no conv but the first has {need}; name the layers to prune")
    return chosen


def _match_layers(model: nn.Module, patterns: list) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"layer {pat!r} matches no module; module names look like {names[:5]}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def resolve_targets(model: nn.Module, config: SLRConfig) -> dict:
    """{"<module>.weight": sparsity} for the layers the config selects, checked against the model."""
    if isinstance(config.sparsity, dict):
        layers = _match_layers(model, list(config.sparsity))
        ratio = {}
        for pat, v in config.sparsity.items():  # a later, more specific entry overrides
            for n in _match_layers(model, [pat]):
                ratio[n] = v
    else:
        layers = (_default_layers(model, config.sparsity_type, config.m) if config.layers is None
                  else _match_layers(model, config.layers))
        ratio = {n: config.sparsity for n in layers}
    targets = {}
    for name in layers:
        w = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ConfigError(f"layer {name!r} has no floating-point weight to prune; leave it out of layers")
        targets[f"{name}.weight"] = ratio[name]
    try:  # a mask kept per name would untie a tied weight, or zero what another module reads whole
        check_not_shared(model, target_weights(model, list(targets)), leave_out="a `layers` list without {module}")
    except PruningError as err:
        raise ConfigError(str(err)) from None
    spec = ProjectionSpec.from_config(config, targets, model)
    weights = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in layers}
    try:  # fail now, with the layer named, rather than at the first Z-update
        masks = spec.masks(weights)
    except PruningError as err:
        odd = [n for n in layers if config.sparsity_type == "nm" and weights[f"{n}.weight"].dim() > 1
               and weights[f"{n}.weight"].shape[1] % config.m]
        which = (f" (layer(s) {', '.join(odd[:3])} take their inputs per group in runs not divisible by m={config.m}: "
                 "leave them out of layers)") if odd else ""
        raise ConfigError(f"sparsity_type {config.sparsity_type!r} cannot be applied: {err}{which}") from None
    try:  # a layer an earlier method masked: refused before training, not after it
        check_masks_only_grow(model, masks)
    except PruningError as err:
        raise ConfigError(str(err)) from None
    return targets


def check_masks_only_grow(model: nn.Module, masks: dict) -> None:
    """PruningError when a new mask ({param name: bool mask}) keeps a weight that the `Mask` the
    model already holds on it hides: replacing that mask would bring the weight back."""
    for pname, keep in masks.items():
        mname, _, attr = pname.rpartition(".")
        held = get_mask(model.get_submodule(mname), attr)
        if held is None:
            continue
        hidden = ~held.expand(keep.shape)
        revived = int((keep & hidden).sum())
        if revived:
            raise PruningError(f"{pname}: the new mask would bring back {revived:,} of the {int(hidden.sum()):,} "
                               "weights its mask already hides: masks only grow. Ask for a higher sparsity, or bake "
                               "the masks first (prunekit.bake_masks_) to start again from the baked weights")
