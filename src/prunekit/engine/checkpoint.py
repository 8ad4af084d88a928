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
a freshly built model puts them back before the weights are loaded (`restore.py` checks a
checkpoint against the run and loads it).

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

import hashlib
import json
import os
import pickle  # only for the exception type: nothing is unpickled
import random
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.integrity import atomic_write, tensors_sha256
from ..surgery.mask_io import plain_state_names

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
    hook_states, hook_types = hook_checkpoint_states(hooks), {}
    for i in hook_states:
        hook_types[i] = _hook_type(hooks[int(i)])
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


def hook_checkpoint_states(hooks: Sequence[Any]) -> dict[str, Any]:
    """{hook index: its state_dict()} for the hooks that have state, each checked to be something a
    checkpoint can hold (tensors, numbers, strings, lists, dicts): `train` calls this before its
    first epoch too, so a state that cannot be saved stops the run before it trains."""
    states = {}
    for i, hook in enumerate(hooks):
        if _has_state(hook):
            state = hook.state_dict()
            _check_plain(state, f"hooks[{i}] ({type(hook).__name__}).state_dict()")
            states[str(i)] = state
    return states


def load_checkpoint(path: str | os.PathLike[str],
                    advice: str = "delete it, and a resume starts that training again from its first epoch"
                    ) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; CheckpointError if missing, corrupt or foreign.

    The returned dict has the layout described in the module docstring, with `meta_json`
    decoded into `cfg` and `history`. Nothing is applied to any model here. `advice` ends the
    message for a file that cannot be read at all (the caller knows what the user gave).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train without resume=True to start one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's text suggests loading it unsafely: never passed on
        objects = zipfile.is_zipfile(path) and "global" in str(err).lower()  # a class or function it names
        what = ("holds Python objects other than tensors and plain values, which prunekit never loads (they could "
                "run code), so it is not a prunekit training checkpoint" if objects else
                "is damaged (its pickled contents cannot be read)" if zipfile.is_zipfile(path) else
                "is not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one), or is damaged")
        raise CheckpointError(f"{path} {what}; {advice}") from None
    except Exception as err:  # noqa: BLE001 (zip and OS errors all mean "unreadable")
        raise CheckpointError(
            f"checkpoint {path} is corrupt or cut short "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {advice}") from None
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


def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by the names an unmasked model gives them ("m.w", not
    "m.parametrizations.w.original")."""
    return plain_state_names(dict(model.named_parameters()))


def _optimizer_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Per group, the plain name of each parameter in the optimizer's order ("" outside the model)."""
    names = {id(p): n for n, p in _plain_parameters(model).items()}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


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
