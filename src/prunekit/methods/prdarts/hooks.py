"""Engine hooks of PR-DARTS: the architect inside `prunekit.engine.train`, and the evaluation
network's auxiliary loss and drop-path schedule.

`ArchitectHook` steps alpha once per weight step on the next validation batch, in
`before_step` (the batch is on the device, nothing is computed yet), with the engine's weight
optimizer for the unrolled lookahead. It owns the alphas (`owned_parameters`), so the engine's
optimizer leaves them to it. On an engine without `bind`/`before_step` it falls back to the
first-order step inside `extra_loss` (after the weight forward, before its backward: the weights
are still those of this step) and refuses the unrolled architect, which needs the optimizer.
Its batches are read as the engine reads them (`split_batch`), and its first step checks them
as the engine's first step would (the supernet runs on the inputs, the labels are within its
classes): it runs before the engine's own checks. Its `state_dict` (the architect's Adam and the
position in the validation split) goes into the engine's checkpoint with the alphas (model
parameters), so a resumed phase steps alpha on the batch, with the moments, it would have.

Each epoch it adds to the engine's metrics: the derived genotype, the mean alpha entropy of
both cell types (log 8 = 2.079 is uniform), the share of parameter-free ops in the genotype
and the softmax mass they hold: a fast fall of entropy with a rising parameter-free share is the
known collapse toward skip_connect.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import CheckpointError, ConfigError
from ...core.integrity import atomic_write_text
from ...core.modes import evaluating
from ...engine.batches import check_labels, out_of_memory, split_batch
from ...engine.hooks import Hook
from .architect import Architect
from .config import PRDartsConfig
from .genotype import alpha_entropy, parameter_free_mass


class BatchRecorder:
    """Wraps a loader and remembers the batch it yielded last (for engines without `state.batch`)."""

    def __init__(self, loader: Iterable):
        self.loader, self.last = loader, None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.loader, "set_epoch", None)):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.last = batch
            yield batch


VAL = "validation (alpha)"


class ValCycle:
    """(index within the pass, batch) of `loader`, pass after pass. `position` (passes finished,
    batches read in this pass) is what a checkpoint keeps: `seek` reads the loader again from its
    start up to there, so the loader must yield the same batches on every pass (prunekit's
    validation loaders keep their order)."""

    def __init__(self, loader: Iterable):
        self.loader, self.passes, self.index, self._it = loader, 0, 0, None

    @property
    def position(self) -> tuple[int, int]:
        return self.passes, self.index

    def seek(self, passes: int, index: int) -> None:
        self.passes, self.index, self._it = passes, index, None

    def __next__(self) -> tuple[int, Any]:
        if self._it is None:
            self._it = self._skipped(self.index)
        for _ in range(2):
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    break
                self.passes, self.index, self._it = self.passes + 1, 0, iter(self.loader)
                continue
            self.index += 1
            return self.index - 1, batch
        raise ConfigError("the validation (alpha) loader yields no batch; give the search a non-empty val split")

    def _skipped(self, count: int) -> Iterator[Any]:
        it = iter(self.loader)
        for read in range(count):
            if next(it, _END) is _END:
                raise CheckpointError(f"the search had read {count} batches of the validation (alpha) loader in this "
                                      f"pass, but it now yields {read}; resume with the same data and batch size")
        return it


_END = object()


def _to(batch: Any, index: int, what: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) on `device`, checked and converted as the engine does (`split_batch`)."""
    x, y = split_batch(batch, index, what)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def check_batch(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], index: int, what: str) -> None:
    """ConfigError unless `net` runs on the batch's inputs and its labels are within its classes:
    the architect steps before the engine's own first-batch checks. An evaluation-mode forward
    without gradients, so nothing the search computes changes."""
    x, y = batch
    try:
        with torch.no_grad(), evaluating(net):
            logits = net(x)
    except (RuntimeError, ValueError, TypeError) as err:
        if out_of_memory(err):
            raise
        raise ConfigError(f"the supernet cannot run {what} batch {index} (inputs {tuple(x.shape)}, {x.dtype}): "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}; give "
                          "batches of the inputs it takes (in_channels of the search)") from err
    check_labels(logits, y, what)


