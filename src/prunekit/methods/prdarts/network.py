"""Train an evaluation network at a target density, save and reload it, report its cost.

`train_at_density` follows the authors' evaluation protocol (HYDRA): dense training, then the
per-layer top-k scores learned from HYDRA's scaled init with the weights frozen, then the
weights fine-tuned under the fixed masks; finally the sparse layers are hardened into plain
layers with persistent `Mask`s. Any phase may have 0 epochs (0 score epochs: the magnitude
top-k). `save_network`/`load_network` store weights + masks (safetensors) with the genotype and
sizes as JSON in the plan meta; loading builds the network from that JSON (strictly validated).

`network_report` counts what is honest to claim: nonzero weights, dense MACs, and MACs over
nonzero weights only (what a sparse engine could at best skip), plus measured latency of the
masked network next to the same network dense. Unstructured masks on dense kernels run exactly
the dense computation, so no speed-up is claimed from them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ...core.errors import CheckpointError, ConfigError
from ...core.modes import evaluating
from ...layers.sparse import SparseMixin, count_nonzeros, harden_, set_density_, sparse_layers, train_scores_only_
from ...surgery.masks import apply_mask, get_mask, masked_modules
from ...surgery.plan import empty_plan
from .checkpoints import phase_dir, resume_checkpoints, start_checkpoints
from .evalnet import GENOTYPE_META, EvalNetwork, build_from_meta
from .hooks import BatchRecorder, EvalTrainingHook


@dataclass
class EvalSchedule:
    """Epochs and learning rates of the three evaluation phases, and DARTS's regularisers."""

    dense_epochs: int = 1
    score_epochs: int = 1
    finetune_epochs: int = 1
    lr: float = 0.025
    score_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    aux_weight: float = 0.4
    drop_path: float = 0.2
    seed: int = 0


def _phase(net: EvalNetwork, phase: str, density: float) -> None:
    layers = train_scores_only_(net.parameters(), net, phase == "scores")
    set_density_(net, 1.0 if phase == "dense" else density)
    if phase == "scores":
        for m in layers:
            m.reset_scores("scaled")


EVAL_PHASES = ("dense", "scores", "finetune")


