"""Export a (pruned) model for deployment: ONNX, TorchScript or a torch.export program, checked.

`export_model(model, example_inputs, path)` works on a copy of `model` (the caller's model is
never changed): search-time sparse layers are hardened, weight masks baked in (exact zeros, no
parametrizations), the copy put in eval mode; then it is exported and the artifact is run on the
example inputs and, with `dynamic_batch`, on a random batch of another size, and its outputs are
compared with the copy's. An export that does not reproduce the model (a forward whose Python
control flow the exporter froze, an unsupported op) is an ExportError and no file is written:
the artifact is written to a temporary folder beside `path` and moved into place only once it
has passed.

Formats (from `format`, else from the suffix of `path`):
    "onnx"         .onnx  torch.onnx (dynamo exporter), checked with onnxruntime on the CPU;
                          needs the `export` extra: pip install "prunekit[export]"
    "exported"     .pt2   torch.export.save of a torch.export program (checked in memory)
    "torchscript"  .ts    torch.jit.trace, then torch.jit.save (checked in memory)

Nothing is loaded back through pickle: the TorchScript and torch.export checks run the program
in memory, the ONNX check parses the file with onnxruntime (protobuf).

>>> import torch, tempfile, os
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
>>> _ = net(torch.randn(1, 3, 8, 8))
>>> path = os.path.join(tempfile.mkdtemp(), "net.ts")
>>> r = export_model(net, torch.randn(1, 3, 8, 8), path)
>>> r.format, r.checked_batches, r.max_abs_diff < 1e-5
('torchscript', [1, 3], True)
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .core.errors import ConfigError, PrunekitError
from .core.modules import require_module
from .engine.batches import out_of_memory
from .graph.inputs import batch_size_of, check_inputs_fit
from .layers.sparse import harden_
from .surgery.masks import bake_masks_

FORMATS = {"onnx": ".onnx", "exported": ".pt2", "torchscript": ".ts"}


class ExportError(PrunekitError):
    """The exporter failed, or its artifact does not compute what the model computes."""


@dataclass
class ExportResult:
    """What was written: `path`, its `format`, `bytes` on disk, the batch sizes the artifact was
    checked at and the largest absolute difference from the model's outputs there (None when
    `check=False`), and the seconds the export and the check took."""

    path: str
    format: str
    bytes: int
    dynamic_batch: bool
    checked_batches: list[int]
    max_abs_diff: float | None
    tolerance: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_model(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], format: str | None = None,
                 dynamic_batch: bool = True, check: bool = True, overwrite: bool = False,
                 rtol: float = 1e-4) -> ExportResult:
    """Export a copy of `model` (masks baked, eval mode) to `path`; see the module docstring.

    `example_inputs` is a tensor or a tuple of positional tensors with the batch first. With
    `dynamic_batch` the batch size is left free (checked at the example's and at 3, or 2 when the
    example holds 3). Outputs must agree within rtol * max(1, max |output|) everywhere; for a
    float16 or bfloat16 model rtol is at least 8 rounding steps of that type (`tolerance` in the
    result).
    """
    require_module(model)
    path = Path(path)
    fmt = _format_of(path, format)
    inputs = _check_inputs(example_inputs)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; choose another path, or replace it with overwrite=True (CLI: --force)")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file path such as {path / ('model' + FORMATS[fmt])}")
    if fmt == "onnx":
        _require_onnx()
    net = _deployable_copy(model)
    if fmt == "onnx" and check:
        _check_onnx_dtypes(net, inputs)
    if check:
        check_runs(net, inputs)
    t0 = time.perf_counter()
    batches = _check_batches(inputs, dynamic_batch) if check else []
    rtol = _tolerance(rtol, net, inputs)
    with _staging_folder(path) as tmp:
        staged = Path(tmp) / path.name
        run = _EXPORTERS[fmt](net, _traced_at(inputs, dynamic_batch), staged, dynamic_batch)
        worst = _compare(net, run, inputs, batches, rtol, fmt) if check else None
        size = _publish(Path(tmp), path)
    return ExportResult(path=str(path), format=fmt, bytes=size, dynamic_batch=dynamic_batch, checked_batches=batches,
                        max_abs_diff=worst, tolerance=rtol if check else None, seconds=time.perf_counter() - t0)


def _format_of(path: Path, format: str | None) -> str:
    if format is None:
        found = next((f for f, suffix in FORMATS.items() if path.suffix == suffix), None)
        if found is None:
            raise ConfigError(f"cannot tell the format from {path.name!r}; end the path with "
                              f"{', '.join(FORMATS.values())}, or give the format (CLI: --format): one of {', '.join(FORMATS)}")
        return found
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not known; choose one of: {', '.join(FORMATS)}")
    return format


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError("example_inputs must be a tensor or a tuple of tensors (positional inputs, batch first); "
                          f"got {type(example_inputs).__name__}")
    if not batch_size_of(inputs, 0):
        raise ConfigError("example_inputs hold no batch: give at least one tensor with a batch dimension first")
    for t in inputs:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError("example_inputs hold NaN or inf; give finite inputs to export and check with")
    return tuple(inputs)


def check_runs(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """One plain forward before exporting: inputs the model cannot take (a wrong shape, channel
    count or dtype) are one ConfigError saying what it expects, not an exporter's error; running
    out of memory passes through as it is."""
    try:
        with torch.no_grad():
            net(*inputs)
    except Exception as err:  # noqa: BLE001 (any failure of the user's forward on these inputs)
        if out_of_memory(err):
            raise
        check_inputs_fit(net, inputs, {}, err)
        raise


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if _absent(name)]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install \"prunekit[export]\" "
                          "(or choose format 'exported' or 'torchscript')")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _deployable_copy(model: nn.Module) -> nn.Module:
    """A copy of the model as it runs at inference: sparse layers hardened, masks baked, eval mode."""
    from .core.modules import first_nonfinite, nonfinite_words, unwrap_model

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    net = copy.deepcopy(unwrap_model(model))
    harden_(net)
    bake_masks_(net)
    bad = first_nonfinite(net)  # the rule prune_ applies: buffers may hold -inf on purpose
    if bad is not None:
        kind, name = bad
        raise ConfigError(f"{kind} {name} holds {nonfinite_words(kind)}; an export would carry it into the "
                          "outputs: load weights that are finite")
    return net.eval()


def _floating_dtypes(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> set[torch.dtype]:
    return {t.dtype for t in (*inputs, *net.parameters(), *net.buffers()) if t.is_floating_point()}


def _tolerance(rtol: float, net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """rtol, widened to a few rounding steps of the model's lowest floating precision: float16
    kernels of two runtimes differ by about one float16 step, far above a float32 rtol."""
    return max([rtol] + [8 * torch.finfo(dtype).eps for dtype in _floating_dtypes(net, inputs)])


def _check_onnx_dtypes(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    if torch.bfloat16 in _floating_dtypes(net, inputs):
        raise ConfigError("the ONNX check cannot run a bfloat16 model: onnxruntime has no bfloat16 kernels on the "
                          "CPU; export a float32 or float16 copy (model.float()), skip the check with check=False "
                          "(CLI: --no-check), or choose format 'exported' or 'torchscript'")


def _check_batches(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> list[int]:
    batch = batch_size_of(inputs)
    return [batch] + ([3 if batch != 3 else 2] if dynamic_batch else [])


def _at_batch(inputs: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The inputs with `batch` samples: the example itself at its own batch, else random floating
    values (seeded) and the example's integer values (token ids) repeated, as export checks need."""
    given = batch_size_of(inputs)
    if batch == given:
        return inputs
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != given:
            out.append(t)  # not batched (a shared mask, a scalar): as given
        elif t.is_floating_point():
            spread = t.std(correction=0).clamp_min(1e-3)  # one value per sample has no sample std
            out.append(torch.randn((batch, *t.shape[1:]), generator=gen).to(t.device, t.dtype) * spread + t.mean())
        else:
            out.append(t[torch.arange(batch) % given])
    return tuple(out)


