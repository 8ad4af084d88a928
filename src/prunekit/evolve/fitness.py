"""Fitness: one job prunes a task's trained model with a candidate function, fine-tunes it briefly
and returns its validation accuracy (the test split is never read).

A job is plain data (`Job`: expression text, task settings, seed, dense weights path), so it runs
the same in this process, a process pool or a Ray worker. Each worker keeps one prepared state per
task (data loaders, the dense model, calibration batches and the traced graph: the graph is traced
once and reused for every fresh copy that is pruned).

>>> import math
>>> fitness_of({"a": [0.81, 0.81], "b": [0.64]}, {"a": 1.0, "b": 1.0})
0.72
>>> fitness_of({"a": [0.0], "b": [0.9]}, {"a": 1.0, "b": 1.0})
0.0
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..core.errors import CheckpointError, ConfigError, PrunekitError, load_error_text
from ..data import DataConfig, load_data
from ..engine import evaluate, train
from ..importance.evolved.space import EvalError
from ..importance.evolved.tree_eval import EvolvedCriterion
from ..models import create_model
from ..methods.magnitude import MagnitudeConfig
from ..surgery.prepared import PreparedPruning, prepare_pruning
from .config import MAX_PRUNE_RATIO, TaskConfig


@dataclasses.dataclass(frozen=True)
class Job:
    text: str
    task: str  # the task's settings as JSON (TaskConfig.to_dict), hashable and picklable
    seed: int
    dense_path: str
    device: str = "cpu"
    threads: int = 1

    @property
    def key(self) -> str:
        return f"{json.loads(self.task)['name']}|{self.seed}|{self.text}"


def fitness_of(accuracies: dict[str, list[float]], weights: dict[str, float]) -> float:
    """Weighted geometric mean over tasks of each task's mean accuracy (0 if any task is 0)."""
    means = {t: sum(v) / len(v) for t, v in accuracies.items()}
    if any(m <= 0 for m in means.values()):
        return 0.0
    total = sum(weights[t] for t in means)
    return round(math.exp(sum(weights[t] * math.log(m) for t, m in means.items()) / total), 12)


def _task_config(task_json: str) -> TaskConfig:
    return TaskConfig(**json.loads(task_json))


def _data(task: TaskConfig, device: str, augment: bool | None = None):
    data = dict(task.data)
    data["device"] = device
    if augment is not None:
        data["augment"] = augment
    return load_data(DataConfig(**data))


def train_dense(task: TaskConfig, path: str | Path, device: str = "cpu") -> float:
    """Train the task's dense model with `dense_train`, save it to `path`; returns its val accuracy."""
    bundle = _data(task, device)
    with torch.random.fork_rng(devices=[]):  # the initialisation follows dense_train.seed, not the process's history
        torch.manual_seed(task.dense_train.seed)
        model = create_model(task.model, bundle.num_classes, **task.model_kwargs)
    train(model, bundle.train, None, task.dense_train, progress=False, device=device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model(model.cpu(), str(path))
    return float(evaluate(model, bundle.val, device)["acc"])


@dataclasses.dataclass
class TaskState:
    task: TaskConfig
    bundle: object
    dense: torch.nn.Module
    calib: list
    prepared: PreparedPruning


_STATES: dict[tuple[str, str, str], TaskState] = {}  # per worker process


def task_state(task_json: str, dense_path: str, device: str) -> TaskState:
    """The prepared task, built once per worker process."""
    key = (task_json, dense_path, device)
    if key not in _STATES:
        task = _task_config(task_json)
        bundle = _data(task, device)
        if bundle.val.num_samples == 0:  # fitness is measured there: every function would score 0
            raise ConfigError(f"task {task.name!r}: its val split, where fitness is measured, holds no images "
                              f"(val_fraction={task.data.get('val_fraction', 0.1)}); raise data.val_fraction")
        dense = create_model(task.model, bundle.num_classes, **task.model_kwargs)
        try:
            load_model(dense, dense_path)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            fix = ("give the task an init trained for this model and data, or leave init null to train one"
                   if task.init is not None else
                   f"this is the dense model the run trained itself: delete {dense_path} and resume to train it again")
            raise CheckpointError(f"task {task.name!r}: dense weights {dense_path} cannot be loaded into model "
                                  f"{task.model!r}: {load_error_text(err)}; {fix}") from None
        dense.to(device).eval()
        calib, n = [], 0
        for x, y in _data(task, device, augment=False).train:  # no augmentation for scoring
            calib.append((x, y))
            n += len(y)
            if n >= task.calib_samples:
                break
        prepared = prepare_pruning(dense, calib[0][0][:1], task.ignore)  # traced and probed once
        _STATES[key] = TaskState(task, bundle, dense, calib, prepared)
    return _STATES[key]


def prune_copy(state: TaskState, criterion, ratio: float) -> torch.nn.Module:
    """A pruned fresh copy of the dense model (the prepared graph is reused, not traced again)."""
    model = copy.deepcopy(state.dense)
    # unrounded: the same share of every layer, so that candidates differ only in which channels they keep
    cfg = MagnitudeConfig(criterion=criterion, channel_ratio=ratio, ignore=list(state.task.ignore), round_to=None,
                          max_ratio=MAX_PRUNE_RATIO)
    state.prepared.prune_(model, cfg, batches=state.calib)
    return model


def run_job(job: Job) -> dict:
    """Evaluate one (function, task, seed): {"key", "acc", "error", "seconds"}; acc 0 on failure.
    Runs on `job.threads` torch threads and gives the caller's thread count back (a serial search
    runs jobs in the caller's process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_job(job)
    finally:
        torch.set_num_threads(threads)


def _run_job(job: Job) -> dict:
    start = time.perf_counter()
    # Outside the try: a task that cannot be prepared (dense weights, data) is no function's fault;
    # scoring every function 0 would let the whole search run on nothing. It stops the search.
    state = task_state(job.task, job.dense_path, job.device)
    try:
        task = state.task
        crit = EvolvedCriterion(job.text, task.calib_samples, task.score_time_s)
        model = prune_copy(state, crit, task.prune_ratio)
        loader = copy.copy(state.bundle.train)  # same tensors; the evaluation seed sets the batch order
        loader.seed = int(task.data.get("seed", 0)) * 1000 + job.seed
        train(model, loader, None, dataclasses.replace(task.finetune, seed=job.seed), progress=False,
              device=job.device)
        acc, error = float(evaluate(model, state.bundle.val, job.device)["acc"]), None
    except (PrunekitError, EvalError, RuntimeError, ValueError) as err:  # a bad function scores 0
        acc, error = 0.0, f"{type(err).__name__}: {str(err)[:300]}"
    return {"key": job.key, "acc": acc, "error": error, "seconds": round(time.perf_counter() - start, 3)}