def train_at_density(net: EvalNetwork, density: float, train_loader: Iterable, val_loader: Iterable | None,
                     schedule: EvalSchedule, device: Any = None, progress: bool = False,
                     ckpt_dir: str | Path | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Dense -> scores -> finetune at `density`, then harden; returns the per-epoch history. At
    density 1 there are no scores to train (score epochs are refused); the finetune trains on.
    With `ckpt_dir` every phase checkpoints every epoch (`<ckpt_dir>/<phase>/last.pt`, the
    settings in `<ckpt_dir>/settings.json`); `resume=True` reads finished phases back and continues
    the one in progress (as `search` does; other settings are a CheckpointError)."""
    from ...engine.train import TrainConfig, train

    if density >= 1.0 and schedule.score_epochs > 0:
        raise ConfigError(f"density={density} keeps every weight, so the {schedule.score_epochs} score epochs have "
                          "no scores to train; set score_epochs=0 (dense training) or a density below 1")
    epochs = (schedule.dense_epochs, schedule.score_epochs, schedule.finetune_epochs)
    # the network's genotype and sizes too: a checkpoint of another cell may have the same shapes
    settings = {"density": density, **asdict(schedule), "network": getattr(net, "spec", None)}
    resume = _open_eval_checkpoints(ckpt_dir, resume, settings, epochs)
    recorder = BatchRecorder(train_loader)
    history = []
    for phase, n in zip(EVAL_PHASES, epochs):
        _phase(net, phase, density)
        if n == 0:
            continue
        lr = schedule.score_lr if phase == "scores" else schedule.lr
        cfg = TrainConfig(epochs=n, lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay,
                          grad_clip=schedule.grad_clip, seed=schedule.seed, log_every=0)
        hook = EvalTrainingHook(net, schedule.aux_weight, schedule.drop_path if phase != "scores" else 0.0,
                                n, recorder)
        run = train(net, recorder, val_loader, cfg, hooks=[hook], device=device, progress=progress,
                    ckpt_dir=phase_dir(ckpt_dir, phase), resume=resume)
        history.extend({**h, "phase": phase} for h in run.history)
    net.drop_path_prob = 0.0
    harden_(net)
    return history


def _open_eval_checkpoints(ckpt_dir: str | Path | None, resume: bool, settings: dict[str, Any],
                           epochs: tuple[int, ...]) -> bool:
    """Whether the phases resume from `ckpt_dir` (False: they start, there or without checkpoints)."""
    if ckpt_dir is None:
        if resume:
            raise ConfigError("resume=True needs ckpt_dir (the folder holding the phase checkpoints)")
        return False
    if resume and resume_checkpoints(ckpt_dir, settings, EVAL_PHASES, epochs) is not None:
        return True
    start_checkpoints(ckpt_dir, settings, EVAL_PHASES)
    return False


def save_network(net: EvalNetwork, path: str | Path, example_inputs: torch.Tensor) -> Path:
    """Weights + masks, with the genotype and sizes in the plan meta (no pickle). Score-masked
    layers are saved hardened (their current top-k as the mask); `net` itself is left as it is."""
    from ...surgery.persist import save_pruned

    plan = empty_plan(example_inputs)
    plan.meta.update({"method": "prdarts", GENOTYPE_META: net.spec})
    return save_pruned(_hardened(net), plan, path)


def _hardened(net: nn.Module) -> nn.Module:
    """`net` itself when it has no score-masked layers, else a copy with them hardened."""
    if not sparse_layers(net):
        return net
    aux = getattr(net, "aux_logits", None)  # a training forward's output (a graph), not copied
    net = copy.deepcopy(net, {id(aux): None} if aux is not None else None)
    harden_(net)
    return net


def load_network(path: str | Path) -> EvalNetwork:
    """Rebuild the network a `save_network` file describes and load its weights and masks."""
    from ...surgery.persist import load_pruned, read_plan

    plan = read_plan(path)
    if GENOTYPE_META not in plan.meta:
        raise CheckpointError(f"{path} holds no PR-DARTS network description; save it with save_network")
    _check_stored_shapes(plan.meta[GENOTYPE_META], path)  # before any memory is taken for the network
    net = build_from_meta(plan.meta[GENOTYPE_META])
    harden_(net)  # plain layers, no masks yet: load_pruned puts the stored masks back
    return load_pruned(net, path)


def _check_stored_shapes(spec: Any, path: str | Path) -> None:
    """CheckpointError unless the file's tensors (masks aside) are exactly those of the network its
    description builds: built on the meta device (no memory), after its cell count is checked
    against the stored tensors (the build time grows with it)."""
    from ...surgery.tensor_file import MASK_SUFFIX, read_tensor_file

    _, tensors = read_tensor_file(path)
    stored = {k: tuple(t.shape) for k, t in tensors.items() if not k.endswith(MASK_SUFFIX)}
    cells = {k.split(".")[1] for k in stored if k.startswith("cells.")}
    if isinstance(spec, dict) and spec.get("layers") != len(cells):
        raise CheckpointError(f"{path}: its description has layers={spec.get('layers')!r} but it stores the "
                              f"tensors of {len(cells)} cells; the file is damaged or was edited")
    with torch.device("meta"):
        shell = build_from_meta(spec)
        harden_(shell)
    described = {k: tuple(t.shape) for k, t in shell.state_dict().items()}
    if stored != described:
        other = sorted(set(stored) ^ set(described)) or [k for k in described if stored[k] != described[k]]
        raise CheckpointError(f"{path}: the network its description builds ({sum(map(math.prod, described.values())):,} "
                              f"values) does not match the tensors it stores (first difference: {other[0]}); "
                              "the file is damaged or was edited")


def sparse_macs(net: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Dense MACs and nonzero MACs per sample: each conv/linear weight entry is used once per
    output position (groups accounted for by the weight's shape), zero entries skipped in the
    second count."""
    totals = {"macs": 0, "nonzero_macs": 0}

    def count(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        w = mod.effective_weight() if isinstance(mod, SparseMixin) else mod.weight
        positions = out[0].numel() // out.shape[1] if out.dim() > 2 else 1  # per sample, per channel
        totals["macs"] += w.numel() * positions
        totals["nonzero_macs"] += int((w != 0).sum()) * positions

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), evaluating(net):
            net(example[:1])
    finally:
        for h in handles:
            h.remove()
    return totals


def inference_nonzeros(net: nn.Module) -> dict[str, int]:
    """`count_nonzeros` of the network without its auxiliary head: the head only trains (its logits
    exist in training mode only), so it is no part of the network used, nor of its MACs (DARTS
    counts parameters without it too)."""
    counts = count_nonzeros(net)
    aux = getattr(net, "auxiliary_head", None)
    if aux is not None:
        head = count_nonzeros(aux)
        counts = {k: counts[k] - head[k] for k in counts}
    return counts


def network_report(net: nn.Module, example: torch.Tensor, device: str = "cpu", repeats: int = 30,
                   threads: int | None = 1) -> dict[str, Any]:
    """Nonzeros and total weights (the training-only auxiliary head left out), dense and nonzero
    MACs, and latency of the masked network beside the same network with masks removed
    (interleaved); on an Ampere-or-newer GPU also the 2:4 path. Score-masked layers are measured
    hardened (a copy), so the twin's all-ones masks replace theirs too."""
    from ...cost.latency import LatencyConfig, compare_latency

    net = _hardened(net)
    report: dict[str, Any] = {**inference_nonzeros(net), **sparse_macs(net, example)}
    # the twin keeps its Mask parametrizations with all-ones masks: the same kernels and the
    # same mask multiply, so any gap measured is the cost (none) of the zeros themselves
    dense = copy.deepcopy(net)
    for _, mod, pname in masked_modules(dense):
        apply_mask(mod, pname, torch.ones_like(get_mask(mod, pname)))
    cfg = LatencyConfig(device=device, batch_size=example.shape[0], warmup=5, repeats=repeats,
                        threads=threads if device == "cpu" else None)
    cmp = compare_latency({"all_ones_masks": dense, "masked": net}, example, cfg)
    report["latency"] = cmp.to_dict()
    report["latency_ratio_masked_vs_dense"] = cmp.ratios["masked"]
    report["speedup_claimed"] = 1.0
    report["speed_note"] = ("unstructured masks on dense kernels: the masked network runs the same dense "
                            "convolutions, so no speed-up is claimed; nonzero_macs is what a sparse engine "
                            "could at best skip")
    report["semi_structured_2to4"] = _two_four_note(device)
    return report


def _two_four_note(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return ("available on this GPU for nn.Linear weights only (prunekit.surgery.sparse_io."
                "to_semi_structured_); a DARTS network's only Linear layers are its classifiers, a negligible "
                "share of MACs, so the 2:4 path is not applied to the convolutions")
    return "not available: needs a CUDA GPU of compute capability >= 8.0"
