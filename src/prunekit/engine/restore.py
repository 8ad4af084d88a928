"""Putting a training checkpoint back into a run: check that it fits, then load it all or nothing.

`check_compatible` compares a checkpoint read by `checkpoint.load_checkpoint` with this run's
model, optimizer, hooks, config and loader before anything is loaded, so a refused checkpoint
leaves the model untouched. `restore_checkpoint` then loads the model (masks put back on a fresh
model first), optimizer, scheduler, hook and RNG states; a state refused part-way puts back what
was already loaded.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..core.config import short_repr
from ..core.errors import CheckpointError, load_error_text
from ..surgery.mask_io import plain_state_names, restore_masks_from_state, unpaired_masks
from ..surgery.masks import masked_modules, remove_parametrization_
from .checkpoint import _has_state, _hook_type, _plain_parameters, capture_rng_state, restore_rng_state
from .hooks import split_parameters


def check_compatible(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     hooks: Sequence[Any], cfg: dict[str, Any], steps_per_epoch: int,
                     ignore_cfg: Sequence[str] = (), scheduler_state: dict[str, Any] | None = None) -> None:
    """Raise CheckpointError unless `ckpt` fits this model, optimizer, hooks, config and loader.

    Runs before anything is loaded, so a refused checkpoint leaves the model untouched.
    `ignore_cfg` names config fields that may differ (they do not change the computation).
    `scheduler_state` (this run's scheduler's state_dict) checks the saved one has its form.
    """
    _refuse_other_config("TrainConfig", ckpt["cfg"], cfg, ignore_cfg)
    if ckpt["epoch"] >= cfg.get("epochs", ckpt["epoch"] + 1) or len(ckpt["history"]) != ckpt["epoch"] + 1:
        raise CheckpointError(f"checkpoint records epoch {ckpt['epoch']} with {len(ckpt['history'])} epoch records, "
                              f"which a run of {cfg.get('epochs')} epochs cannot have written; the file is damaged: "
                              "delete it to restart the run")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise CheckpointError(f"checkpoint has {ckpt['steps_per_epoch']} steps per epoch but the "
                              f"train loader has {steps_per_epoch}; resume with the same data and batch size")
    _check_model_state(ckpt["model"], model.state_dict())
    saved_groups = ckpt["optimizer"].get("param_groups", [])
    sizes_now = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in saved_groups] != sizes_now:
        raise CheckpointError("checkpoint optimizer has different parameter groups than this model's; "
                              "resume with the same model and optimizer settings")
    stateful = {str(i) for i, h in enumerate(hooks) if _has_state(h)}
    if set(ckpt["hooks"]) != stateful:
        raise CheckpointError(f"checkpoint holds state for hooks {sorted(ckpt['hooks'])} but the hooks "
                              f"with state_dict now are {sorted(stateful)}; pass the same hooks in the same order")
    for key, saved_type in ckpt["hook_types"].items():
        now_type = _hook_type(hooks[int(key)]) if key in stateful else None
        if now_type is not None and now_type != saved_type:
            raise CheckpointError(f"checkpoint holds the state of hooks[{key}] as a {saved_type} but hooks[{key}] is "
                                  f"now a {now_type}; pass the same hooks in the same order")
    for key in sorted(stateful & set(ckpt["hooks"])):  # a hook may refuse a state made with other settings
        check = getattr(hooks[int(key)], "check_state", None)
        if callable(check):
            check(ckpt["hooks"][key])
    for what, saved, now in (("optimizer settings", [{k: v for k, v in g.items() if k != "params"} for g in saved_groups],
                              [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]),
                             ("scheduler state", ckpt["scheduler"], scheduler_state)):
        where = _unlike(saved, now, what)
        if where:
            raise CheckpointError(f"checkpoint {where} does not have the form this run's has; the file is damaged "
                                  "or was written by other code: delete it to restart the run")
    _check_scheduler_steps(ckpt, scheduler_state)
    _check_optimizer_state(ckpt)
    _check_rng(ckpt["rng"])


def config_text(config: Any) -> str:
    """A method config as text a hook's state can hold (plain JSON, any callable named by str)."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def check_saved_config(saved: Any, config: Any) -> None:
    """CheckpointError when `saved` (a hook state's `config_text`) is not `config`'s: a resumed
    method would continue another run's search. States written without one are not checked."""
    if not isinstance(saved, str):
        return
    _refuse_other_config(type(config).__name__, json.loads(saved), json.loads(config_text(config)))


