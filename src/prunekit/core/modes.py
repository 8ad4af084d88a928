"""Evaluation mode for a while, then every module's own mode back.

`model.train(was)` after `model.eval()` sets *every* submodule to `was`, so a BatchNorm that the
user had frozen (eval inside a training model) comes back in training mode. `evaluating(model)`
restores each module's flag as it was.

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train(); _ = m[1].eval()
>>> with evaluating(m):
...     m[0].training
False
>>> [x.training for x in m.modules()]
[True, True, False]
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the modes may change; afterwards each module's train/eval flag as it was."""
    modes = [(m, m.training) for m in model.modules()]  # parents before their children
    try:
        yield model
    finally:
        for m, flag in modes:  # through train(), so a module's own override runs (e.g. fusing branches)
            if m.training != flag or any(c.training != flag for c in m.children()):
                m.train(flag)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` inside the block; afterwards each module's train/eval flag as it was, and the
    weights of embeddings with `max_norm` (which torch renormalises in place in every forward)."""
    with kept_modes(model), kept_renormed_embeddings(model):
        model.eval()
        yield model


@contextlib.contextmanager
def kept_renormed_embeddings(model: nn.Module) -> Iterator[None]:
    """Inside the block an nn.Embedding/EmbeddingBag with `max_norm` may rescale rows of its weight
    in place; afterwards the weight holds its values from before (a trace or a probe is no training)."""
    kept = [(m.weight, m.weight.detach().clone()) for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, values in kept:
                if weight.shape == values.shape:  # not resized by a removal inside the block
                    weight.copy_(values)


SCORE_MODES = ("eval", "train")


@contextlib.contextmanager
def scoring(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """The mode a criterion's forward passes run in: "eval" (`evaluating`), or "train": every
    module in training mode (BatchNorm normalises with the batch's statistics) except dropout,
    which stays off so that passes over the same batch (a gradient, then a Hessian-vector
    product) see the same function and scores do not depend on random draws. Every buffer
    (BatchNorm's running statistics and batch counter) is put back afterwards, also one a
    module replaced by a new tensor, and each module's train/eval flag is as it was.

    >>> import torch
    >>> m = nn.BatchNorm1d(2)
    >>> with scoring(m, "train"):
    ...     _ = m(torch.randn(4, 2) + 5)
    >>> m.running_mean.tolist(), int(m.num_batches_tracked), m.training
    ([0.0, 0.0], 0, True)
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {', '.join(SCORE_MODES)}")
    if mode == "eval":
        with evaluating(model):
            yield model
        return
    saved = [(mod, name, buf, buf.detach().clone()) for mod in model.modules()
             for name, buf in mod._buffers.items() if buf is not None]
    try:
        with kept_modes(model), kept_renormed_embeddings(model):
            model.train()
            for mod in model.modules():
                if isinstance(mod, nn.modules.dropout._DropoutNd):
                    mod.eval()
            yield model
    finally:
        with torch.no_grad():
            for mod, name, buf, value in saved:
                mod._buffers[name] = buf  # the tensor the model held, even if a forward replaced it
                buf.copy_(value)
