"""One arm x one seed: copy the dense model, prune, fine-tune on the shared budget, measure.

What an arm record holds (one JSON file per arm and seed, written when the arm is finished):
accuracy on the reported split right after pruning and after fine-tuning (plus val accuracy),
MACs and parameters (prunekit's counter), the share of weights that are non-zero, forward
latency measured interleaved with the dense model (so the speed-up is a same-run ratio), the
epochs the method trained itself and the fine-tuning epochs, wall time, and the method's
scalar metrics.

Seeds: the val/test split stays the one the dense model was trained with (data.seed); an arm's
seed sets its training shuffles and augmentation draws, the TrainConfig seeds and the method
config's `seed` field where it has one.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import time
from typing import Any

import torch
from torch import nn

from ..cost.latency import compare_latency, latency_device
from ..cost.memory_format import timed_as_it_runs
from ..cost.macs import count_cost
from ..engine.evaluate import evaluate
from ..engine.train import train
from ..surgery.masks import apply_mask, remove_masks
from .recipe import ArmSpec, CompareRecipe, with_seed


def nonzero_weights(model: nn.Module) -> int:
    """Number of non-zero entries over all parameters (irregular/N:M sparsity keeps shapes)."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()))


def score(model: nn.Module, bundle: Any, split: str) -> dict[str, float | None]:
    """Accuracy on the reported split and on val (None when there is no val split)."""
    main = bundle.test if split == "test" else bundle.val
    out: dict[str, float | None] = {"acc": evaluate(model, main)["acc"], "val_acc": None}
    if split == "test" and bundle.val.num_samples > 0:
        out["val_acc"] = evaluate(model, bundle.val)["acc"]
    elif split == "val":
        out["val_acc"] = out["acc"]
    return out


def call_method(arm: ArmSpec, recipe: CompareRecipe, model: nn.Module, example: torch.Tensor, bundle: Any,
                 seed: int, device: torch.device) -> Any:
    """Run the arm's handler with the keyword arguments it accepts; trainers run on `device`,
    one-shot pruners on the CPU (graph tracing), after which the model moves to `device`."""
    params = inspect.signature(arm.handler).parameters
    config = with_seed(arm.config, seed)
    val = bundle.val if bundle.val.num_samples > 0 else None
    kwargs: dict[str, Any] = {"train_loader": bundle.train, "val_loader": val, "progress": False,
                              "train_config": recipe.method_train.replace(seed=seed), "device": device}
    if "batches" in params and recipe.calibration_batches > 0:
        bundle.train.set_epoch(0)
        kwargs["batches"] = [(x.cpu(), y.cpu()) for x, y in
                             itertools.islice(iter(bundle.train), recipe.calibration_batches)]
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    if arm.trains:
        model.to(device)
        return arm.handler(model, config, example.to(device), **kwargs)
    model.cpu()
    result = arm.handler(model, config, example.cpu(), **kwargs)
    model.to(device)
    return result


def _mask_zeros_(model: nn.Module) -> int:
    """Hold every exact zero of conv/linear weights at zero while training; returns #masked tensors."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and bool((mod.weight == 0).any()):
            apply_mask(mod, "weight", mod.weight.detach() != 0)
            n += 1
    return n


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The method's scalar metrics, and the scalar entries of its dicts when there are at most 12
    (a latency report keeps its target and measured fraction; histories and per-layer tables go)."""
    scalar = lambda v: isinstance(v, (int, float, str, bool)) or v is None  # noqa: E731
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if scalar(value):
            out[key] = value
        elif isinstance(value, dict):
            flat = {k: v for k, v in value.items() if scalar(v)}
            if flat and len(flat) <= 12:
                out[key] = flat
    return out


def run_arm(recipe: CompareRecipe, arm: ArmSpec, seed: int, dense: nn.Module, bundle: Any, example: torch.Tensor,
            device: torch.device) -> dict[str, Any]:
    """Prune a copy of `dense` with `arm`, fine-tune it, measure it; returns the arm's record."""
    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    dense_cost = count_cost(dense.cpu(), example.cpu())
    dense.to(device)
    loader_seed = bundle.train.seed
    bundle.train.seed = seed  # this arm's shuffles and augmentation draws
    try:
        method_metrics: dict[str, Any] = {}
        if arm.method is not None:
            result = call_method(arm, recipe, model, example, bundle, seed, device)
            method_metrics = _scalars(result.metrics)
        after_prune = score(model.to(device), bundle, recipe.eval_split)
        epochs = arm.budget_left(recipe.finetune.epochs)
        masked = 0
        if epochs > 0:
            masked = _mask_zeros_(model) if arm.keep_zeros else 0
            val = bundle.val if bundle.val.num_samples > 0 else None
            train(model, bundle.train, val, recipe.finetune.replace(epochs=epochs, seed=seed), device=device,
                  progress=False)
        final = score(model, bundle, recipe.eval_split) if epochs > 0 else after_prune
        # Masks (ours or a method's, e.g. SLR's) become plain zeros: parameters() would otherwise
        # list the unmasked originals, and the timed forward would include the mask products.
        remove_masks(model, bake=True)
    finally:
        bundle.train.seed = loader_seed
    cost = count_cost(model.cpu(), example.cpu())
    record = {
        "arm": arm.name, "seed": seed, "method": arm.method,
        "acc": final["acc"], "val_acc": final["val_acc"], "pruned_acc": after_prune["acc"],
        "pruned_val_acc": after_prune["val_acc"], "macs": cost.macs, "params": cost.params,
        "macs_fraction": cost.macs / max(dense_cost.macs, 1), "params_fraction": cost.params / max(dense_cost.params, 1),
        "nonzero_fraction": nonzero_weights(model) / max(nonzero_weights(dense), 1),
        "method_epochs": arm.trained_epochs, "finetune_epochs": epochs, "zero_masked_tensors": masked,
        "method_metrics": method_metrics,
    }
    if recipe.latency:
        record["latency"] = measure_against_dense(arm.name, model, dense, bundle.input_shape, recipe,
                                                  is_dense=arm.method is None)
    record["wall_s"] = time.perf_counter() - t0
    return record


def measure_against_dense(name: str, model: nn.Module, dense: nn.Module, shape: tuple[int, ...],
                          recipe: CompareRecipe, is_dense: bool = False) -> dict[str, Any]:
    """Forward latency of `model` and the dense model, interleaved in one measurement; `is_dense`:
    the arm is the dense model itself, timed once. The arm is keyed apart from the dense model, so
    an arm that prunes may be called "dense"."""
    key = "dense" if is_dense else f"arm {name}"
    models = {"dense": dense.eval()} if is_dense else {"dense": dense.eval(), key: model.eval()}
    cfg = timed_as_it_runs(model, recipe.bench)  # the arm's layout for both, so the ratio is the pruning's
    cmp = compare_latency(models, tuple(shape), cfg)
    r = cmp.results[key]
    return {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms, "n": r.n,
            "dense_median_ms": cmp.results["dense"].median_ms, "speedup": cmp.speedups.get(key),
            "device": str(latency_device(recipe.bench.device)), "dtype": recipe.bench.dtype,
            "batch_size": cfg.batch_size, "warmup": cfg.warmup,
            "memory_format": "channels_last" if cfg.channels_last else "contiguous"}
