"""Settings of an evolution of pruning functions: the tasks that measure fitness and the GP loop.

A task is "prune this trained model with the candidate function, fine-tune briefly, measure
accuracy on the validation split". Fitness is the weighted geometric mean of task accuracies.
Defaults follow the authors' code: 14 individuals (the 7 seeds twice),
6 elitist parents, crossover and mutation probability 0.75, mutation subtrees of height 0-4, a
10 s validity limit per candidate.

>>> cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, generations=2)
>>> cfg.tasks[0].name, EvolveConfig.from_dict(cfg.to_dict()) == cfg
('digits', True)
"""
from __future__ import annotations

import dataclasses
import math
import re

from ..core.config import Config, check_choice, check_names, check_range, short_repr
from ..core.errors import ConfigError
from ..engine.train import TrainConfig

EXECUTORS = ("process", "ray", "serial")
CIFAR_ARCHIVE = "../shared/data/cifar10-jpg.tar.gz"  # relative to the working directory
# the most of a group's channels a candidate may remove: MagnitudeConfig's max_ratio, which
# prune_copy leaves at its default (a larger ratio would be capped there, silently)
MAX_PRUNE_RATIO = 0.9
# it names the task's files in the run directory (file names stop at 255 bytes; room for suffixes)
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclasses.dataclass
class TaskConfig:
    """One fitness task. `data` fills a DataConfig (its val split is where fitness is measured:
    keep val_fraction > 0). `init` is a trained dense model (.safetensors) or None: then the
    dense model is trained once with `dense_train` before the search and saved in the run
    directory. Each candidate removes `prune_ratio` of every prunable group's channels (scored on
    the first `calib_samples` training images), then trains `finetune` (its seed is the
    evaluation seed)."""

    name: str
    model: str
    data: dict
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    init: str | None = None
    dense_train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=10, lr=0.05))
    finetune: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))
    prune_ratio: float = 0.5
    calib_samples: int = 256
    score_time_s: float = 60.0
    weight: float = 1.0
    ignore: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("every task needs a name (text)")
        if not _TASK_NAME.fullmatch(self.name):
            raise ConfigError(f"task name {self.name!r} is not allowed: it names the task's files in the run "
                              "directory; use at most 100 letters, digits, '_', '-' and '.' (not first), e.g. digits_small")
        for key in ("dense_train", "finetune"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, TrainConfig.from_dict(value))
            elif not isinstance(value, TrainConfig):
                raise ConfigError(f"task {self.name!r}: {key}={short_repr(value)} must be a mapping of training "
                                  "settings, e.g. {epochs: 2, lr: 0.01}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"task {self.name!r}: model={short_repr(self.model)} must be a model name, e.g. resnet20")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"task {self.name!r}: model_kwargs={short_repr(self.model_kwargs)} must be a mapping of "
                              "the model's keywords, e.g. {width: 16}, or {}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init or "\0" in self.init):
            raise ConfigError(f"task {self.name!r}: init={short_repr(self.init)} must be the path of trained dense "
                              "weights (.safetensors), or null to train them")
        try:
            check_names("ignore", self.ignore)
        except ConfigError as err:
            raise ConfigError(f"task {self.name!r}: {err}") from None
        if not isinstance(self.data, dict) or "name" not in self.data:
            raise ConfigError(f"task {self.name!r}: data must be a mapping with a dataset name, e.g. {{name: digits}}")
        val_fraction = self.data.get("val_fraction", 0.1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise ConfigError(f"task {self.name!r}: data.val_fraction={val_fraction!r} must be a number in (0, 1)")
        if val_fraction <= 0:
            raise ConfigError(f"task {self.name!r}: fitness is measured on the val split; set data.val_fraction > 0")
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True)
        if self.prune_ratio > MAX_PRUNE_RATIO:
            raise ConfigError(f"task {self.name!r}: prune_ratio={self.prune_ratio} is above {MAX_PRUNE_RATIO}, the most "
                              "of a group's channels a candidate removes (the pruner's max_ratio, which the search "
                              f"sets to {MAX_PRUNE_RATIO}); use at most {MAX_PRUNE_RATIO}")
        check_range("weight", self.weight, 0.0, math.inf, lo_open=True)
        check_range("score_time_s", self.score_time_s, 0.0, math.inf, lo_open=True)
        if not isinstance(self.calib_samples, int) or self.calib_samples < 2:
            raise ConfigError(f"task {self.name!r}: calib_samples must be an integer >= 2")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["dense_train"], out["finetune"] = self.dense_train.to_dict(), self.finetune.to_dict()
        return out


def digits_task(**changes) -> TaskConfig:
    """The small digits CNN: seconds per evaluation on one CPU core."""
    base = TaskConfig("digits", "small_cnn", {"name": "digits", "val_fraction": 0.2, "batch_size": 64},
                      dense_train=TrainConfig(epochs=15, lr=0.05), finetune=TrainConfig(epochs=2, lr=0.01))
    return dataclasses.replace(base, **changes)


def cifar_task(**changes) -> TaskConfig:
    """A 5,000-image CIFAR-10 subset with ResNet-20 (the shared JPEG archive, read by prunekit.data)."""
    base = TaskConfig("cifar10_subset", "resnet20",
                      {"name": "imagefolder", "root": CIFAR_ARCHIVE, "limit_train": 5000, "val_fraction": 0.1,
                       "batch_size": 128},
                      dense_train=TrainConfig(epochs=15, lr=0.1), finetune=TrainConfig(epochs=1, lr=0.01),
                      prune_ratio=0.4)
    return dataclasses.replace(base, **changes)


DEFAULT_TASKS = {"digits": digits_task, "cifar10_subset": cifar_task}


def task_from(entry) -> TaskConfig:
    """A TaskConfig from a recipe entry: a default task's name ("digits", "cifar10_subset"), a
    mapping with `base: <default task>` plus the keys it changes, or a full task mapping."""
    if isinstance(entry, TaskConfig):
        return entry
    if isinstance(entry, str):
        entry = {"base": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"a task is a name ({', '.join(DEFAULT_TASKS)}) or a mapping; got {entry!r}")
    entry = dict(entry)
    base = entry.pop("base", None)
    if base is None:
        fields = {f.name for f in dataclasses.fields(TaskConfig)}
        required = {f.name for f in dataclasses.fields(TaskConfig) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        if set(entry) - fields or required - set(entry):
            raise ConfigError(f"a task without base needs {', '.join(sorted(required))} and takes only "
                              f"{', '.join(sorted(fields))}; got unknown {sorted(set(entry) - fields)}, missing "
                              f"{sorted(required - set(entry))} (or start from base: {' or '.join(DEFAULT_TASKS)})")
        return TaskConfig(**entry)
    if base not in DEFAULT_TASKS:
        raise ConfigError(f"task base {base!r} is unknown; choose one of: {', '.join(DEFAULT_TASKS)}")
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    if set(entry) - known:
        raise ConfigError(f"task keys {sorted(set(entry) - known)} are unknown; allowed: {', '.join(sorted(known))}")
    default = DEFAULT_TASKS[base]()
    if isinstance(entry.get("data"), dict):  # changes merge into the base's data and training settings
        entry["data"] = {**default.data, **entry["data"]}
    for key in ("dense_train", "finetune"):
        if isinstance(entry.get(key), dict):
            entry[key] = {**getattr(default, key).to_dict(), **entry[key]}
    return DEFAULT_TASKS[base](**entry)


@dataclasses.dataclass
class EvolveConfig(Config):
    """The GP loop. `reeval_top` elites are re-evaluated with `reeval_seeds` more fine-tune seeds
    (their fitness becomes the mean), so one lucky fine-tune cannot keep a function alive.
    `max_height`/`max_size` bound trees against bloat; a variation that breaks them, or does not
    give finite scores on the fixed test argument within `validity_time_s`, is drawn again (at
    most `max_redraws` times, then the unvaried copy is kept)."""

    tasks: list = dataclasses.field(default_factory=lambda: [digits_task(), cifar_task()])
    population: int = 14
    generations: int = 10
    parents: int = 6
    cx_prob: float = 0.75
    mut_prob: float = 0.75
    mut_min_height: int = 0
    mut_max_height: int = 4
    max_height: int = 10
    max_size: int = 60
    validity_time_s: float = 10.0
    max_redraws: int = 50
    reeval_top: int = 3
    reeval_seeds: int = 2
    seed: int = 0
    executor: str = "process"
    workers: int = 2
    ray_address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = "cpu"
    threads_per_job: int = 1

    def validate(self) -> None:
        if not isinstance(self.tasks, (list, tuple)):
            raise ConfigError(f"tasks={self.tasks!r} must be a list of tasks, e.g. [digits, cifar10_subset] or "
                              "[{base: digits, prune_ratio: 0.4}]")
        self.tasks = [task_from(t) for t in self.tasks]
        if not self.tasks or not all(isinstance(t, TaskConfig) for t in self.tasks):
            raise ConfigError("tasks must be a non-empty list of task mappings (name, model, data, ...)")
        if len({t.name for t in self.tasks}) != len(self.tasks):
            raise ConfigError("task names must be unique")
        for key, lo in (("population", 2), ("generations", 0), ("parents", 1), ("max_height", 1), ("max_size", 1),
                        ("max_redraws", 1), ("reeval_top", 0), ("reeval_seeds", 0), ("seed", 0), ("workers", 1),
                        ("mut_min_height", 0), ("mut_max_height", 0), ("threads_per_job", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{key}={value!r} is invalid; use an integer >= {lo}")
        if self.parents >= self.population:
            raise ConfigError(f"parents={self.parents} must be smaller than population={self.population}")
        if self.mut_min_height > self.mut_max_height:
            raise ConfigError("mut_min_height must be <= mut_max_height")
        self._check_tree_bounds()
        check_range("cx_prob", self.cx_prob, 0.0, 1.0)
        check_range("mut_prob", self.mut_prob, 0.0, 1.0)
        check_range("validity_time_s", self.validity_time_s, 0.0, math.inf, lo_open=True)
        check_choice("executor", self.executor, EXECUTORS)
        check_range("num_cpus", self.num_cpus, 0.0, math.inf)
        check_range("num_gpus", self.num_gpus, 0.0, math.inf)

    def _check_tree_bounds(self) -> None:
        """The bounds must hold the seeds (the initial population, kept unchanged as parents) and stay
        within what the text parser reads back (every generation is stored and reloaded as text)."""
        from ..importance.evolved.space import SEEDS
        from ..importance.evolved.text import MAX_NODES, parse_expression

        if self.max_size > MAX_NODES:
            raise ConfigError(f"max_size={self.max_size} is above the {MAX_NODES:,} nodes an evolved text may "
                              f"hold; use max_size <= {MAX_NODES}")
        trees = {name: parse_expression(text) for name, text in SEEDS.items()}
        for key, size in (("max_height", lambda t: t.height), ("max_size", len)):
            name = max(trees, key=lambda n: size(trees[n]))
            need = size(trees[name])
            if getattr(self, key) < need:
                raise ConfigError(f"{key}={getattr(self, key)} is below the seed function {name} ({need}): the "
                                  f"initial population would break the bound; use {key} >= {need}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["tasks"] = [t.to_dict() for t in self.tasks]
        return out

    def search_dict(self) -> dict:
        """The settings that decide the result (not where or how jobs run): compared on resume."""
        out = self.to_dict()
        for key in ("executor", "workers", "ray_address", "num_cpus", "num_gpus", "device", "threads_per_job"):
            out.pop(key)
        return out