class ArchitectHook(Hook):
    def __init__(self, net: nn.Module, architect: Architect, val_loader: Iterable, cfg: PRDartsConfig,
                 phase: str, step_alpha: bool = True, recorder: BatchRecorder | None = None,
                 out_dir: str | Path | None = None):
        self.net, self.architect, self.cfg, self.phase = net, architect, cfg, phase
        self.step_alpha, self.recorder = step_alpha, recorder
        self.val_batches = ValCycle(val_loader)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state: Any = None
        self.arch_losses: list[float] = []
        self.checked = False  # the first architect step checks its batches

    # the engine API ------------------------------------------------------------------------
    def bind(self, state: Any) -> None:
        self.state = state

    def owned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [] if self.cfg.alpha_in_weight_optimizer else list(self.net.alphas())

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def before_step(self, model: nn.Module, step: int) -> None:
        if self.step_alpha:
            self._arch_step(self.state.batch, self.state.optimizer)

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if self.state is None and self.step_alpha:  # an engine without before_step
            if self.cfg.unrolled:
                raise ConfigError("unrolled=true needs an engine with Hook.bind/before_step (to see the "
                                  "weight optimizer); update prunekit or use unrolled=false")
            self._arch_step(None, None)
        if self.cfg.smooth_beta == 0:
            return None
        batch = self.state.batch if self.state is not None else self.recorder.last
        x = batch[0].to(self._device())
        clean = F.softmax(self.net(x), dim=1)
        noisy = F.log_softmax(self.net(x + self.cfg.smooth_noise_std * torch.randn_like(x)), dim=1)
        return self.cfg.smooth_beta * F.kl_div(noisy, clean, reduction="batchmean")

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        geno = self.net.genotype()
        record = {"phase": self.phase, "phase_epoch": epoch, "genotype": geno.to_dict(),
                  "alpha_entropy_normal": alpha_entropy(self.net.alpha_normal),
                  "alpha_entropy_reduce": alpha_entropy(self.net.alpha_reduce),
                  "param_free_share": geno.parameter_free_share(),
                  "param_free_mass_normal": parameter_free_mass(self.net.alpha_normal),
                  "param_free_mass_reduce": parameter_free_mass(self.net.alpha_reduce),
                  "arch_loss": sum(self.arch_losses) / len(self.arch_losses) if self.arch_losses else None}
        self.arch_losses = []
        metrics.update(record)
        if self.out_dir is not None:
            folder = self.out_dir / "genotypes"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / f"{self.phase}_{epoch:03d}.json", json.dumps(geno.to_dict(), indent=1))
            alphas = {"phase": self.phase, "phase_epoch": epoch,
                      "alpha_normal": self.net.alpha_normal.detach().cpu().tolist(),
                      "alpha_reduce": self.net.alpha_reduce.detach().cpu().tolist()}
            with open(self.out_dir / "alphas.jsonl", "a") as f:
                f.write(json.dumps(alphas) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """The architect's optimizer (Adam over the alphas) and the position in the validation
        split; the alphas themselves are the model's."""
        passes, index = self.val_batches.position
        return {"architect": self.architect.optimizer.state_dict(), "val_passes": passes, "val_index": index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not isinstance(state, dict) or not isinstance(state.get("architect"), dict) or \
                not count(state.get("val_passes")) or not count(state.get("val_index")):
            raise CheckpointError("the architect's saved state is not its optimizer and validation position; the "
                                  "checkpoint is damaged or from other code: delete it to restart the search")
        try:
            self.architect.optimizer.load_state_dict(state["architect"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"the architect's saved optimizer does not fit its alphas ({type(err).__name__}: "
                                  f"{str(err)[:160]}); resume with the same search settings") from None
        self.val_batches.seek(state["val_passes"], state["val_index"])

    # helpers ---------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.net.alpha_normal.device

    def _arch_step(self, train_batch: Any, optimizer: Any) -> None:
        device = self._device()
        index, batch = next(self.val_batches)
        val = _to(batch, index, VAL, device)
        train = _to(train_batch, 0, "training", device) if train_batch is not None else None
        if not self.checked:
            check_batch(self.net, val, index, VAL)
            if train is not None:
                check_batch(self.net, train, 0, "training")
            self.checked = True
        self.arch_losses.append(self.architect.step(train, val, optimizer)["arch_loss"])


class EvalTrainingHook(Hook):
    """DARTS evaluation training: auxiliary-head loss (weight `aux_weight`) and drop-path
    probability rising linearly from 0 to `drop_path` over the epochs."""

    def __init__(self, net: nn.Module, aux_weight: float, drop_path: float, epochs: int,
                 recorder: BatchRecorder | None = None):
        self.net, self.aux_weight, self.drop_path, self.epochs = net, aux_weight, drop_path, epochs
        self.recorder, self.state = recorder, None
        net.drop_path_prob = 0.0

    def bind(self, state: Any) -> None:
        self.state = state

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        aux = getattr(self.net, "aux_logits", None)
        if aux is None or self.aux_weight == 0:
            return None
        batch = self.state.batch if self.state is not None else self.recorder.last
        return self.aux_weight * F.cross_entropy(aux, batch[1].to(aux.device))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        self.net.drop_path_prob = self.drop_path * (epoch + 1) / self.epochs
        metrics["drop_path_prob"] = self.net.drop_path_prob

    def state_dict(self) -> dict[str, Any]:
        return {"drop_path_prob": float(self.net.drop_path_prob)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prob = state.get("drop_path_prob") if isinstance(state, dict) else None
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
            raise CheckpointError(f"the saved drop-path probability {prob!r} is not a number in [0, 1]; the "
                                  "checkpoint is damaged: delete it to restart the training")
        self.net.drop_path_prob = float(prob)
