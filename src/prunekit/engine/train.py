"""The training loop: plain on purpose, with methods plugging in through `Hook`s.

Before the first step the optimizer is built from the model's parameters and the hooks'
`param_groups` / `owned_parameters`, any checkpoint is restored, then every hook's `bind(state)`
receives the `TrainState` the loop keeps current. One optimizer step, in this order:
    batch to the device (state.batch) -> hook.before_step -> zero the main optimizer's gradients
    -> forward -> loss = CE(label smoothing) + sum of hook.extra_loss(model, step) that are not None
    (state.loss) -> backward -> hook.after_backward -> grad clipping (optional) -> optimizer.step
    -> scheduler.step -> hook.on_step_end
At the end of each epoch: evaluate on the validation loader, call hook.on_epoch_end(model, epoch,
metrics) (hooks may add keys), append the metrics to the history, write a JSONL "epoch" record,
save the checkpoint `<ckpt_dir>/last.pt` (see `prunekit.engine.checkpoint`).

Hooks always receive the user's model (never the DDP or torch.compile wrapper). The step index
passed to hooks is global: `epoch * len(train_loader) + batch_index`.

Loaders are iterables of (x, y) batches with `len()`; batches may already sit on the device.
A loader with `set_epoch(epoch)` is told the epoch before it is iterated (to reshuffle). Under
torchrun every rank iterates the same loader of global batches and keeps its shard of each
(see `prunekit.engine.distributed`).

>>> from torch import nn
>>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
>>> result = train(nn.Linear(4, 2), data, data, TrainConfig(epochs=2, lr=0.1), progress=False)
>>> len(result.history), sorted(result.final_metrics)[:3]
(2, ['epoch', 'epoch_time_s', 'images_per_s'])
"""
from __future__ import annotations

import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.config import short_repr
from ..core.errors import ConfigError, PrunekitWarning, TrainingError
from ..core.layout import is_channels_last, onednn_safe, to_channels_last_
from .batches import check_labels, out_of_memory, split_batch
from .checkpoint import (_has_state, checkpoint_path, hook_checkpoint_states, load_checkpoint, save_checkpoint,
                         seed_everything)
from .distributed import (DistContext, all_reduce_sums, broadcast_buffers, env_ranks, init_distributed,
                          resolve_device, shard_batch, shutdown, wrap_model)
