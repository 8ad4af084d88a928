"""Replaying an SSC conversion recorded in a plan (plan.meta["replay"]["ssc"]): the entry is
checked against the freshly built model before anything changes, applied after the plan's channel
removal, merged when plans compose, and described as the model runs when it is saved."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..layers.ssc import EXECUTIONS, SSCConv2d
from ..layers.ssc_patterns import SSCSpec
from ..surgery.plan import register_replay_step
from .ssc import _convertible, _eligible, convert_

_SPEC_KEYS = {"groups", "spatial_period", "point_period", "pattern", "version"}


def _spec_from_meta(name: Any, raw: Any) -> SSCSpec:
    if not isinstance(name, str) or not isinstance(raw, dict) or set(raw) - _SPEC_KEYS:
        raise CheckpointError(f"plan's SSC entry {name!r} is malformed ({raw!r}); re-export the model with prunekit")
    for key in ("groups", "spatial_period", "point_period"):
        v = raw.get(key)
        if not (v is None and key == "spatial_period") and (isinstance(v, bool) or not isinstance(v, int)):
            raise CheckpointError(f"plan's SSC entry {name!r}: {key}={v!r} is not an integer")
    try:
        return SSCSpec.from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(f"plan's SSC entry {name!r} is invalid: {err}") from None


def _check_entry(model: nn.Module, graph: Any, plan: Any, entry: Any) -> tuple[dict[str, SSCSpec], dict[str, str]]:
    """Replay check for plan.meta["replay"]["ssc"]: only what `ssc_prune_` writes, naming convs of
    this model that can take their presets; returns (layers, execution of each) for `_apply_entry`."""
    _check_shape(entry)
    layers = {n: _spec_from_meta(n, raw) for n, raw in entry["layers"].items()}
    executions = _layer_executions(entry, layers)
    modules = dict(model.named_modules())
    for name in layers:  # channel counts are checked in `_apply_entry`, after the plan's removal
        _check_layer(name, modules.get(name) if name else None, None)
    return layers, executions


def _check_shape(entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict) or set(entry) - {"layers", "execution"}:
        raise CheckpointError("plan's 'ssc' entry must be {'layers': {name: preset}, 'execution': ...}; "
                              "re-export the model with prunekit")


def _layer_executions(entry: dict, layers: dict[str, SSCSpec]) -> dict[str, str]:
    """The execution of each layer: the entry's "execution" is one for all, or {layer: execution}."""
    execution = entry.get("execution", "structured")
    if isinstance(execution, dict):
        if set(execution) != set(layers):
            raise CheckpointError(f"plan's SSC executions name the layers {sorted(execution)}, not the converted "
                                  f"ones {sorted(layers)}; re-export the model with prunekit")
        executions = dict(execution)
    else:
        executions = {name: execution for name in layers}
    bad = [e for e in executions.values() if not isinstance(e, str) or e not in EXECUTIONS]
    if bad:
        raise CheckpointError(f"plan's SSC execution {bad[0]!r} is not one of {', '.join(EXECUTIONS)}")
    return executions


def _one_or_each(executions: dict[str, str]) -> str | dict[str, str]:
    """The entry's "execution": one name when every layer runs it, else one per layer."""
    kinds = list(executions.values())
    return kinds[0] if kinds and all(k == kinds[0] for k in kinds) else executions


def _merge_entries(earlier: Any, later: Any) -> dict[str, Any]:
    """The SSC entry of two composed plans: the layers both converted, each with its execution."""
    for entry in (earlier, later):
        _check_shape(entry)
    executions = {}
    for entry in (earlier, later):
        execution = entry.get("execution", "structured")
        executions.update(execution if isinstance(execution, dict) else {n: execution for n in entry["layers"]})
    return {"layers": {**earlier["layers"], **later["layers"]}, "execution": _one_or_each(executions)}


def _describe_entry(model: nn.Module, entry: Any) -> Any:
    """The entry with each layer's execution as `model` runs it now (`set_execution_` may have
    switched it since the conversion)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict) or not entry["layers"]:
        return entry  # malformed: left for the replay check to refuse
    modules = dict(model.named_modules())
    executions = {n: modules[n].execution for n in entry["layers"] if isinstance(modules.get(n), SSCConv2d)}
    if set(executions) != set(entry["layers"]):
        return entry
    return {**entry, "execution": _one_or_each(executions)}


def _check_layer(name: str, module: nn.Module | None, spec: SSCSpec | None) -> None:
    """CheckpointError unless `module` can take `spec` (with spec None, its channel counts are not checked)."""
    if module is None:
        why = "no such module"
    else:
        why = _convertible(module) if spec is None else _eligible(module, spec)
    if why is not None:
        raise CheckpointError(f"plan converts layer {name!r} to SSC, but here: {why}; build the same "
                              "architecture the plan was made on")


def _apply_entry(model: nn.Module, parsed: tuple[dict[str, SSCSpec], dict[str, str]]) -> None:
    """Replay step, after the plan's channel removal: check every preset against the layer's
    channels as they are now, then convert (fresh weights: the file's are loaded afterwards)."""
    layers, executions = parsed
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        _check_layer(name, modules.get(name), spec)
    for execution in EXECUTIONS:
        convert_(model, {n: s for n, s in layers.items() if executions[n] == execution}, "kaiming", execution)


register_replay_step("ssc", _apply_entry, _check_entry, merge=_merge_entries, describe=_describe_entry)
