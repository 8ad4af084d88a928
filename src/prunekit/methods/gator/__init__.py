"""Gator (arXiv 2205.15404): channel gates trained with a params / MACs / latency loss.

config.py     GatorConfig
gates.py      GateSet: one logit vector per group, straight-through hard gates at the consumers
costs.py      CostModel: adaptive per-channel params / MACs / latency-table costs
controller.py lambda control toward a target, budgeted masking, final threshold search
blocks.py     cutting out a branch whose group closed entirely
convert.py    frozen gates -> physical removal (exactly equal to the gated model), replay
hook.py       GatorHook: the auxiliary loss and the logits' updates inside engine.train
pipeline.py   the registered handler gator_prune_ (method name "gator")

>>> GatorConfig(lam=1.0, cost="params").to_dict()["gate_init_prob"]
0.995
"""
from .blocks import Branch, ConstantOutput, EmptyOutput, cut_branches_, find_branch
from .config import GatorConfig
from .controller import LambdaController, final_masks, initial_lambda, mask_within_budget, round_masks
from .convert import Conversion, convert_
from .costs import CostModel, build_cost
from .gates import GateSet, gateable
from .hook import GatorHook
from .pipeline import gator_prune_

__all__ = [
    "GatorConfig",
    "GateSet",
    "gateable",
    "CostModel",
    "build_cost",
    "LambdaController",
    "initial_lambda",
    "mask_within_budget",
    "round_masks",
    "final_masks",
    "Branch",
    "EmptyOutput",
    "ConstantOutput",
    "find_branch",
    "cut_branches_",
    "Conversion",
    "convert_",
    "GatorHook",
    "gator_prune_",
]
