"""Training checkpoints that resume exactly, and seeds that make CPU runs reproducible.

A checkpoint is one file, `<ckpt_dir>/last.pt`, written at the end of every epoch. It is made
with `torch.save` but holds only plain content (tensors, dicts, lists, strings, numbers), so it
loads with `torch.load(..., weights_only=True)`, which never runs pickled code:

    format, format_version      "prunekit.train_checkpoint", 1
    epoch                       the last completed epoch (0-based)
    steps_per_epoch             len(train_loader) when it was written
    model, optimizer, scheduler their state_dicts
    optimizer_params            per optimizer group, the names of its parameters in order, as an
                                unmasked model names them (absent in older files)
    hooks                       {str(index): hook.state_dict()} for hooks that define it
    rng                         torch CPU (+ CUDA) generator states, numpy's, python's
    meta_json                   JSON text: {"cfg": TrainConfig.to_dict(), "history": [...],
                                "hook_types": {str(index): class name} of the saved hook states}
    checksum                    `payload_sha256` of everything above, verified on load

A model with weight masks (`prunekit.surgery.masks.Mask`) saves them in its state; resuming into
a freshly built model puts them back before the weights are loaded.

Hook state: a hook that has both `state_dict()` and `load_state_dict(state)` is saved under its
index in the `hooks` list (with its class name) and restored on resume, so pass the hooks in the
same order: a hook of another class at a saved index is refused. Its state
must be plain content too (tensors, numbers, strings, lists, dicts); anything else is refused at
save time with a CheckpointError.

Writes are atomic: the file is written to a temporary name in the same directory and moved over
`last.pt` with `os.replace`, so a crash leaves either the old or the new checkpoint, never half.

>>> seed_everything(0); a = torch.rand(2)
>>> seed_everything(0); b = torch.rand(2)
>>> torch.equal(a, b)
True
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.config import short_repr
from ..core.errors import CheckpointError
from ..core.integrity import atomic_write, tensors_sha256
from ..surgery.mask_io import plain_state_names, restore_masks_from_state, unpaired_masks
from ..surgery.masks import masked_modules, remove_parametrization_
from .hooks import split_parameters

FORMAT = "prunekit.train_checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "last.pt"


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator, as plain tensors and numbers."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back generator states from `capture_rng_state` (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_path(ckpt_dir: str | os.PathLike[str]) -> Path:
    """Where `train` keeps the latest checkpoint of a run."""
    return Path(ckpt_dir) / CHECKPOINT_NAME


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace.

    Disk-full and permission errors become one CheckpointError line; no temporary file stays.
    """
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def payload_sha256(payload: dict[str, Any]) -> str:
    """sha256 over every leaf of a checkpoint payload except "checksum": tensors by their bytes
    (`tensors_sha256`, keyed by their path such as "model/conv.weight"), other leaves as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, str] = {}

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[where] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}")
        else:
            others[where] = repr(obj)

    for key in sorted(k for k in payload if k != "checksum"):
        walk(payload[key], key)
    digest = hashlib.sha256(tensors_sha256(tensors).encode())
    digest.update(json.dumps(others, sort_keys=True).encode())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, steps_per_epoch: int, hooks: Sequence[Any],
                    cfg: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Write the full training state after `epoch` atomically to `path`."""
    hook_states, hook_types = {}, {}
    for i, hook in enumerate(hooks):
        if _has_state(hook):
            state = hook.state_dict()
            _check_plain(state, f"hooks[{i}] ({type(hook).__name__}).state_dict()")
            hook_states[str(i)], hook_types[str(i)] = state, _hook_type(hook)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "epoch": int(epoch), "steps_per_epoch": int(steps_per_epoch),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "optimizer_params": _optimizer_names(optimizer, model),
        "scheduler": scheduler.state_dict(), "hooks": hook_states, "rng": capture_rng_state(),
        "meta_json": json.dumps({"cfg": cfg, "history": history, "hook_types": hook_types}),
    }
    payload["checksum"] = payload_sha256(payload)
    atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; CheckpointError if missing, corrupt or foreign.

    The returned dict has the layout described in the module docstring, with `meta_json`
    decoded into `cfg` and `history`. Nothing is applied to any model here.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train without resume=True to start one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (zip, pickle and OS errors all mean "unreadable")
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not loadable with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "delete it to restart the run, or point ckpt_dir at an intact one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunekit training checkpoint; "
                              "point ckpt_dir at a directory written by prunekit.engine.train")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')!r}; "
                              f"this prunekit reads version {FORMAT_VERSION}; restart the run")
    missing = [k for k in ("epoch", "steps_per_epoch", "model", "optimizer", "scheduler",
                           "hooks", "rng", "meta_json", "checksum") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is damaged, delete it to restart")
    if payload_sha256(ckpt) != ckpt["checksum"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum "
                              "stored with them; delete it to restart the run, or restore a good copy")
    try:
        meta = json.loads(ckpt.pop("meta_json"))
        ckpt["cfg"], ckpt["history"] = meta["cfg"], meta["history"]
        ckpt["hook_types"] = meta.get("hook_types", {})  # absent in files written before it was recorded
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{path} has an unreadable metadata block; delete it to restart") from None
    wrong = _layout_error(ckpt)
    if wrong:
        raise CheckpointError(f"{path} is damaged: {wrong}; delete it to restart the run")
    return ckpt


def _layout_error(ckpt: dict[str, Any]) -> str:
    """What is wrong with the types of a checkpoint's entries ("" when nothing is)."""
    count = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low
    model, opt = ckpt["model"], ckpt["optimizer"]
    checks = [
        (count(ckpt["epoch"], 0), "epoch is not an integer >= 0"),
        (count(ckpt["steps_per_epoch"], 1), "steps_per_epoch is not an integer >= 1"),
        (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()),
         "the model state is not a mapping of names to tensors"),
        (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
         and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]),
         "the optimizer state is not an optimizer's state_dict"),
        ("optimizer_params" not in ckpt or isinstance(ckpt["optimizer_params"], list) and all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in ckpt["optimizer_params"]),
         "the optimizer's parameter names are not lists of names"),
        (isinstance(ckpt["scheduler"], dict), "the scheduler state is not a mapping"),
        (isinstance(ckpt["hooks"], dict) and all(isinstance(k, str) and k.isdigit() for k in ckpt["hooks"]),
         "the hook states are not a mapping of hook indices"),
        (isinstance(ckpt["rng"], dict), "the random generator states are not a mapping"),
        (isinstance(ckpt["cfg"], dict), "its training config is not a mapping"),
        (isinstance(ckpt["history"], list) and all(isinstance(h, dict) for h in ckpt["history"]),
         "its history is not a list of records"),
        (isinstance(ckpt["hook_types"], dict) and all(isinstance(v, str) for v in ckpt["hook_types"].values()),
         "its hook classes are not a mapping of hook indices to names"),
    ]
    return next((why for ok, why in checks if not ok), "")


