"""Structured sparse convolutions (SSC): convert a model's k x k convs to `SSCConv2d` layers.

`prune_(model, SSCConfig(reduction=4), example)` traces the model, takes every conv the trace
runs with a square odd kernel > 1, no groups, zero padding, channel counts the preset divides and
a weight that only its own forward reads, and replaces it by an SSC layer (fresh Kaiming weights with the real fan-in, or the conv's own
taps on the support with init="project"). The first conv (the stem) stays dense unless
keep_first=False; Linear classifiers are never touched.

Presets: give groups / spatial_period / point_period explicitly, or a target `reduction` of the
converted layers' weights (default 4); `PRESETS` maps 2, 4, 8, 16 to a preset per `family`
("het": HetConv-style, a larger spatial period first, groups only beyond 4x; "grouped": groups of
HetConv P=2 layers; "block": 1x1 taps on half the group), other targets take the nearest preset
(`preset_for`). The table with whole-model counts is in docs/ssc.md.
A layer the preset does not divide (16 channels and groups x spatial_period = 32, say) takes the
preset with the same point_period and pattern whose layer reduction is nearest (`fit_preset`), or
stays dense with fallback=False; the result's metrics list both kinds.

`execution` chooses how the converted layers run (the same function either way): "structured"
(grouped k x k + grouped 1x1 over a channel permutation: only the real taps), "masked" (one dense
conv on the masked weight), or "auto": both timed interleaved on the `latency` settings
(LatencyConfig fields; default CPU, float32, batch 1, 1 thread) and the faster kept, with both
times in `metrics["execution"]`. Which is faster depends on device and widths (docs/ssc.md).

The plan records every converted layer with its preset and execution (plan.meta["replay"]["ssc"];
`save_pruned` writes the executions the model runs then); `load_pruned` replays it on a freshly
built model through a registered replay step, then loads the weights.

>>> import torch, torch.nn as nn
>>> from prunekit.methods import prune_
>>> m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
>>> r = prune_(m, SSCConfig(groups=1, spatial_period=4), torch.randn(1, 3, 8, 8))
>>> type(m[2]).__name__, sorted(r.plan.meta["replay"]["ssc"]["layers"])
('SSCConv2d', ['2'])
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..core.config import Config, check_choice
from ..core.errors import ConfigError, PruningError
from ..core.modules import torch_pruned
from ..core.names import within
from ..cost.latency import LatencyConfig, compare_latency, latency_settings
from ..cost.macs import count_cost
from ..graph import build_graph
from ..importance.targets import tied_parameters
from ..layers.ssc import EXECUTIONS, SSCConv2d, from_conv, set_execution_
from ..layers.ssc_patterns import SUPPORTS, SSCLayout, SSCSpec
from ..surgery.copying import adopt_, share_copy
from ..surgery.plan import empty_plan
from ..surgery.verify import run_model
from .result import PruneResult

# family -> {reduction: (groups, spatial_period, point_period)}; 3x3 full-pattern layer reductions:
# het 1.8x 4.5x 9x 18x; grouped 1.8x 3.6x 7.2x 14.4x; block 2x 3.6x 7.2x 14.4x (docs/ssc.md)
PRESETS = {
    "het": {2: (1, 2, 1), 4: (1, 8, 1), 8: (2, 8, 1), 16: (4, 8, 1)},      # HetConv first, groups last
    "grouped": {2: (1, 2, 1), 4: (2, 2, 1), 8: (4, 2, 1), 16: (8, 2, 1)},  # groups of HetConv P=2
    "block": {2: (1, 2, 2), 4: (1, 4, 2), 8: (2, 4, 2), 16: (4, 4, 2)},    # 1x1 taps on half the group
}
FAMILIES = {"het": (1,), "grouped": (1,), "block": (2,)}


@dataclasses.dataclass
class SSCConfig(Config):
    """Structured sparse convolutions: every eligible k x k conv becomes an SSCConv2d with a preset."""

    reduction: float | None = None      # target weight reduction of the converted layers (default 4)
    family: str = "het"
    groups: int | None = None           # an explicit preset instead of `reduction`
    spatial_period: int | None = None   # with groups: 1 groupwise, P > 1 HetConv-style, 0 pointwise (1x1 taps)
    point_period: int = 1
    pattern: str = "full"
    keep_first: bool = True
    fallback: bool = True               # a layer the preset does not divide takes the nearest preset that fits
    ignore: list[str] = dataclasses.field(default_factory=list)
    init: str = "kaiming"
    execution: str = "structured"       # or "masked", or "auto": the faster of the two, measured
    latency: dict = dataclasses.field(default_factory=dict)  # LatencyConfig fields for execution="auto"

    def validate(self) -> None:
        check_choice("family", self.family, FAMILIES)
        check_choice("pattern", self.pattern, SUPPORTS.list())
        check_choice("init", self.init, ("kaiming", "project"))
        check_choice("execution", self.execution, EXECUTIONS + ("auto",))
        latency_settings(self.latency)
        explicit = self.groups is not None or self.spatial_period is not None
        if explicit and self.reduction is not None:
            raise ConfigError("give either reduction (e.g. 4 for 4x fewer weights in the converted layers) or an "
                              "explicit preset (groups, spatial_period, point_period), not both")
        if not explicit and self.point_period != 1:  # the reduction's preset would drop it silently
            raise ConfigError(f"point_period={self.point_period!r} belongs to an explicit preset: give groups and "
                              "spatial_period with it (and reduction=null), or family='block' for 1x1 taps on half "
                              "the group")
        if self.reduction is not None and (isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float))
                                           or self.reduction <= 1):
            raise ConfigError(f"reduction={self.reduction!r} must be a number > 1 (2, 4, 8, 16 ...)")
        if self.groups is not None and self.spatial_period is None:  # SSCSpec would read None as pointwise
            raise ConfigError(f"groups={self.groups!r} needs spatial_period too: 1 for a groupwise conv (k x k taps "
                              "on every channel of a group), P > 1 for HetConv-style k x k taps on 1/P of them, "
                              "0 for a pointwise layer (1x1 taps only)")
        if explicit:
            self.spec()  # validates the preset

    def spec(self) -> SSCSpec:
        if self.groups is None and self.spatial_period is None:
            return preset_for(self.reduction if self.reduction is not None else 4.0, self.family, self.pattern)
        spatial = None if self.spatial_period == 0 else self.spatial_period  # 0: pointwise, SSCSpec's None
        return SSCSpec(self.groups if self.groups is not None else 1, spatial, self.point_period, self.pattern)


def layer_reduction(spec: SSCSpec, kernel_size: int = 3) -> float:
    """Dense weights / real weights of a layer with this preset (channel counts do not matter
    once divisible: measured on a square layer of the first width >= 128 that the preset's
    groups and periods divide, 128 for every table preset)."""
    unit = spec.groups * math.lcm(spec.spatial_period or 1, spec.point_period or 1)
    c = unit * -(-128 // unit)
    lay = SSCLayout(c, c, kernel_size, spec)
    return c * c * kernel_size ** 2 / float(lay.real_taps_per_filter().sum())


def preset_for(reduction: float, family: str = "het", pattern: str = "full") -> SSCSpec:
    """The table's preset for 2, 4, 8, 16 with the full pattern; otherwise (another reduction, or a
    cross or checker pattern, which keeps fewer taps than the table's presets were chosen for) the
    preset with `family`'s point_period whose 3x3 layer reduction with `pattern` is nearest
    `reduction` (log scale), fewer groups first on ties."""
    if pattern == "full" and reduction in PRESETS[family]:
        return SSCSpec(*PRESETS[family][int(reduction)], pattern)
    best = None
    for g in (1, 2, 4, 8):
        for ps in (2, 4, 8, 16):
            for pp in FAMILIES[family]:
                if ps % pp or pp == ps:
                    continue
                spec = SSCSpec(g, ps, pp, pattern)
                key = (round(abs(math.log(layer_reduction(spec) / reduction)), 9), g, ps, pp)
                best = min(best, (key, spec), key=lambda t: t[0]) if best else (key, spec)
    return best[1]


def fit_preset(spec: SSCSpec, in_channels: int, out_channels: int) -> SSCSpec | None:
    """`spec` if it fits the layer, else the fitting preset (same point_period and pattern, a
    spatial period > 1 if spec's is) whose 3x3 reduction is nearest, fewer groups first on ties;
    None if nothing fits."""
    if spec.spatial_period is None or spec.fits(in_channels, out_channels) is None:
        return spec
    goal, best = layer_reduction(spec), None
    for g in (1, 2, 4, 8, 16):
        for ps in (1, 2, 4, 8, 16):
            if ps % spec.point_period or (ps == 1) != (spec.spatial_period == 1):
                continue  # keep the kind of layer: HetConv-type stays HetConv-type
            cand = SSCSpec(g, ps, spec.point_period, spec.pattern)
            if cand.fits(in_channels, out_channels) is None and (g, ps) != (1, 1):
                key = (round(abs(math.log(layer_reduction(cand) / goal)), 9), g, ps)
                best = (key, cand) if best is None or key < best[0] else best
    return best[1] if best else None


def _convertible(conv: nn.Module) -> str | None:
    """None if `conv` is a conv an SSC layer can replace (whatever its channel counts), else why not."""
    if parametrize.is_parametrized(conv):
        return "its weight is parametrized (a mask, say); remove the parametrization before converting"
    if torch_pruned(conv):
        return ("pruned with torch.nn.utils.prune (its weight is computed from weight_orig * weight_mask); "
                "make that pruning permanent (torch.nn.utils.prune.remove) before converting")
    if type(conv) is not nn.Conv2d:
        return "not an nn.Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] < 3 or k[0] % 2 == 0:
        return f"kernel {k} (needs a square odd kernel > 1)"
    if conv.groups != 1:
        return f"a grouped conv (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (needs zero padding)"
    return None


def _eligible(conv: nn.Module, spec: SSCSpec) -> str | None:
    """None if `conv` can become an SSC layer with `spec`, else why not."""
    why = _convertible(conv)
    return why if why is not None else spec.fits(conv.in_channels, conv.out_channels)


def _conv_order(model: nn.Module, example_inputs: Any, ignore: list[str]) -> tuple[list[str], dict[str, str]]:
    """Names of the modules whose conv2d ops the trace runs, in execution order; and {name: the
    module that also reads its weight or bias outside the conv's own forward}."""
    graph = build_graph(model, example_inputs, ignore)
    modules = dict(model.named_modules())
    names: list[str] = []
    outside: dict[str, str] = {}
    for node in graph.nodes:
        for owner in {q.rpartition(".")[0] for q in node.params} - {node.module}:
            outside.setdefault(owner, node.module)
        if node.op != "conv2d":
            continue
        if isinstance(modules.get(node.module or ""), nn.Conv2d):
            name = node.module  # the conv that runs (a tied weight's second holder too; a computed weight)
        elif node.params:
            name = node.params[0].rpartition(".")[0]  # a functional conv on a layer's weight
        else:
            continue  # a functional conv on a fixed kernel (a blur, say) is no layer to convert
        if name not in names:
            names.append(name)
    return names, outside


def _why_none(model: nn.Module, skipped: dict[str, str], dense: dict[str, str]) -> str:
    """Why no conv was converted, for the error message: each reason once with its convs (at most
    3 named), design reasons (1x1, the stem) last."""
    reasons = {**skipped, **dense}
    already = [n for n, m in model.named_modules() if isinstance(m, SSCConv2d)]
    by_reason: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by_reason.setdefault(why, []).append(name or "the model")
    # reasons SSC has by design (1x1 convs, the stem) last, the rest by count: on a depthwise
    # network the grouped 3x3s are what matters
    order = sorted(by_reason.items(), key=lambda kv: (kv[0].startswith(("a 1x1 conv", "the first conv")), -len(kv[1])))
    parts = [f"{names[0]}: {why}" if len(names) == 1 else
             f"{why} ({len(names)} convs: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for why, names in order[:6]]
    if len(order) > 6:
        parts.append(f"and {sum(len(v) for _, v in order[6:])} more for other reasons")
    if already:
        parts.append(f"{len(already)} layer(s) are SSC layers already ({', '.join(already[:4])}"
                     f"{', ...' if len(already) > 4 else ''}): start from the dense model to convert again")
    return "; ".join(parts) or "the model runs no 2-D convolution"


def _shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """module name -> the other modules holding the same tensor (tied weights)."""
    shared: dict[str, list[str]] = {}
    for names in tied_parameters(model):
        modules = [n.rpartition(".")[0] for n in names]
        for m in modules:
            shared[m] = [o for o in modules if o != m]
    return shared


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_(model: nn.Module, layers: dict[str, SSCSpec], init: str = "kaiming", execution: str = "structured") -> None:
    """Replace each named nn.Conv2d of `model` by an SSC layer with its preset (in place)."""
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        conv = modules.get(name)
        why = "no such module" if conv is None else _eligible(conv, spec)
        if why is not None:
            raise PruningError(f"cannot convert layer {name!r} to SSC: {why}")
        _replace(model, name, from_conv(conv, spec, init, execution))


def _take_over(conv: nn.Conv2d, layer: SSCConv2d) -> None:
    """`layer`, which replaced the caller's `conv`, keeps its forward/backward hooks (the same
    dicts, so the caller's handles still remove them) and its frozen weights."""
    layer.__dict__.update({k: v for k, v in conv.__dict__.items()
                           if k.startswith(("_forward_", "_backward_")) or k == "_is_full_backward_hook"})
    for pname, p in layer.named_parameters(recurse=False):
        source = conv.bias if pname == "bias" else conv.weight
        p.requires_grad_(source.requires_grad)


def ssc_prune_(model: nn.Module, cfg: SSCConfig, example_inputs: Any) -> PruneResult:
    spec = cfg.spec()
    names, outside = _conv_order(model, example_inputs, cfg.ignore)  # build_graph refuses ignore names the model lacks
    skipped: dict[str, str] = {}  # convs never meant for conversion: named only when nothing converts
    if cfg.keep_first and names:
        skipped[names[0]] = "the first conv is kept dense (keep_first=True)"
        names = names[1:]
    modules = dict(model.named_modules())
    shared = _shared_weights(model)
    chosen, dense, refit = {}, {}, {}
    for name in names:
        conv = modules[name]
        if within(name, cfg.ignore) or getattr(conv, "kernel_size", None) == (1, 1):
            skipped[name] = "in ignore" if within(name, cfg.ignore) else "a 1x1 conv (never converted)"
            continue
        if not name:
            dense[name] = ("the model itself is this conv; SSC replaces submodules: wrap it (nn.Sequential(conv)) "
                           "or build the layer with prunekit.layers.ssc.from_conv")
            continue
        if name in shared:  # converting one holder would untie the weight and add parameters
            dense[name] = f"shares its weight with {', '.join(shared[name])}"
            continue
        if name in outside:  # an SSC layer has no `weight` to read
            user = f"'{outside[name]}'" if outside[name] else "the model itself"
            dense[name] = f"its weight is also read outside its own forward (by {user})"
            continue
        why = _eligible(conv, spec)
        alt = fit_preset(spec, conv.in_channels, conv.out_channels) if why and cfg.fallback else None
        if alt is not None and _eligible(conv, alt) is None:
            chosen[name], refit[name] = alt, alt.to_dict()
        elif why:
            dense[name] = why
        else:
            chosen[name] = spec
    if not chosen:
        raise PruningError(f"no conv of this model can take the SSC preset {spec.to_dict()}: {_why_none(model, skipped, dense)}")
    before = count_cost(model, example_inputs, cfg.ignore)
    work = share_copy(model)
    convert_(work, chosen, cfg.init, "structured" if cfg.execution == "auto" else cfg.execution)
    try:
        run_model(work, example_inputs)
    except AttributeError as err:  # e.g. x.to(self.conv.weight.dtype): an SSC layer has no .weight
        if "'SSCConv2d' object has no attribute" not in str(err):
            raise
        attribute = str(err).rpartition(" ")[2]
        raise PruningError(f"the model's forward reads {attribute} of a conv SSC converts (an SSC layer keeps its "
                           "weights as weight_kxk and weight_1x1, and has no such attribute): keep that conv dense "
                           f"with ignore=[...] (converted: {', '.join(list(chosen)[:6])}"
                           f"{', ...' if len(chosen) > 6 else ''}); the model was left unchanged") from None
    execution = {"choice": cfg.execution}
    if cfg.execution == "auto":
        execution = choose_execution(work, example_inputs, latency_settings(cfg.latency))
        set_execution_(work, execution["choice"])
    after = count_cost(work, example_inputs, cfg.ignore)
    # no channels removed; `ignore` is recorded so that a load traces the model as this pruning did
    # (a module left out for an op without a rule), and a composed plan's removal takes its own
    plan = empty_plan(example_inputs, cfg.ignore)
    plan.meta["replay"] = {"ssc": {"layers": {n: s.to_dict() for n, s in chosen.items()},
                                   "execution": execution["choice"]}}
    plan.meta.update({"method": "ssc", "config": cfg.to_dict()})
    plan.stamp(dense=model, pruned=work)
    adopt_(model, work)
    for name in chosen:
        _take_over(modules[name], model.get_submodule(name))
    metrics = {"preset": spec.to_dict(), "layer_reduction": layer_reduction(spec), "converted": sorted(chosen),
               "refitted": refit, "left_dense": dense, "execution": execution}
    return PruneResult(plan, before, after, cfg.to_dict(), metrics)


def choose_execution(model: nn.Module, example_inputs: Any, cfg: LatencyConfig) -> dict[str, Any]:
    """Time `model` with its SSC layers structured and masked (interleaved, on `cfg`); returns
    {"choice": the faster, "structured_ms", "masked_ms", settings}. `model` is not changed."""
    from ..cost.latency_model import per_sample_inputs

    twins = {}
    for execution in EXECUTIONS:
        twins[execution] = copy.deepcopy(model)
        set_execution_(twins[execution], execution)
    results = compare_latency(twins, per_sample_inputs(example_inputs, cfg.batch_size), cfg).results
    ms = {name: r.median_ms for name, r in results.items()}
    return {"choice": min(ms, key=ms.get), **{f"{name}_ms": t for name, t in ms.items()},
            "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch_size, "threads": cfg.threads}


from . import ssc_replay  # noqa: E402,F401  (registers the plan replay step; needs convert_ above)

from . import register_method  # noqa: E402

register_method("ssc", SSCConfig, ssc_prune_)

__all__ = ["SSCConfig", "convert_", "layer_reduction", "preset_for", "ssc_prune_", "SSCConv2d"]
