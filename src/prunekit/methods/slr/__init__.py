"""SLR (surrogate Lagrangian relaxation, IJCAI 2021) and its ADMM baseline.

config.py  SLRConfig, layer selection, ProjectionSpec
state.py   SLRState and the pure update rules (alpha, penalty, checks, step size, ADMM step)
hook.py    SLRHook: penalty + once-per-epoch updates inside the engine's training loop
prune.py   hard_prune_, recalibrate_bn, shrink_ (after training)
pipeline.py the registered handler slr_prune_ (method name "slr")

>>> from prunekit.methods.slr import SLRConfig
>>> SLRConfig(optimization="admm", sparsity=0.9).to_dict()["rho"]
0.1
"""
from .config import ProjectionSpec, SLRConfig, resolve_targets
from .hook import SLRHook
from .pipeline import slr_prune_
from .prune import hard_prune_, norms_after, recalibrate_bn, shrink_
from .state import (
    SLRState,
    admm_update,
    alpha,
    check_w_step,
    check_z_step,
    init_state,
    lagrangian,
    multiplier_step,
    norm_sum,
    penalty,
    relative_residual,
    slr_update,
    step_size,
)

__all__ = [
    "SLRConfig",
    "ProjectionSpec",
    "resolve_targets",
    "SLRHook",
    "SLRState",
    "hard_prune_",
    "norms_after",
    "slr_prune_",
    "recalibrate_bn",
    "shrink_",
    "admm_update",
    "alpha",
    "check_w_step",
    "check_z_step",
    "init_state",
    "lagrangian",
    "multiplier_step",
    "norm_sum",
    "penalty",
    "relative_residual",
    "slr_update",
    "step_size",
]