from .evaluate import autocast_context, evaluate, to_device
from .hooks import TrainState, split_parameters
from .optim import optimizer_from_split, build_optimizer  # noqa: F401  (build_optimizer: part of this module's API)
from .logging import MetricsLog, is_finite_number, to_plain
from .restore import check_compatible, restore_checkpoint
from .schedule import build_scheduler, lr_factor  # noqa: F401  (lr_factor: part of this module's API)
from .statistics import StepStatistics
from .train_config import OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: F401  (part of this module's API)

# Metric keys that measure time: they differ between otherwise identical runs.
TIMING_KEYS = ("train_time_s", "epoch_time_s", "images_per_s")
# Config fields that may change between a run and its resume: they do not alter the numbers.
RESUMABLE_CHANGES = ("log_every", "compile")
_HOOK_METHODS = ("extra_loss", "after_backward", "on_step_end", "on_epoch_end")


@dataclass
class TrainResult:
    """What `train` returns. `history[i]` is epoch i's metrics (as in the JSONL "epoch" record);
    `best_val_acc`/`best_epoch` are None without a validation loader; `start_epoch` > 0 means
    the run resumed from a checkpoint; `notes` lists remarks such as an ignored bf16 flag."""

    history: list[dict[str, Any]]
    best_val_acc: float | None
    best_epoch: int | None
    final_metrics: dict[str, Any]
    start_epoch: int = 0
    notes: list[str] = field(default_factory=list)


class _Run:
    """The state of one `train` call: model, wrapped net, optimizer, scheduler, hooks, log."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, hooks: list[Any], device: torch.device,
                 ctx: DistContext, steps_per_epoch: int, log: MetricsLog, progress: bool):
        self.model, self.cfg, self.hooks, self.device, self.ctx = model, cfg, hooks, device, ctx
        self.steps_per_epoch, self.log = steps_per_epoch, log
        self.show_progress = progress and ctx.is_main and sys.stderr.isatty()
        split = split_parameters(model, hooks)
        self.outside = split.outside
        self.optimizer = optimizer_from_split(split, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        owned = {id(p) for p in split.owned}
        self.owned_names = [n for n, p in model.named_parameters() if id(p) in owned]
        self.net: nn.Module = model
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.labels_checked = False  # the first step compares the labels with the model's classes
        self.statistics = StepStatistics()
        self.channels_last = resolve_channels_last(cfg, device)
        self.state = TrainState(model, self.optimizer, self.scheduler, device, cfg, steps_per_epoch)
        self.before_step = [h.before_step for h in hooks if callable(getattr(h, "before_step", None))]

    def bind(self, start_epoch: int) -> None:
        """Point the state at the first step to run and hand it to every hook (after resume)."""
        self.state.epoch, self.state.step = start_epoch, start_epoch * self.steps_per_epoch
        for hook in self.hooks:
            if callable(getattr(hook, "bind", None)):
                hook.bind(self.state)

    def wrap(self) -> None:
        """DDP, then torch.compile (the order PyTorch recommends); after any resume."""
        # Owned parameters are stepped (and, under DDP, averaged) by their hook, not by DDP.
        self.net = wrap_model(self.model, self.ctx, self.device, ignore=self.owned_names)
        if self.cfg.compile:
            self.net = torch.compile(self.net)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step on a global batch; returns (CE sum, #correct, #samples) of this shard."""
        cfg, model, state = self.cfg, self.model, self.state
        global_n, global_y = y.shape[0], y
        x = shard_batch(to_device(x, self.device, self.channels_last), self.ctx)
        y = shard_batch(to_device(y, self.device), self.ctx)
        state.step, state.batch, state.loss = step, (x, y), None
        for before_step in self.before_step:
            before_step(model, step)
        # After before_step: gradients a hook left on the main parameters do not leak into this step.
        self.optimizer.zero_grad(set_to_none=True)
        first = not self.labels_checked
        # the running statistics this forward moves: put back when the step is refused or diverges
        buffers = {n: b.clone() for n, b in model.named_buffers()} if first else None
        if not first:
            self.statistics.snapshot()
        try:
            with autocast_context(self.device, cfg.bf16):
                logits = self.net(x)
        except (RuntimeError, ValueError, TypeError) as err:
            single = x.shape[0] == 1 and "more than 1 value per channel" in str(err)  # BatchNorm's refusal
            if out_of_memory(err) or not (first or single):
                raise
            self._restore_buffers(buffers)
            if single:
                raise ConfigError(f"training batch {step % self.steps_per_epoch} {self._single_sample(global_n)}, "
                                  "which BatchNorm cannot train on (it needs two or more values per channel): drop "
                                  "the last partial batch (drop_last=True) or choose a batch size that does not "
                                  "leave one sample") from err
            raise ConfigError(f"the model cannot run the first training batch (inputs {tuple(x.shape)}, {x.dtype}): "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}; give "
                              "batches of the inputs the model takes (if they are, the error is in the model's "
                              "forward: see the error above)") from err
        # The global batch, so every rank decides alike; labels still on the host cost no device sync, so
        # they are checked every step, device-resident ones on the first. A refusal undoes the running statistics.
        if first or global_y.device.type == "cpu":
            try:
                check_labels(logits, global_y, "training" if first else f"training batch {step % self.steps_per_epoch}")
            except ConfigError:
                self._restore_buffers(buffers)
                raise
            self.labels_checked = True
        ce_sum = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=cfg.label_smoothing)
        # DDP averages gradients over ranks, so scaling the shard's sum by world/global_n makes
        # the update that of the mean loss over the whole global batch.
        loss = ce_sum * (self.ctx.world_size / global_n)
        for i, hook in enumerate(self.hooks):
            extra = hook.extra_loss(model, step)
            if extra is not None:
                _check_scalar(extra, i, hook)
                loss = loss + extra
        state.loss = loss
        loss.backward()
        for hook in self.hooks:
            hook.after_backward(model, step)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip is not None
                else torch.stack(torch._foreach_norm(grads)).norm() if grads
                else torch.zeros(()))
        # Under DDP only the averaged gradients decide (every rank sees the same and stops together);
        # alone, the loss too. One synchronisation a step; the optimizer never steps into NaN.
        finite = torch.isfinite(norm) if self.ctx.enabled else torch.isfinite(norm) & torch.isfinite(loss.detach())
        if not bool(finite):
            self._restore_buffers(buffers)
            raise TrainingError(
                f"training diverged at epoch {state.epoch + 1}, step {step + 1}: the loss is {loss.item():.4g} and the "
                f"gradient norm {norm.item():.4g}; lower the learning rate (lr={self.optimizer.param_groups[0]['lr']:.4g} "
                "now) or set grad_clip. The parameters keep their values of the step before")
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        for hook in self.hooks:
            hook.on_step_end(model, step)
        return ce_sum.detach(), (logits.detach().argmax(dim=1) == y).sum(), y.numel()

    def _single_sample(self, global_n: int) -> str:
        """How a batch came to give this process one sample: its size, or its split over the ranks."""
        if not self.ctx.enabled:
            return "has a single sample"
        return (f"leaves a single sample to rank {self.ctx.rank} (its {global_n} samples are split over "
                f"{self.ctx.world_size} processes)")

    def _restore_buffers(self, saved: dict[str, torch.Tensor] | None) -> None:
        """Put back the buffers (BN running statistics) a refused or diverged forward changed:
        every buffer after the first step's forward (`saved`), the running statistics after any other."""
        if saved is None:
            self.statistics.restore()
            return
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])

    def train_epoch(self, loader: Iterable[Any], epoch: int) -> dict[str, Any]:
        """All steps of one epoch; returns train loss/accuracy summed over ranks and timings."""
        if callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(epoch)
        self.state.epoch = epoch
        self.net.train()
        self.statistics.refresh(self.model)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n, t0 = 0, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not self.show_progress, leave=False)
        with bar:
            for i, batch in enumerate(loader):
                x, y = split_batch(batch, i, "training")
                if y.numel() == 0:
                    raise ConfigError(f"training batch {i} has no samples; give batches of one sample or more")
                step = epoch * self.steps_per_epoch + i
                ce, hits, k = self.step(x, y, step)
                loss_sum += ce.double()
                correct += hits
                n += k
                bar.update(1)
                if self.cfg.log_every and (step + 1) % self.cfg.log_every == 0:
                    # .item() synchronises the device: done only every log_every steps.
                    batch_loss = ce.item() / max(k, 1)
                    self.log.write("step", epoch=epoch, step=step, loss=batch_loss, lr=self.last_lr)
                    bar.set_postfix(loss=f"{batch_loss:.4f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - t0
        loss_total, correct_total, n_total = all_reduce_sums([loss_sum, correct, n], self.ctx, self.device)
        return {"train_loss": loss_total / max(n_total, 1), "train_acc": correct_total / max(n_total, 1),
                "train_n": int(n_total), "train_time_s": train_time,
                "images_per_s": n_total / train_time if train_time > 0 else None}

    def run_epoch(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None,
                  epoch: int) -> dict[str, Any]:
        """Train one epoch, evaluate, let hooks add metrics; returns the epoch's record."""
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update(self.train_epoch(train_loader, epoch))
        metrics["lr"] = self.last_lr
        if val_loader is not None:
            broadcast_buffers(self.model, self.ctx)
            val = evaluate(self.model, val_loader, self.device, bf16=self.cfg.bf16,
                           channels_last=self.channels_last, distributed=self.ctx.enabled)
            metrics.update(val_loss=val["loss"], val_acc=val["acc"], val_n=val["n"])
        for hook in self.hooks:
            hook.on_epoch_end(self.model, epoch, metrics)
        metrics["epoch_time_s"] = time.perf_counter() - t0
        return to_plain(metrics)

    def resume(self, ckpt_dir: str | os.PathLike[str], notes: list[str]) -> tuple[int, list[dict[str, Any]]]:
        """Restore the last checkpoint in `ckpt_dir`; returns (first epoch to run, history)."""
        path = checkpoint_path(ckpt_dir)
        if not path.exists():
            notes.append(f"resume=True but {path} does not exist; starting from epoch 0")
            return 0, []
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, model=self.model, optimizer=self.optimizer, hooks=self.hooks,
                         cfg=self.cfg.to_dict(), steps_per_epoch=self.steps_per_epoch,
                         ignore_cfg=RESUMABLE_CHANGES, scheduler_state=self.scheduler.state_dict())
        restore_checkpoint(ckpt, model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, hooks=self.hooks)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        return int(ckpt["epoch"]) + 1, list(ckpt["history"])


