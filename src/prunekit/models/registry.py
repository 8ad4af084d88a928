"""The model registry: every network prunekit can build by name.

A `ModelSpec` says how to build a model and what it eats (default input shape and number of
classes); `create_model` builds one. Two prefixes reach the big zoos without registering them
one by one: "tv:<name>" builds `torchvision.models.get_model(name, weights=None, ...)` and
"timm:<name>" builds `timm.create_model(name, pretrained=False, ...)`, each only when that
package imports; no weights are ever downloaded.

>>> model = create_model("resnet20", num_classes=100)
>>> get_model_spec("resnet20").input_shape, model.fc.out_features
((3, 32, 32), 100)
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..core.config import short_repr
from ..core.errors import ConfigError
from ..core.registry import Registry

# Zoo models are ImageNet classifiers; 224x224 RGB with 1000 classes is their shared default.
_ZOO_INPUT_SHAPE = (3, 224, 224)
_ZOO_NUM_CLASSES = 1000


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: `builder(num_classes=..., **kw)` returns a fresh nn.Module."""

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str


MODELS: Registry[ModelSpec] = Registry("model")


def list_models() -> list[str]:
    """Names of the locally defined models (the "tv:" and "timm:" zoos are not listed)."""
    return MODELS.list()


def get_model_spec(name: str) -> ModelSpec:
    """Look up the spec of a local model or of a "tv:"/"timm:" zoo model."""
    prefix, _, zoo_name = name.partition(":")
    if zoo_name and prefix in _ZOOS:
        return _zoo_spec(prefix, zoo_name)
    if name not in MODELS.list():
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS.list()))}, or a zoo model "
                          "as tv:<name> (torchvision, e.g. tv:resnet50) or timm:<name> (timm, e.g. timm:resnet18)")
    return MODELS.get(name)


def create_model(name: str, num_classes: int | None = None, **kw: Any) -> nn.Module:
    """Build a fresh, randomly initialised model by name.

    `num_classes` defaults to the spec's; extra keywords go to the builder (for example
    `shortcut="zeropad"` for the CIFAR ResNets, `in_channels=3, input_size=32` for LeNet-5).

    >>> create_model("vgg11_bn", num_classes=10).classifier.in_features
    512
    """
    spec = get_model_spec(name)
    if num_classes is None:
        num_classes = spec.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} is invalid; use a positive integer")
    _check_keywords(name, spec.builder, kw)
    if not kw:
        return spec.builder(num_classes=num_classes)
    try:
        return spec.builder(num_classes=num_classes, **kw)
    except (TypeError, ValueError, ArithmeticError, RuntimeError, AssertionError) as err:
        # a keyword the builder takes, given a value it cannot build from (a recipe's width: x)
        given = ", ".join(f"{k}={short_repr(v)}" for k, v in kw.items())
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(f"model {name!r} cannot be built with {given} ({type(err).__name__}: {text}); "
                          "give values of the type and range its constructor takes") from None


def _check_keywords(name: str, builder: Callable[..., nn.Module], kw: dict[str, Any]) -> None:
    # Turn an unknown keyword into a ConfigError that lists what the builder accepts, instead of
    # a bare TypeError from deep inside a constructor.
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(p for p in params if p != "num_classes")
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take {', '.join(unknown)}; "
            f"allowed keywords: {', '.join(allowed) or '(none)'}"
        )


def _build_torchvision(zoo_name: str, num_classes: int, **kw: Any) -> nn.Module:
    models = _import_zoo("torchvision.models", "torchvision")
    _check_zoo_name("tv", zoo_name, models.list_models())
    return models.get_model(zoo_name, weights=None, num_classes=num_classes, **kw)


def _build_timm(zoo_name: str, num_classes: int, **kw: Any) -> nn.Module:
    timm = _import_zoo("timm", "timm")
    _check_zoo_name("timm", zoo_name, timm.list_models())
    return timm.create_model(zoo_name, pretrained=False, num_classes=num_classes, **kw)


def _check_zoo_name(prefix: str, zoo_name: str, known: list[str]) -> None:
    if zoo_name not in known:
        close = [k for k in known if zoo_name.lower() in k.lower()][:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown model '{prefix}:{zoo_name}' ({len(known)} available{hint})")


_ZOOS = {"tv": ("torchvision", _build_torchvision), "timm": ("timm", _build_timm)}


def _zoo_spec(prefix: str, zoo_name: str) -> ModelSpec:
    package, build = _ZOOS[prefix]

    def builder(num_classes: int, **kw: Any) -> nn.Module:
        return build(zoo_name, num_classes, **kw)

    return ModelSpec(builder, _ZOO_INPUT_SHAPE, _ZOO_NUM_CLASSES, f"{package} model {zoo_name}")


def _import_zoo(module: str, package: str) -> Any:
    # A zoo package can fail with more than ImportError: a torchvision built for another torch
    # raises RuntimeError while registering its compiled operators. Either way the user's fix is
    # the same, so every failure becomes one ConfigError that names the package.
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 (see comment above)
        raise ConfigError(
            f"{_prefix_of(package)}<name> models need the {package!r} package, which did not import "
            f"({type(err).__name__}: {err}); install it (pip install {package}) with a version "
            f"that matches your torch, or use a local model: {', '.join(list_models())}"
        ) from None


def _prefix_of(package: str) -> str:
    return next(p + ":" for p, (pkg, _) in _ZOOS.items() if pkg == package)
