"""Evolve channel-scoring functions by genetic programming (Liu et al., GECCO 2022).

`run_search(EvolveConfig(...), run_dir)` evolves; the best function is text that any pruner
uses as `criterion: "evolved:<text>"` (`"evolved:samples=<n>:<text>"` to score on n calibration
images, as a search with calib_samples=n did). See docs/evolve.md.
"""
from .config import EvolveConfig, TaskConfig, cifar_task, digits_task
from .search import run_search

__all__ = ["EvolveConfig", "TaskConfig", "cifar_task", "digits_task", "run_search"]