def check_compatible(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     hooks: Sequence[Any], cfg: dict[str, Any], steps_per_epoch: int,
                     ignore_cfg: Sequence[str] = (), scheduler_state: dict[str, Any] | None = None) -> None:
    """Raise CheckpointError unless `ckpt` fits this model, optimizer, hooks, config and loader.

    Runs before anything is loaded, so a refused checkpoint leaves the model untouched.
    `ignore_cfg` names config fields that may differ (they do not change the computation).
    `scheduler_state` (this run's scheduler's state_dict) checks the saved one has its form.
    """
    diff = sorted(k for k in set(cfg) | set(ckpt["cfg"])
                  if k not in ignore_cfg and cfg.get(k) != ckpt["cfg"].get(k))
    if diff:
        pairs = ", ".join(f"{k}: saved {ckpt['cfg'].get(k)!r} vs now {cfg.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint was written with a different TrainConfig ({pairs}); "
                              "resume with the same config or use a new ckpt_dir")
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
                              f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); the file is "
                              "damaged or was written by other code: delete it to restart the run") from None


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


def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by the names an unmasked model gives them ("m.w", not
    "m.parametrizations.w.original")."""
    return plain_state_names(dict(model.named_parameters()))


def _optimizer_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Per group, the plain name of each parameter in the optimizer's order ("" outside the model)."""
    names = {id(p): n for n, p in _plain_parameters(model).items()}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


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


def _hook_type(hook: Any) -> str:
    return type(hook).__qualname__


def _has_state(hook: Any) -> bool:
    return callable(getattr(hook, "state_dict", None)) and callable(getattr(hook, "load_state_dict", None))


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _check_plain(obj: Any, where: str) -> None:
    # weights_only loading accepts only these types; catching others here names the culprit at
    # save time instead of producing a checkpoint that can never be loaded.
    if isinstance(obj, (torch.Tensor,) + _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__name__}, which a weights_only checkpoint cannot "
                          "hold; return tensors, numbers, strings, None and lists/dicts of them")
