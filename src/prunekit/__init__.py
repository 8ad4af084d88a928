"""prunekit: structural pruning for PyTorch.

Trace a model into channel groups, score and remove channels physically, replay the result as
a plan, and measure what it bought (params, MACs, latency). Names are imported on first use, so
`import prunekit` stays instant and does not import torch until needed.

>>> import prunekit
>>> model = prunekit.create_model("small_cnn")
>>> example = __import__("torch").zeros(1, 1, 8, 8)
>>> result = prunekit.prune_(model, prunekit.MagnitudeConfig(macs_fraction=0.5), example)
>>> result.cost_after.macs <= 0.5 * result.cost_before.macs
True
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "build_graph": "prunekit.graph",
    "Graph": "prunekit.graph",
    "Group": "prunekit.graph",
    "register_rule": "prunekit.graph",
    "prune_": "prunekit.methods",
    "prepare_pruning": "prunekit.surgery.prepared",
    "PreparedPruning": "prunekit.surgery.prepared",
    "PruneResult": "prunekit.methods.result",
    "MagnitudeConfig": "prunekit.methods.magnitude",
    "SLRConfig": "prunekit.methods.slr",
    "GatorConfig": "prunekit.methods.gator",
    "SSCConfig": "prunekit.methods.ssc",
    "HydraConfig": "prunekit.methods.hydra",
    "SNIPConfig": "prunekit.methods.pai",
    "GraSPConfig": "prunekit.methods.pai",
    "SynFlowConfig": "prunekit.methods.pai",
    "RandomInitConfig": "prunekit.methods.pai",
    "remove_channels_": "prunekit.surgery.shrink",
    "prune_channels_": "prunekit.surgery.plan",
    "apply_plan_": "prunekit.surgery.plan",
    "Plan": "prunekit.surgery.plan",
    "save_pruned": "prunekit.surgery.persist",
    "load_pruned": "prunekit.surgery.persist",
    "bake_masks_": "prunekit.surgery.masks",
    "export_model": "prunekit.export",
    "count_cost": "prunekit.cost.macs",
    "measure_latency": "prunekit.cost.latency",
    "LatencyConfig": "prunekit.cost.latency",
    "create_model": "prunekit.models",
    "load_data": "prunekit.data",
    "DataConfig": "prunekit.data",
    "train": "prunekit.engine",
    "evaluate": "prunekit.engine",
    "TrainConfig": "prunekit.engine",
    "write_report": "prunekit.report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("prunekit")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})
