"""The PR-DARTS search: three phases on one sparse supernet, alpha stepped by the architect.

1. pretrain: density 1 (dense), scores frozen, weights trained (SGD lr), alpha stepped;
2. scores:   density `cfg.density`, scores set by HYDRA's scaled init from |w|, only the scores
             trained (SGD score_lr; weights, BN and classifier frozen); alpha stepped only with
             `arch_during_scores`;
3. finetune: same density, scores (so masks) frozen, weights trained, alpha stepped.
Each phase is one `prunekit.engine.train` run (cosine schedule, grad clip) with an
`ArchitectHook`; the w-split trains, the alpha-split feeds the architect and the engine's
per-epoch evaluation, and checkpoints every epoch with `ckpt_dir` (`resume=True` continues a
stopped search exactly). The genotype after the last phase is the result. With 0 score epochs the
scores are still set (`cfg.score_init`), so the finetune masks are their top-k (magnitude when scaled).

>>> import torch
>>> data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
>>> cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=1,
...                     score_epochs=1, finetune_epochs=1, unrolled=False)
>>> result = search(cfg, data, data, num_classes=3, device="cpu")
>>> [h["phase"] for h in result.history], result.genotype.steps
(['pretrain', 'scores', 'finetune'], 1)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.integrity import atomic_write_text
from ...layers.sparse import count_nonzeros, set_density_, train_scores_only_
from .architect import Architect
from .checkpoints import phase_dir, resume_checkpoints, sized, start_checkpoints, trim_alpha_log
from .config import PRDartsConfig
from .genotype import Genotype
from .hooks import ArchitectHook, BatchRecorder
from .supernet import SuperNet

PHASES = ("pretrain", "scores", "finetune")


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict[str, Any]]  # one record per epoch over all phases, with "phase"
    supernet: nn.Module
    nonzeros: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"genotype": self.genotype.to_dict(), "history": self.history, "supernet_nonzeros": self.nonzeros}


def prepare_phase_(net: SuperNet, phase: str, cfg: PRDartsConfig) -> None:
    """Set densities, score init and which parameters train, for `phase`."""
    layers = train_scores_only_(net.weight_parameters(), net, phase == "scores")
    if phase == "pretrain":
        set_density_(net, 1.0)
    elif phase == "scores":
        set_density_(net, cfg.density)
        for m in layers:
            m.reset_scores(cfg.score_init)
    else:
        set_density_(net, cfg.density)
    for a in net.alphas():
        a.requires_grad_(cfg.alpha_in_weight_optimizer and phase != "scores")


def _phase_train_config(cfg: PRDartsConfig, phase: str, epochs: int):
    from ...engine.train import TrainConfig

    lr = cfg.score_lr if phase == "scores" else cfg.lr
    return TrainConfig(epochs=epochs, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       schedule="cosine", grad_clip=cfg.grad_clip, seed=cfg.seed, log_every=0)


def search(cfg: PRDartsConfig, train_loader: Iterable, val_loader: Iterable, num_classes: int,
           in_channels: int = 3, device: str | torch.device | None = None, out_dir: str | Path | None = None,
           progress: bool = False, eval_loader: Iterable | None = None, ckpt_dir: str | Path | None = None,
           resume: bool = False) -> SearchResult:
    """Run the three phases; returns the final genotype and the per-epoch history. With
    `out_dir`, each epoch's genotype (genotypes/<phase>_<epoch>.json), the alphas (alphas.jsonl)
    and the engine's JSONL log (search_log.jsonl) are written there. `eval_loader` (default:
    `val_loader`) is what the engine evaluates after each epoch; the architect cycles `val_loader`.

    With `ckpt_dir` every phase checkpoints every epoch (`<ckpt_dir>/<phase>/last.pt`, the
    settings in `<ckpt_dir>/settings.json`; see `prunekit.methods.prdarts.checkpoints`); without
    `resume` a search there starts over. With `resume=True` finished phases are read back and the
    phase in progress continues after its last saved epoch; on CPU the result equals that of an
    uninterrupted search. Other settings, another validation split or a damaged checkpoint are
    one CheckpointError; a `ckpt_dir` without a search starts from the beginning."""
    from ...engine.train import train

    epochs = (cfg.pretrain_epochs, cfg.score_epochs, cfg.finetune_epochs)
    done = _open_checkpoints(cfg, ckpt_dir, resume, epochs, sized(val_loader))
    if done is not None and out_dir is not None:  # the epochs that run again are logged again
        trim_alpha_log(out_dir, done)
    elif out_dir is not None:  # a search that starts over: an earlier one's logs would read as this one's
        _clear_logs(Path(out_dir))
    torch.manual_seed(cfg.seed)
    net = SuperNet(cfg.channels, num_classes, cfg.layers, cfg.steps, cfg.multiplier, in_channels=in_channels)
    architect = Architect(net, cfg.arch_lr, (cfg.arch_beta1, 0.999), cfg.arch_weight_decay, cfg.unrolled, cfg.hvp_r)
    recorder = BatchRecorder(train_loader)
    history: list[dict[str, Any]] = []
    log_path = Path(out_dir) / "search_log.jsonl" if out_dir is not None else None
    for phase, n in zip(PHASES, epochs):
        if n == 0:
            if phase == "scores":  # no score training: finetune under the top-k of the score init (|w| when scaled)
                prepare_phase_(net, phase, cfg)
            continue
        prepare_phase_(net, phase, cfg)
        step_alpha = phase != "scores" or cfg.arch_during_scores
        hook = ArchitectHook(net, architect, val_loader, cfg, phase, step_alpha, recorder, out_dir)
        run = train(net, recorder, eval_loader if eval_loader is not None else val_loader,
                    _phase_train_config(cfg, phase, n), hooks=[hook], device=device, progress=progress,
                    log_path=log_path, ckpt_dir=phase_dir(ckpt_dir, phase), resume=done is not None)
        history.extend(run.history)
    for a in net.alphas():
        a.requires_grad_(False)
    result = SearchResult(net.genotype(), history, net, count_nonzeros(net))
    if out_dir is not None:
        atomic_write_text(Path(out_dir, "genotype.json"), json.dumps(result.genotype.to_dict(), indent=1))
    return result


def _clear_logs(out_dir: Path) -> None:
    """Remove what an earlier search in `out_dir` logged: alphas.jsonl, search_log.jsonl, the
    per-epoch genotypes/ and genotype.json."""
    for name in ("alphas.jsonl", "search_log.jsonl", "genotype.json"):
        (out_dir / name).unlink(missing_ok=True)
    for path in (out_dir / "genotypes").glob("*.json") if (out_dir / "genotypes").is_dir() else ():
        path.unlink()


def _open_checkpoints(cfg: PRDartsConfig, ckpt_dir: str | Path | None, resume: bool, epochs: tuple[int, ...],
                      val_batches: int | None) -> dict[str, int] | None:
    """{phase: epochs saved} when the search resumes from `ckpt_dir`; None when it starts (there
    or without checkpoints)."""
    if ckpt_dir is None:
        if resume:
            raise ConfigError("resume=True needs ckpt_dir (the folder holding the search's phase checkpoints)")
        return None
    done = resume_checkpoints(ckpt_dir, cfg.to_dict(), PHASES, epochs, val_batches) if resume else None
    if done is None:
        start_checkpoints(ckpt_dir, cfg.to_dict(), PHASES, val_batches)
    return done
