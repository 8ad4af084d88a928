"""Example inputs: how they are passed to the model, and a clear error when the model rejects them.

`build_graph` (hence `prune_`, `count_cost` and every method) runs the model once on the example
inputs. When that forward fails, the model is run again without the tracer: if the plain
forward fails too, the inputs are wrong for this model, and the user gets one `ConfigError`
saying what was given, what the model's first layer takes and how to build a fitting example,
instead of a torch traceback from deep inside the model.

>>> import torch
>>> describe_inputs((torch.zeros(2, 3, dtype=torch.int64),), {})
'a tensor int64 (2, 3)'
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, PrunekitError


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for `model(*args, **kwargs)`: a tensor is one argument, a tuple or list
    holds the positional arguments, a dict the keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ConfigError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
                          f"got {type(example_inputs).__name__}")
    if any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0 for t in (*args, *kwargs.values())):
        raise ConfigError(f"example_inputs hold no sample ({describe_inputs(args, kwargs)}); give a batch of one "
                          "sample or more, e.g. torch.randn(1, 3, 32, 32)")
    return args, kwargs


def batch_size_of(inputs: Any, default: int = 1) -> int:
    """dim 0 of the first tensor of `inputs` that has a dimension (a scalar input such as a
    temperature holds no batch); `default` when there is none."""
    return next((int(t.shape[0]) for t in inputs if isinstance(t, torch.Tensor) and t.dim()), default)


def samples_of(inputs: Any, sequence_shape: tuple[int, int] | None = None) -> int:
    """How many samples `inputs` hold, the divisor of per-sample costs: dim 0 of the first tensor
    with a dimension, except for a sequence-first input (L, N, ...): when the model's first sequence
    op (attention, RNN) ran on `sequence_shape` = (L, N) and the input's first two dims are L and N,
    the input is read as sequence-first and N is the count; when that op ran on one sequence (N = 1)
    and the input is an unbatched (L, E) or (L,) whose first dim is L, it is one sample. (A
    batch-first model whose first RNN runs on N*S sentences of W words, say, keeps dim 0: its input
    does not start with (W, N*S).)"""
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim()), None)
    if first is None:
        return 1
    if sequence_shape is not None:
        length, batch = (int(n) for n in sequence_shape)
        if batch == 1 and first.dim() <= 2 and first.shape[0] == length:  # (L, E) or token ids (L,)
            return 1
        if first.dim() >= 2 and tuple(first.shape[:2]) == (length, batch):
            return batch
    return int(first.shape[0])


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """'a tensor float32 (1, 3, 8, 8)', 'a list of 2 items', ...: what the caller passed."""
    parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) if parts else "no inputs"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


def expected_inputs(model: nn.Module) -> str:
    """What the model's forward takes, from its signature and its first layer with weights."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        sig = f"forward({', '.join(p.name for p in params)})"
    except (TypeError, ValueError):
        sig = "forward(...)"
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            dims = ", ".join(["N", str(mod.in_channels)] + list("DHW"[3 - len(mod.kernel_size):]))
            return (f"{sig}; its first layer `{name}` ({type(mod).__name__}) takes a "
                    f"{_dtype(mod)} tensor ({dims})")
        if isinstance(mod, nn.Linear):
            return f"{sig}; its first layer `{name}` (Linear) takes a {_dtype(mod)} tensor (N, ..., {mod.in_features})"
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            return f"{sig}; its first layer `{name}` ({type(mod).__name__}) takes an integer tensor of ids < {mod.num_embeddings}"
    return sig


def _dtype(mod: nn.Module) -> str:
    return str(mod.weight.dtype).replace("torch.", "")


def check_inputs_fit(model: nn.Module, args: tuple, kwargs: dict, failure: BaseException) -> None:
    """After `failure` in a traced forward: raise ConfigError if the plain forward fails as well.

    A plain forward that succeeds means the failure came from tracing, so the caller re-raises
    it unchanged. Runs under no_grad in the modules' current modes (eval while tracing).
    """
    if isinstance(failure, PrunekitError):
        return
    entered: list[str] = []  # the layers (modules without children) the forward reached, in order
    leaves = {n: m for n, m in model.named_modules() if not any(True for _ in m.children())}
    hooks = [m.register_forward_pre_hook(lambda mod, _a, name=n: entered.append(name)) for n, m in leaves.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 (any failure of the user's forward on these inputs)
        first = " ".join(str(err).split())[:200] or type(err).__name__
        # layers with weights of their own that took the inputs (a Flatten or an Identity in front says nothing)
        passed = [n for n in dict.fromkeys(entered) if n != entered[-1] and any(
            True for _ in leaves[n].parameters(recurse=False))] if entered else []
        if passed:  # earlier layers took the inputs: the failure is further in, likely the model's own code
            raise ConfigError(
                f"the model's forward fails in or after layer `{entered[-1]}` ({type(leaves[entered[-1]]).__name__}), "
                f"once {len(passed)} earlier layer(s) ran on the example inputs ({describe_inputs(args, kwargs)}): "
                f"{type(err).__name__}: {first}. Check the model's code there (the exception's cause shows the "
                f"failing line), or the input size if the model depends on it (expected {expected_inputs(model)})"
            ) from err
        raise ConfigError(
            f"the model cannot run on the example inputs: given {describe_inputs(args, kwargs)}; expected "
            f"{expected_inputs(model)} ({type(err).__name__}: {first}). Pass example inputs that "
            "model(example_inputs) accepts: one tensor, a tuple of positional tensors or a dict of keyword "
            "tensors, with the batch first (e.g. torch.zeros(1, 3, 32, 32) for a CIFAR model)") from None
    finally:
        for h in hooks:
            h.remove()