def _traced_at(inputs: tuple[torch.Tensor, ...], dynamic: bool) -> tuple[torch.Tensor, ...]:
    """The inputs the exporter traces with: a one-sample example is repeated to two samples when
    the batch stays free (exporters fix a dimension of size 1 to 1)."""
    given = batch_size_of(inputs)
    if not dynamic or given != 1:
        return inputs
    return tuple(t.repeat(2, *[1] * (t.dim() - 1)) if t.dim() and t.shape[0] == given else t for t in inputs)


def _batch_dims(inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    given, dim = batch_size_of(inputs), torch.export.Dim("batch", min=1)
    return tuple({0: dim} if t.dim() and t.shape[0] == given else None for t in inputs)


Runner = Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]]


def _export_onnx(net: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> Runner:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")  # and its progress lines and notes (e.g. torchvision ops it skips)
        try:
            program = torch.onnx.export(net, inputs, dynamo=True, verbose=False,
                                        dynamic_shapes=_batch_dims(inputs) if dynamic else None)
            program.save(str(path))
        except Exception as err:
            raise ExportError(f"torch.onnx could not export this model ({type(err).__name__}: "
                              f"{_first_line(err)}); try format 'exported' or 'torchscript'") from None
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime cannot load the exported model ({_first_line(err)})") from None
    names = [i.name for i in session.get_inputs()]

    def run(xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, xs)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    return run


def _export_program(net: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> Runner:
    try:
        program = torch.export.export(net, inputs, dynamic_shapes=_batch_dims(inputs) if dynamic else None)
        torch.export.save(program, str(path))
    except Exception as err:
        raise ExportError(f"torch.export could not export this model ({type(err).__name__}: {_first_line(err)}); "
                          "try format 'torchscript', or dynamic_batch=False (--static-batch)") from None
    module = program.module()
    return lambda xs: _flat(module(*xs))


def _export_torchscript(net: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace warnings; the output check below is what decides
        try:
            traced = torch.jit.trace(net, inputs, check_trace=False, strict=False)  # strict refuses dict outputs
            torch.jit.save(traced, str(path))
        except Exception as err:
            raise ExportError(f"torch.jit.trace could not trace this model ({type(err).__name__}: "
                              f"{_first_line(err)}); try format 'exported' or 'onnx'") from None
    return lambda xs: _flat(traced(*xs))


_EXPORTERS = {"onnx": _export_onnx, "exported": _export_program, "torchscript": _export_torchscript}


def _compare(net: nn.Module, run: Runner, inputs: tuple[torch.Tensor, ...], batches: list[int], rtol: float,
             fmt: str) -> float:
    worst = 0.0
    for i, batch in enumerate(batches):
        xs = _at_batch(inputs, batch, seed=i)
        with torch.no_grad():
            want = _flat(net(*xs))
            try:
                got = run(xs)
            except Exception as err:
                raise ExportError(f"the {fmt} export fails at batch {batch} ({type(err).__name__}: {_first_line(err)})"
                                  + ("; export with dynamic_batch=False (--static-batch) to fix the batch size"
                                     if batch != batches[0] else "")) from None
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
            raise ExportError(f"the {fmt} export returns shapes {[tuple(g.shape) for g in got]} at batch {batch}, "
                              f"the model {[tuple(w.shape) for w in want]}")
        for g, w in zip(got, want):
            diff = float((g.float() - w.float()).abs().max()) if w.numel() else 0.0
            bound = rtol * max(1.0, float(w.float().abs().max()) if w.numel() else 0.0)
            if not diff <= bound:  # NaN fails too
                raise ExportError(f"the {fmt} export computes another function: at batch {batch} its outputs differ "
                                  f"from the model's by up to {diff:.3g} (allowed {bound:.3g}); a forward whose "
                                  "Python logic depends on values or on call counts cannot be exported as traced")
            worst = max(worst, diff)
    return worst


@contextlib.contextmanager
def _quiet_logger(name: str) -> Any:
    """Only errors from logger `name` (and its children) while inside."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    raise ExportError(f"the model returns {type(out).__name__}; export needs tensors (or tuples, lists, dicts of them)")


@contextlib.contextmanager
def terminate_as_exit() -> Any:
    """For a program that owns its process (the CLI): while inside, SIGTERM ends the process
    through SystemExit(143), so an export's staging folder is removed on the way out (the default
    action ends it on the spot). Only in the main thread, and only over the default action: a
    handler someone else set is kept. export_model itself never touches signal handlers."""
    if (not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _staging_folder(path: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside `path`, which the export is written into before it is moved. Its
    name holds this host and process id, so the folders of exports to `path` that were killed
    (SIGKILL: nothing could clean up) are recognised and removed by the next export."""
    parent = _parent(path)
    _remove_stale_staging(Path(parent), path.name)
    try:
        return tempfile.TemporaryDirectory(prefix=f".{path.name}.{_owner()}.", dir=parent)
    except OSError as err:
        raise ConfigError(f"cannot write in {parent} ({err.strerror}); choose a writable folder") from None


def _owner() -> str:
    """This host and process, read at each call (a forked worker is not its parent)."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


def _remove_stale_staging(parent: Path, name: str) -> None:
    """Remove the staging folders beside `name` left by processes of this host that no longer run
    (POSIX only: there a signal 0 asks whether a process runs without touching it)."""
    if os.name != "posix":
        return
    host = _owner().rsplit("-", 1)[0]
    # tempfile adds 8 characters of [a-z0-9_]: nothing else (another target's folder) matches
    pattern = re.compile(rf"^\.{re.escape(name)}\.{re.escape(host)}-(\d+)\.[a-z0-9_]{{8}}$")
    try:
        entries = list(parent.iterdir())
    except OSError:  # a folder that cannot be listed: nothing is cleaned, the export goes on
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if found and entry.is_dir() and not entry.is_symlink() and not _running(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # another user's process (PermissionError), or no such id here
        return True
    return True


def _parent(path: Path) -> str:
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"cannot write {path}: {above} is a file, not a folder; choose another path")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {path.parent} ({err.strerror}); choose a writable folder") from None
    return str(path.parent)


def _publish(staged: Path, path: Path) -> int:
    """Move every file the exporter wrote (the model, and ONNX external data beside it) into
    path's folder; returns the bytes moved."""
    size = 0
    for f in sorted(staged.iterdir()):
        size += f.stat().st_size
        shutil.move(str(f), str(path.parent / f.name))
    return size


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
