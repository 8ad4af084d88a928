"""Gator (arXiv 2205.15404): channel gates trained with a params / MACs / latency loss.

config.py     GatorConfig
controller.py lambda control toward a target, budgeted masking, final threshold search
convert.py    frozen gates -> physical removal (exactly equal to the gated model), replay; closures
              that would cut the output off the input keep one channel
hook.py       GatorHook: the auxiliary loss and the logits' updates inside engine.train
pipeline.py   the registered handler gator_prune_ (method name "gator")

Shared with any gate-based method, in the core: the gates (`prunekit.layers.gates.GateSet`), the
differentiable costs (`prunekit.cost.differentiable`) and whole-branch cutting
(`prunekit.surgery.branches`).

>>> GatorConfig(lam=1.0, cost="params").to_dict()["gate_init_prob"]
0.995
"""
from .config import GatorConfig
from .controller import LambdaController, final_masks, initial_lambda, mask_within_budget, rounded_masks
from .convert import Conversion, convert_, keep_output_connected
from .hook import GatorHook
from .pipeline import gator_prune_

__all__ = [
    "GatorConfig",
    "LambdaController",
    "initial_lambda",
    "mask_within_budget",
    "rounded_masks",
    "final_masks",
    "Conversion",
    "convert_",
    "keep_output_connected",
    "GatorHook",
    "gator_prune_",
]
