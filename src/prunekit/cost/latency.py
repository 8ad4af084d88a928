"""Honest wall-clock latency of a forward pass, alone or side by side.

What "honest" means here: the model runs in eval mode under no-grad/inference mode, warm-up runs
are discarded, every repeat is timed on its own (CPU: `time.perf_counter`; CUDA: a pair of CUDA
events around the call, with the GPU idle at the start of each repeat), and the result reports the
median and the spread over all repeats together with the device, dtype, batch and torch version.
The user's model is never changed: dtype/device/memory-format conversions happen on a
`copy.deepcopy`, and when no conversion is needed the module is used as is and every submodule's
training flag is restored afterwards.

`compare_latency` times several models interleaved (round-robin over the repeats, rotating the
order each round) so that clock drift, thermal throttling or a noisy neighbour hits all of them
alike; that is the primitive the benchmarks use for "original vs pruned".

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
>>> res = measure_latency(net, (16,), LatencyConfig(warmup=2, repeats=5))
>>> res.n, res.batch, res.dtype
(5, 1, 'float32')
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import itertools
import os
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..core.config import Config, check_choice, check_int
from ..core.environment import check_input_fits, cpu_model
from ..core.errors import ConfigError, PrunekitError, PrunekitWarning
from ..core.layout import is_channels_last, to_memory_format_
from ..core.modes import kept_modes
from ..engine.batches import out_of_memory
from ..graph.inputs import batch_size_of
from .latency_results import LatencyComparison, LatencyResult

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A per-sample shape (batch added from the config), one example batch, or several positional inputs.
Inputs = Union[Sequence[int], torch.Tensor, Sequence[torch.Tensor]]


@dataclasses.dataclass
class LatencyConfig(Config):
    """How to time a forward pass.

    device: "cpu", "cuda" or "auto" (CUDA when available). dtype: "float32", "bfloat16" or
    "float16" (parameters and floating inputs are cast on a copy). batch_size: batch built from a
    per-sample input shape. warmup: untimed calls first (the very first call is never timed, so
    0 and 1 behave alike). repeats: timed calls (n).
    channels_last: NHWC memory format for 4-D tensors, the model's and the inputs' (False: the standard,
    contiguous format, into which a channels-last model's timed copy and channels-last inputs are
    converted; None: the format each model is laid out in; a 5-D tensor stays contiguous either way). cuda_graph: capture the forward once in a
    CUDA graph and time graph replays. compile: time `torch.compile(model)` (torch.compiler's caches are
    reset for each model timed, so that the many widths of a lookup table all compile). threads: CPU threads
    for the measurement (None keeps torch's current setting); on a shared machine threads=1
    avoids parallel regions stalling on a descheduled worker thread.

    >>> LatencyConfig(device="cpu", repeats=20).to_dict()["repeats"]
    20
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    warmup: int = 10
    repeats: int = 50
    channels_last: bool | None = False
    cuda_graph: bool = False
    compile: bool = False
    threads: int | None = None

    def validate(self) -> None:
        check_choice("device", self.device, DEVICES)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("batch_size", self.batch_size, 1)
        check_int("warmup", self.warmup, 0)
        check_int("repeats", self.repeats, 1)
        for name in ("channels_last", "cuda_graph", "compile"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "channels_last" and value is None):
                extra = " (or null: the format the model is laid out in)" if name == "channels_last" else ""
                raise ConfigError(f"{name}={value!r} is invalid; use true or false{extra}")
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.cuda_graph and self.device == "cpu":
            raise ConfigError("cuda_graph=True needs device='cuda' or 'auto'; CUDA graphs do not exist on CPU")
        if self.cuda_graph and self.compile:
            raise ConfigError("set only one of cuda_graph and compile (torch.compile's "
                              "mode='reduce-overhead' already uses CUDA graphs)")
        if (self.cuda_graph or self.compile) and self.warmup < 1:
            raise ConfigError("cuda_graph/compile need warmup >= 1: the first call captures or "
                              "compiles and must not be timed")


def latency_settings(fields: Any) -> LatencyConfig:
    """A LatencyConfig from a method config's `latency` mapping (any LatencyConfig fields) over
    1 thread, 3 warm-up calls and 20 repeats on the CPU in float32: the setting a method measures
    with when it chooses something by timing.

    >>> latency_settings({"batch_size": 16}).batch_size, latency_settings({}).repeats
    (16, 20)
    """
    if not isinstance(fields, Mapping):
        raise ConfigError(f"latency={fields!r} must be a mapping of LatencyConfig fields, e.g. "
                          "{'device': 'cpu', 'batch_size': 16}")
    known = {f.name for f in dataclasses.fields(LatencyConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"latency has unknown field(s) {unknown}; use {sorted(known)}")
    try:
        return LatencyConfig(**{"threads": 1, "warmup": 3, "repeats": 20, **fields})
    except ConfigError as err:  # "batch_size=0 is invalid" alone reads like the data's batch size
        raise ConfigError(f"latency.{err}" if str(err).split("=")[0] in known else f"latency: {err}") from None


@contextlib.contextmanager
def out_of_memory_as_config_error(cfg: LatencyConfig, what: str, setting: str = "latency",
                                  todo: str | None = None) -> Iterator[None]:
    """Running out of memory inside the block (timing at cfg.batch_size) becomes one ConfigError
    that names the batch size to lower (`setting`: the section holding it) and `todo`, what to do
    (default: a smaller batch, the model left unchanged); any other error passes through as it is."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not (isinstance(err, MemoryError) or out_of_memory(err)):
            raise
        todo = todo or f"give a smaller {setting}.batch_size, e.g. 1; the model was left unchanged"
        raise ConfigError(f"timing {what} at {setting}.batch_size={cfg.batch_size} on {cfg.device} ran out of "
                          f"memory ({str(err).splitlines()[0][:160]}); {todo}") from err


def measure_latency(model: nn.Module, inputs: Inputs, cfg: LatencyConfig | None = None) -> LatencyResult:
    """Time `model`'s forward pass; the model is left exactly as it was.

    `inputs` is a per-sample shape such as (3, 32, 32) (a random batch of cfg.batch_size is made),
    an example batch tensor (its first dimension is the batch), or a tuple of tensors passed as
    positional arguments.

    >>> net = torch.nn.Linear(8, 4)
    >>> r = measure_latency(net, torch.randn(2, 8), LatencyConfig(warmup=1, repeats=3))
    >>> (r.batch, r.n, r.min_ms <= r.median_ms <= r.max_ms)
    (2, 3, True)
    """
    return compare_latency({"model": model}, inputs, cfg).results["model"]


def compare_latency(models: Mapping[str, nn.Module], inputs: Inputs,
                    cfg: LatencyConfig | None = None) -> LatencyComparison:
    """Time several models on the same input, interleaved; ratios are relative to the first.

    >>> a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    >>> cmp = compare_latency({"full": a, "pruned": b}, (8,), LatencyConfig(warmup=1, repeats=3))
    >>> cmp.ratios["full"], sorted(cmp.results)
    (1.0, ['full', 'pruned'])
    """
    cfg = cfg or LatencyConfig()
    if not isinstance(models, Mapping) or not models:
        raise ConfigError("compare_latency needs a non-empty dict {name: nn.Module}")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise ConfigError(f"model {name!r} is a {type(m).__name__}, not a torch.nn.Module")
    device = timing_device(cfg)
    base_inputs, batch, source = _normalise_inputs(inputs, cfg)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cpu_threads(cfg.threads))
        # inference_mode is the cheapest; compile/graph capture are only safe under no_grad.
        stack.enter_context(torch.no_grad() if (cfg.compile or cfg.cuda_graph) else torch.inference_mode())
        runners = {}
        for name, model in models.items():
            # per-module modes (a parent in train mode may hold submodules frozen in eval mode), put
            # back through each module's train(); LIFO: the same module passed twice restores correctly
            stack.enter_context(kept_modes(model))
            runner = _Runner(name, model, base_inputs, cfg, device)
            runners[name] = runner
        times = _interleaved_times(list(runners.values()), cfg)
        threads_used = torch.get_num_threads()
    cores = usable_cores()
    if device.type == "cpu" and threads_used > cores:
        warnings.warn(f"timed on {threads_used} torch threads with {cores} CPU core(s) for this process: the "
                      "threads wait on each other, and the timings say more about the scheduling than the "
                      f"model; set latency.threads (or bench.threads) to at most {cores}", PrunekitWarning, stacklevel=2)
    meta = {
        "device": device.type, "device_name": _device_name(device), "dtype": cfg.dtype,
        "batch": batch, "torch_version": torch.__version__,
    }
    results = {}
    for name, runner in runners.items():
        settings = {**runner.cfg.to_dict(), "device_resolved": str(device), "threads_used": threads_used,
                    "input": source, "input_shapes": [list(t.shape) for t in base_inputs],
                    "timed_copy": runner.copied}
        if len(models) > 1:
            settings["interleaved_with"] = [n for n in models if n != name]
        results[name] = LatencyResult.from_times(times[name], settings=settings, **meta)
    reference = next(iter(results))
    ref = results[reference].median_ms
    ratios = {k: (r.median_ms / ref if ref > 0 else float("nan")) for k, r in results.items()}
    ratios[reference] = 1.0
    return LatencyComparison(results=results, ratios=ratios, reference=reference)


def _interleaved_times(runners: list["_Runner"], cfg: LatencyConfig) -> dict[str, list[float]]:
    """First call, warm-up and timed repeats, round-robin with a rotating start."""
    for r in runners:
        r.first_call()
    for _ in range(max(cfg.warmup - 1, 0)):
        for r in runners:
            r.fn()
    if runners[0].device.type == "cuda":
        torch.cuda.synchronize(runners[0].device)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    # The garbage collector can pause for milliseconds at random; keep it out of the timed loop.
    # (No gc.collect() first: with torch loaded a full collection costs ~0.1 s per call.)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(cfg.repeats):
            k = rep % len(runners)
            for r in itertools.chain(runners[k:], runners[:k]):
                times[r.name].append(r.time_once())
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


class _Runner:
    """One model made ready for timing: `fn()` runs one forward pass on the prepared inputs."""

    def __init__(self, name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 cfg: LatencyConfig, device: torch.device):
        if cfg.channels_last is None:  # time the model in the layout it is in
            cfg = cfg.replace(channels_last=is_channels_last(model))
        self.name, self.cfg, self.device = name, cfg, device
        dtype = DTYPES[cfg.dtype]
        self.copied = _needs_copy(model, cfg, device, dtype)
        work = _converted_copy(name, model, cfg, device, dtype) if self.copied else model
        work.eval()
        self.inputs = tuple(_convert_input(t, cfg, device, dtype) for t in inputs)
        if cfg.compile:  # a fresh compile per timed model: dynamo's per-code recompile limit (8) would
            torch.compiler.reset()  # leave later widths of a lookup table running uncompiled, untold
        self.module: Callable[..., Any] = torch.compile(work) if cfg.compile else work
        self.fn: Callable[[], Any] = self._forward
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def _forward(self) -> Any:
        return self.module(*self.inputs)

    def first_call(self) -> None:
        """Run the first forward (compiling or capturing if asked), naming the model on failure."""
        try:
            if self.cfg.cuda_graph:
                self.fn = self._capture_graph()
            else:
                self._forward()
        except (RuntimeError, TypeError, ValueError) as err:
            shapes = [tuple(t.shape) for t in self.inputs]
            raise PrunekitError(f"model {self.name!r} failed on inputs of shape {shapes}: {err}") from err

    def _capture_graph(self) -> Callable[[], Any]:
        # Warm up on a side stream (lazy init, cuDNN autotune) before capture, as CUDA graphs need.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(min(self.cfg.warmup, 3)):
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._forward()  # keep the graph's output buffers alive
        return graph.replay

    def time_once(self) -> float:
        """Milliseconds for one call of `fn`, starting from an idle device."""
        if self.device.type == "cuda":
            start, end = self._events
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        self.fn()
        return (time.perf_counter() - t0) * 1e3


def latency_device(name: str) -> torch.device:
    """The device a latency setting names: "auto" is CUDA when available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch.cuda.is_available() is False; "
                          "use device='cpu' or 'auto'")
    return torch.device("cuda", torch.cuda.current_device())


def timing_device(cfg: LatencyConfig) -> torch.device:
    """The device `cfg` times on here; ConfigError when this machine cannot time as it says (CUDA
    without a GPU, or a CUDA graph where device='auto' finds only the CPU)."""
    device = latency_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph=True needs CUDA, but device={cfg.device!r} finds none here "
                          "(torch.cuda.is_available() is False); set cuda_graph=false")
    return device


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _normalise_inputs(inputs: Inputs, cfg: LatencyConfig) -> tuple[tuple[torch.Tensor, ...], int, str]:
    """(input tensors on CPU or wherever given, batch size, "shape" | "example")."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        batch = batch_size_of(inputs)
        return tuple(inputs), batch, "example"
    ok = isinstance(inputs, (tuple, list, torch.Size)) and len(inputs) > 0 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in inputs)
    if not ok:
        raise ConfigError(f"inputs={inputs!r} is invalid; give a per-sample shape such as (3, 32, 32), "
                          "an example batch tensor, or a tuple of tensors")
    check_input_fits((cfg.batch_size, *inputs), f"timing at batch_size={cfg.batch_size}")
    # A fixed seed keeps inputs identical across runs (values can matter, e.g. for ReLU sparsity).
    gen = torch.Generator().manual_seed(0)
    return (torch.randn((cfg.batch_size, *inputs), generator=gen),), cfg.batch_size, "shape"


def _needs_copy(model: nn.Module, cfg: LatencyConfig, device: torch.device, dtype: torch.dtype) -> bool:
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dim() == 4 and not t.is_contiguous(memory_format=fmt):  # timed as a copy in the asked layout
            return True
        if t.dim() == 5 and not t.is_contiguous():  # no channels-last layout: contiguous either way
            return True
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
    return False


def _converted_copy(name: str, model: nn.Module, cfg: LatencyConfig, device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
    try:
        work = copy.deepcopy(model)
    except Exception as err:  # deepcopy failures come in many types (pickling, custom __deepcopy__)
        layout = "channels-last" if cfg.channels_last else "contiguous"
        raise PrunekitError(f"model {name!r} cannot be deep-copied to be timed as {cfg.dtype} on {device} in the "
                            f"{layout} format ({err}); convert it yourself and time the converted model") from err
    work = work.to(device=device, dtype=dtype)
    return to_memory_format_(work, torch.channels_last if cfg.channels_last else torch.contiguous_format)


def _convert_input(t: torch.Tensor, cfg: LatencyConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Integer inputs (token ids, indices) keep their dtype; only floating tensors follow cfg.dtype.
    out = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if out.dim() == 4:  # a convolution follows its input's layout: a channels-last input would time channels-last
        out = out.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    # A forward with in-place ops on its input must not touch the caller's example tensor.
    return out.clone() if out is t else out


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity (macOS, Windows)
        return os.cpu_count() or 1


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """Use `threads` CPU threads inside the block, restoring torch's previous setting after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
