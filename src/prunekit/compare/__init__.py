"""Compare pruning methods on one dense model: same target, same budget, N seeds.

`run_compare(CompareRecipe.from_dict(raw))` prunes copies of one dense model with every arm of
the recipe, fine-tunes each on the same epoch budget, and writes a table (accuracy mean ± std,
MACs, params, latency), an accuracy-vs-MACs plot with the Pareto front, a markdown report and
result JSON. Finished arm x seed records are reused, so a killed comparison resumes.

>>> from prunekit.compare import CompareRecipe
>>> r = CompareRecipe.from_dict({"model": {"name": "small_cnn"}, "data": {"name": "digits"},
...     "dense": {"train": {"epochs": 1}}, "finetune": {"epochs": 1},
...     "arms": {"l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}}}})
>>> r.arms["l2"].method, r.seeds
('magnitude', [0])
"""
from .baselines import BASELINES, TorchPruningConfig, torch_pruning_prune_
from .recipe import ArmSpec, CompareRecipe, TargetSection, build_arm
from .run import CompareResult, run_compare, sha256_file
from .summary import pareto_front, summarise

__all__ = ["ArmSpec", "BASELINES", "CompareRecipe", "CompareResult", "TargetSection", "TorchPruningConfig",
           "build_arm", "pareto_front", "run_compare", "sha256_file", "summarise", "torch_pruning_prune_"]