def _refuse_other_config(kind: str, saved: dict[str, Any], now: dict[str, Any], ignore: Sequence[str] = ()) -> None:
    """CheckpointError naming every field (but `ignore`) where a saved config differs from now's."""
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        pairs = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint was written with a different {kind} ({pairs}); resume with the same config "
                              "or use a new ckpt_dir")


def _check_scheduler_steps(ckpt: dict[str, Any], scheduler_state: dict[str, Any] | None) -> None:
    """The scheduler's step count is a count: a non-negative integer. (It is not compared with
    epochs x len(loader): a loader may yield more or fewer batches than its length says.)"""
    if scheduler_state is None or "last_epoch" not in scheduler_state:
        return
    steps = ckpt["scheduler"].get("last_epoch")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CheckpointError(f"checkpoint scheduler has taken {short_repr(steps)} steps, which no run takes; the "
                              "file is damaged: delete it to restart the run")


def _check_optimizer_state(ckpt: dict[str, Any]) -> None:
    """Every saved optimizer state tensor has its parameter's shape and a floating dtype ("step"
    counters: one number). Parameters are found by the names the checkpoint records for them."""
    names, state = ckpt.get("optimizer_params"), ckpt["optimizer"]["state"]
    if names is None:
        return  # an older file: parameters are matched by position only
    shapes = {k: tuple(v.shape) for k, v in plain_state_names(ckpt["model"]).items()}
    for group, group_names in zip(ckpt["optimizer"]["param_groups"], names):
        for index, name in zip(group["params"], group_names):
            entry = state.get(index) if not isinstance(index, (dict, list)) else None
            if name not in shapes or not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor):
                    continue
                ok = value.numel() == 1 if key == "step" else (
                    tuple(value.shape) == shapes[name] and value.is_floating_point())
                if not ok:
                    raise CheckpointError(f"checkpoint optimizer state of parameter {name!r} holds {key} of shape "
                                          f"{tuple(value.shape)} ({value.dtype}) for a parameter of shape "
                                          f"{shapes[name]}; the file is damaged: delete it to restart the run")


def _unlike(saved: Any, now: Any, where: str) -> str:
    """Where `saved` differs in form from `now` (plain data: numbers, strings, lists, dicts,
    tensors; None matches anything), "" when it does not."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if now is None or saved is None:
        return ""
    if isinstance(now, bool) or isinstance(now, str) or isinstance(now, torch.Tensor):
        return "" if isinstance(saved, type(now)) else where
    if number(now):  # a finite setting stays finite (a NaN lr is a number too)
        finite = lambda v: not isinstance(v, float) or math.isfinite(v)
        return "" if number(saved) and (finite(saved) or not finite(now)) else where
    if isinstance(now, dict):
        if not isinstance(saved, dict) or set(saved) != set(now):
            return where
        return next((w for k in now if (w := _unlike(saved[k], now[k], f"{where}[{k!r}]"))), "")
    if isinstance(now, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(now):
            return where
        return next((w for i, (a, b) in enumerate(zip(saved, now)) if (w := _unlike(a, b, f"{where}[{i}]"))), "")
    return ""


def _check_rng(state: dict[str, Any]) -> None:
    """CheckpointError unless `state` restores every generator; the current states are kept."""
    current = capture_rng_state()
    try:
        restore_rng_state(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint random generator states cannot be restored ({type(err).__name__}: "
                              f"{str(err)[:100]}); the file is damaged: delete it to restart the run") from None
    finally:
        restore_rng_state(current)


def restore_checkpoint(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, hooks: Sequence[Any]) -> None:
    """Load model, optimizer, scheduler, hook and RNG states (call `check_compatible` first).

    All or nothing: a state refused part-way (by the model, the optimizer, or a hook's own
    `load_state_dict`) puts back what was already loaded, masks included, and is one CheckpointError."""
    before = _Snapshot(model, optimizer, scheduler, hooks)
    try:
        _restore(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, hooks=hooks)
    except Exception as err:
        before.put_back()
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint state cannot be loaded into this run ({type(err).__name__}: "
                              f"{load_error_text(err, 200)}); the file is damaged or was written by other code: "
                              "delete it to restart the run") from None


class _Snapshot:
    """What `restore_checkpoint` may change, to put back when a restore fails part-way."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, hooks: Sequence[Any]):
        self.model, self.optimizer, self.scheduler, self.hooks = model, optimizer, scheduler, hooks
        self.masked = {(m, p) for m, _, p in masked_modules(model)}
        self.orders = {name: list(mod._parameters) for name, mod in model.named_modules()}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.groups = [list(g["params"]) for g in optimizer.param_groups]
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.scheduler_state = copy.deepcopy(scheduler.state_dict())
        self.hook_states = {i: copy.deepcopy(h.state_dict()) for i, h in enumerate(hooks) if _has_state(h)}
        self.rng = capture_rng_state()

    def put_back(self) -> None:
        for mname, module, pname in masked_modules(self.model):
            if (mname, pname) not in self.masked:  # masked by the restore: the same parameter comes back
                remove_parametrization_(module, pname, leave_parametrized=False)
        for name, module in self.model.named_modules():  # the unmasked weight re-registers last: reorder
            order = self.orders.get(name)
            if order is not None and order != list(module._parameters) and set(order) == set(module._parameters):
                module._parameters = type(module._parameters)((k, module._parameters[k]) for k in order)
        self.model.load_state_dict(self.state)
        for group, params in zip(self.optimizer.param_groups, self.groups):
            group["params"] = params
        self.optimizer.load_state_dict(self.optimizer_state)
        self.scheduler.load_state_dict(self.scheduler_state)
        for i, state in self.hook_states.items():
            self.hooks[i].load_state_dict(state)
        restore_rng_state(self.rng)