def train(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any] | None,
          cfg: TrainConfig, hooks: Sequence[Any] = (), ckpt_dir: str | os.PathLike[str] | None = None,
          log_path: str | os.PathLike[str] | None = None, device: str | torch.device | None = None,
          progress: bool = True, resume: bool = False) -> TrainResult:
    """Train `model` in place for `cfg.epochs` epochs and return its per-epoch history.

    `hooks` are `Hook` objects (see `prunekit.engine.hooks`: they may add loss terms, edit
    gradients, take parameters out of the main optimizer or into their own groups, and step their
    own parameters, reading the loop's `TrainState`); `ckpt_dir` receives `last.pt`
    after every epoch; `log_path` receives JSONL records; `device` defaults to CUDA (the local
    rank's GPU under torchrun) when available. With `resume=True` training continues after the
    last completed epoch saved in `ckpt_dir` (a missing checkpoint starts from epoch 0, noted);
    on CPU the outcome equals that of an uninterrupted run. A hook with `state_dict()` and
    `load_state_dict()` is checkpointed under its index in `hooks`: resume with the same hooks
    in the same order. The model, optimizer, scheduler, config and loader length must match the
    checkpoint, else CheckpointError (the model is left untouched).

    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> train(nn.Linear(3, 2), data, None, TrainConfig(epochs=1), progress=False).best_val_acc is None
    True
    """
    hooks = _check_inputs(cfg, train_loader, val_loader, hooks, ckpt_dir, resume)
    _, _, local_rank = env_ranks()
    device = resolve_device(device, local_rank)
    ctx = init_distributed(device)
    try:
        return _train(model, train_loader, val_loader, cfg, hooks, ckpt_dir, log_path, device, ctx,
                      progress, resume)
    finally:
        shutdown(ctx)


def _train(model: nn.Module, train_loader: Any, val_loader: Any, cfg: TrainConfig, hooks: list[Any],
           ckpt_dir: Any, log_path: Any, device: torch.device, ctx: DistContext, progress: bool,
           resume: bool) -> TrainResult:
    seed_everything(cfg.seed)
    notes = []
    if cfg.bf16 and device.type != "cuda":
        notes.append(f"bf16=True ignored on {device.type}: autocast is used on CUDA only")
        warnings.warn(notes[-1], PrunekitWarning, stacklevel=3)
    model.to(device)
    # the default layout is put back only on a model that arrived in it: a channels-last one stays so
    restore = cfg.channels_last is None and resolve_channels_last(cfg, device) and not is_channels_last(model)
    if resolve_channels_last(cfg, device):
        to_channels_last_(model)
    try:
        with onednn_safe():  # narrow strided 1x1 convs take contiguous inputs (a oneDNN defect)
            return _train_loop(model, train_loader, val_loader, cfg, hooks, ckpt_dir, log_path, device, ctx,
                               progress, resume, notes)
    finally:
        if restore:
            model.to(memory_format=torch.contiguous_format)  # the layout the caller gave us


def resolve_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """cfg.channels_last, with None meaning on for CPU (measured faster there) and off elsewhere."""
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cpu"


def _train_loop(model: nn.Module, train_loader: Any, val_loader: Any, cfg: TrainConfig, hooks: list[Any],
                ckpt_dir: Any, log_path: Any, device: torch.device, ctx: DistContext, progress: bool,
                resume: bool, notes: list[str]) -> TrainResult:
    with MetricsLog(log_path, enabled=ctx.is_main) as log:
        run = _Run(model, cfg, hooks, device, ctx, len(train_loader), log, progress)
        if ckpt_dir is not None:  # what the first checkpoint would refuse, refused before training
            _check_outside_parameters(run.outside, hooks)
            hook_checkpoint_states(hooks)
        start, history = run.resume(ckpt_dir, notes) if resume else (0, [])
        run.wrap()
        run.bind(start)
        for note in notes:
            log.write("note", message=note)
        if start > 0:
            log.write("resume", from_epoch=start)
        for epoch in range(start, cfg.epochs):
            metrics = run.run_epoch(train_loader, val_loader, epoch)
            history.append(metrics)
            log.write("epoch", **metrics)
            if run.show_progress:
                tqdm.write(_summary_line(metrics, cfg.epochs))
            if ckpt_dir is not None and ctx.is_main:
                save_checkpoint(checkpoint_path(ckpt_dir), model=model, optimizer=run.optimizer,
                                scheduler=run.scheduler, epoch=epoch, steps_per_epoch=run.steps_per_epoch,
                                hooks=hooks, cfg=cfg.to_dict(), history=history)
    return _result(history, notes, start)