def _restore(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, hooks: Sequence[Any]) -> None:
    if restore_masks_from_state(model, ckpt["model"]):  # a fresh model gets the masks the run had
        # Masking moves each weight under `parametrizations`, after its module's own parameters in
        # model.parameters(); the run's optimizer was built from the masked model, so ours takes the
        # order that model gives: the default group in model.parameters() order, hook groups as listed.
        split = split_parameters(model, hooks)
        for group, params in zip(optimizer.param_groups, [split.default] + [g["params"] for g in split.groups]):
            group["params"] = list(params)
    _order_as_saved(optimizer, model, ckpt.get("optimizer_params"))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    for key, state in ckpt["hooks"].items():
        hooks[int(key)].load_state_dict(state)
    restore_rng_state(ckpt["rng"])


def _order_as_saved(optimizer: torch.optim.Optimizer, model: nn.Module, saved: list[list[str]] | None) -> None:
    """Give each group its parameters in the order the run's optimizer held them, found by name.

    The saved optimizer state is keyed by position, and masking a weight moves it in
    `model.parameters()`: a weight a hook masked during the run sits elsewhere in a model
    rebuilt for the resume. A group whose names do not all resolve to its own parameters keeps
    its order."""
    if saved is None:
        return
    by_name = _plain_parameters(model)
    for group, names in zip(optimizer.param_groups, saved):
        params = [by_name.get(n) for n in names]
        if all(p is not None for p in params) and len(params) == len(group["params"]) \
                and {id(p) for p in params} == {id(p) for p in group["params"]}:
            group["params"] = params


def _check_model_state(saved: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> None:
    if any(k not in saved for k in now if ".parametrizations." in f".{k}"):
        raise CheckpointError("the model carries weight masks (parametrizations) the checkpoint does not have; "
                              "resume with a model built as the run's was, or a fresh one")
    unpaired = unpaired_masks(saved)
    if unpaired:
        raise CheckpointError(f"checkpoint holds a weight mask without its masked weight ({unpaired[0]}); the file is "
                              "damaged or was written by other code: delete it to restart the run")
    # compare as unmasked models: masks saved with the run are put back on a fresh model on restore
    saved, now = plain_state_names(saved), plain_state_names(now)
    missing, extra = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}; resume with the model architecture the run started with")
    bad = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
           for k, v in now.items() if tuple(saved[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"checkpoint shapes do not fit the model ({'; '.join(bad[:5])}); "
                              "resume with the model architecture the run started with")