def _check_scalar(extra: Any, index: int, hook: Any) -> None:
    """ConfigError unless a hook's extra loss is one number (a tensor of one element, or a float)."""
    if isinstance(extra, torch.Tensor) and extra.numel() != 1:
        raise ConfigError(f"hooks[{index}] ({type(hook).__name__}).extra_loss returned a tensor of shape "
                          f"{tuple(extra.shape)}; return a scalar (sum or average its terms) or None")
    if not isinstance(extra, (torch.Tensor, numbers.Number)) or isinstance(extra, complex):
        raise ConfigError(f"hooks[{index}] ({type(hook).__name__}).extra_loss returned a {type(extra).__name__} "
                          f"({short_repr(extra)}); return a scalar tensor, a float or None")


def _summary_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch'] + 1}/{epochs}", f"train_loss {m['train_loss']:.4f}",
             f"train_acc {m['train_acc']:.4f}"]
    if "val_acc" in m:
        parts += [f"val_loss {m['val_loss']:.4f}", f"val_acc {m['val_acc']:.4f}"]
    return "  ".join(parts + [f"lr {m['lr']:.3g}", f"{m['epoch_time_s']:.1f} s"])


def _result(history: list[dict[str, Any]], notes: list[str], start: int) -> TrainResult:
    scored = [(h["val_acc"], h["epoch"]) for h in history if is_finite_number(h.get("val_acc"))]
    # Earliest epoch wins a tie: max() over (acc, -epoch).
    best = max(scored, key=lambda t: (t[0], -t[1])) if scored else (None, None)
    return TrainResult(history=history, best_val_acc=best[0], best_epoch=best[1],
                       final_metrics=dict(history[-1]) if history else {}, start_epoch=start, notes=notes)


def _sized(loader: Any) -> int | None:
    """len(loader), or None for a loader without one (an iterable dataset's DataLoader raises)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _check_outside_parameters(outside: dict[int, list[tuple[int, ...]]], hooks: list[Any]) -> None:
    """A checkpoint holds the model's parameters and each hook's state_dict: a parameter a hook trains
    outside the model, from a hook without state_dict/load_state_dict, would resume at its initial value."""
    lost = [(i, shapes) for i, shapes in outside.items() if not _has_state(hooks[i])]
    if lost:
        i, shapes = lost[0]
        raise ConfigError(f"hooks[{i}] ({type(hooks[i]).__name__}) trains {len(shapes)} parameter(s) outside the model "
                          f"(shape {list(shapes[0])}), which a checkpoint would not hold: a resumed run would start them "
                          "again from their first value. Register them on the model (model.register_parameter), or "
                          "give the hook state_dict()/load_state_dict() that save and restore them")


def _check_inputs(cfg: Any, train_loader: Any, val_loader: Any, hooks: Sequence[Any], ckpt_dir: Any,
                  resume: bool) -> list[Any]:
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"cfg must be a TrainConfig, got {type(cfg).__name__}; build one with TrainConfig(...)")
    try:
        n = len(train_loader)
    except TypeError:
        raise ConfigError(f"train_loader ({type(train_loader).__name__}) has no len(); "
                          "pass a sized iterable of (x, y) batches") from None
    if n == 0:
        raise ConfigError("train_loader has no batches; give it at least one (x, y) batch")
    if val_loader is not None and _sized(val_loader) == 0:
        # refused now, not after the first epoch has already trained the model in place
        raise ConfigError("val_loader has no batches; give it at least one (x, y) batch, or None to skip validation")
    hooks = list(hooks)
    for i, hook in enumerate(hooks):
        missing = [m for m in _HOOK_METHODS if not callable(getattr(hook, m, None))]
        if missing:
            raise ConfigError(f"hooks[{i}] ({type(hook).__name__}) lacks {', '.join(missing)}; "
                              "subclass prunekit.engine.hooks.Hook")
    if resume and ckpt_dir is None:
        raise ConfigError("resume=True needs ckpt_dir (the directory holding last.pt)")
    return hooks
