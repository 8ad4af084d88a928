"""Recipes: one YAML file that says what to train, how to prune, and how to fine-tune.

Each section fills one typed config, and everything is validated before any work starts:

    name            run name (run directories are <out>/<name>-<timestamp>)
    seed            seeds the model's initialisation (training seeds live in train.seed)
    threads         CPU threads torch may use (null: torch's default); 1 suits tiny models on a
                    busy machine, where threads waiting on each other can cost several times
    out             parent folder of run directories (default "runs")
    init            weights to start from: a .safetensors file written by prunekit (dense, or
                    pruned with its plan inside) or a training checkpoint last.pt; null = fresh
    calibration_batches  training batches handed to one-shot methods for data-dependent criteria
    model           name (see `prunekit info models`), num_classes (null: from the data), kwargs
    data            prunekit.data.DataConfig
    train           prunekit.engine.TrainConfig for dense training; null or absent = no training
    method          name (magnitude, slr, admm, ...) + that method's config fields, either beside
                    the name or under `config:`; null = no pruning
    method_train    TrainConfig for methods that train while pruning (SLR/ADMM); absent = train's
    finetune        TrainConfig for fine-tuning the pruned model; null or absent = none
    eval            split ("test" or "val") reported, latency, layer_latency (true/false)
    bench           prunekit.cost.latency.LatencyConfig for the latency measurements (channels_last
                    unstated: both models in the layout the pruned model runs in)

`admm` is an alias: `method: {name: admm}` means the slr method with optimization=admm.

>>> r = Recipe.from_dict({"model": {"name": "small_cnn"}, "data": {"name": "digits"},
...                       "method": {"name": "magnitude", "channel_ratio": 0.5}})
>>> r.method.name, r.train is None, r.eval.split
('magnitude', True, 'test')
"""
from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.config import Config, check_choice, check_folder_name, check_limit
from ..core.errors import ConfigError
from ..cost.latency import LatencyConfig
from ..cost.memory_format import bench_config
from ..data.config import DataConfig
from ..engine.train import TrainConfig
from ..methods import METHOD_ALIASES, resolve_alias
from .overrides import _KEY, apply_overrides, dump_yaml, load_yaml_file, load_yaml_text, parse_override

TOP_KEYS = ("name", "seed", "threads", "out", "init", "calibration_batches", "model", "data", "train", "method",
            "method_train", "finetune", "eval", "bench")
# Method names that stand for another method with some fields fixed (prunekit.methods.METHOD_ALIASES).
ALIASES = METHOD_ALIASES
SPLITS = ("test", "val")
DEFAULT_RECIPE = "default.yaml"


@dataclass
class ModelSection(Config):
    """Which network to build: `create_model(name, num_classes, **kwargs)`."""

    name: str = "small_cnn"
    num_classes: int | None = None
    kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        from ..models import get_model_spec

        if not isinstance(self.name, str):
            raise ConfigError(f"name={self.name!r} must be a model name (see `prunekit info models`)")
        spec = get_model_spec(self.name)  # unknown name: ConfigError listing the models
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(
                self.num_classes, int) or self.num_classes < 1):
            raise ConfigError(f"num_classes={self.num_classes!r} must be a positive integer or null")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"kwargs={self.kwargs!r} must be a mapping of keyword arguments")
        if "num_classes" in self.kwargs:
            raise ConfigError(f"kwargs.num_classes: set model.num_classes={self.kwargs['num_classes']!r} instead "
                              "(null takes it from the data)")
        params = inspect.signature(spec.builder).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            allowed = sorted(p for p in params if p != "num_classes")
            unknown = sorted(set(self.kwargs) - set(allowed))
            if unknown:
                raise ConfigError(f"model {self.name!r} does not take kwargs {', '.join(unknown)}; "
                                  f"allowed: {', '.join(allowed) or '(none)'}")


@dataclass
class EvalSection(Config):
    """What the run reports: accuracy on `split`, whole-model and per-layer latency."""

    split: str = "test"
    latency: bool = True
    layer_latency: bool = True

    def validate(self) -> None:
        check_choice("split", self.split, SPLITS)


@dataclass
class MethodSection:
    """A resolved method: its registered name, its config object and its handler."""

    name: str
    config: Config
    handler: Callable

    @property
    def label(self) -> str:
        """The name a user would recognise ("admm" for slr with optimization=admm)."""
        for alias, (target, fixed) in ALIASES.items():
            if self.name == target and all(getattr(self.config, k, None) == v for k, v in fixed.items()):
                return alias
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **_plain_config(self.config)}


@dataclass
class Recipe:
    model: ModelSection
    data: DataConfig
    name: str = "run"
    seed: int = 0
    threads: int | None = None
    out: str = "runs"
    init: str | None = None
    calibration_batches: int = 4
    train: TrainConfig | None = None
    method: MethodSection | None = None
    method_train: TrainConfig | None = None
    finetune: TrainConfig | None = None
    eval: EvalSection = field(default_factory=EvalSection)
    bench: LatencyConfig = field(default_factory=lambda: bench_config({}))
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "Recipe":
        """Build and validate every section; errors name the source and the section."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a recipe is a mapping of sections ({', '.join(TOP_KEYS)}), "
                              f"got {type(raw).__name__}")
        unknown = sorted(map(str, set(raw) - set(TOP_KEYS)))
        if unknown:
            raise ConfigError(f"{source}: unknown recipe key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")
        for key in ("model", "data"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"{source}: the recipe needs a '{key}' section (a mapping with at least 'name')")

        def section(key: str, build: Callable[[Any], Any]) -> Any:
            try:
                return build(raw[key]) if raw.get(key) is not None else None
            except ConfigError as err:
                raise ConfigError(f"{source}: {key}: {err}") from None

        out = cls(model=section("model", ModelSection.from_dict), data=section("data", DataConfig.from_dict),
                  source=source)
        out.train = section("train", TrainConfig.from_dict)
        out.method = section("method", build_method)
        out.method_train = section("method_train", TrainConfig.from_dict)
        out.finetune = section("finetune", TrainConfig.from_dict)
        out.eval = section("eval", EvalSection.from_dict) or EvalSection()
        out.bench = section("bench", bench_config) or bench_config({})
        for key, kind in (("name", str), ("out", str), ("init", str)):
            value = raw.get(key)
            if value is not None and (not isinstance(value, kind) or not value):
                raise ConfigError(f"{source}: {key}={value!r} must be a non-empty string")
            if isinstance(value, str) and "\0" in value:
                raise ConfigError(f"{source}: {key}={value!r} holds a NUL character (\\0), which no file name "
                                  "can; remove it")
        for key in ("seed", "calibration_batches"):
            value = raw.get(key, getattr(out, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: {key}={value!r} must be an integer >= 0")
            try:
                check_limit(key, value)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
            setattr(out, key, value)
        threads = raw.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"{source}: threads={threads!r} must be an integer >= 1 or null")
        try:
            check_limit("threads", threads)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        out.threads = threads
        out.name = raw.get("name") or out.name
        out.out = raw.get("out") or out.out
        out.init = os.path.expanduser(raw["init"]) if raw.get("init") is not None else None
        try:
            check_folder_name("name", out.name)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        if out.eval.split == "val" and out.data.val_fraction == 0:
            raise ConfigError(f"{source}: eval.split='val' needs data.val_fraction > 0")
        return out

    @property
    def trainer_for_method(self) -> TrainConfig:
        """The TrainConfig a training method uses: method_train, else train, else defaults."""
        return self.method_train or self.train or TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in); loading it back gives the same run."""
        return {"name": self.name, "seed": self.seed, "threads": self.threads, "out": self.out, "init": self.init,
                "calibration_batches": self.calibration_batches, "model": _plain_config(self.model),
                "data": _plain_config(self.data), "train": _plain_config(self.train),
                "method": self.method.to_dict() if self.method else None,
                "method_train": _plain_config(self.method_train), "finetune": _plain_config(self.finetune),
                "eval": _plain_config(self.eval), "bench": _plain_config(self.bench)}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def _plain_config(cfg: Config | None) -> dict[str, Any] | None:
    if cfg is None:
        return None
    data = cfg.to_dict()
    data.pop("version", None)
    return data


def build_method(raw: Any) -> MethodSection:
    """{name: ..., <config fields>} -> MethodSection; the name may be an alias such as admm."""
    from ..methods import METHODS

    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ConfigError(f"needs a mapping with a 'name' (one of {', '.join(method_names())}), got {raw!r}")
    fields = dict(raw)
    name = fields.pop("name")
    nested = fields.pop("config", None)  # also accepted: method: {name: ..., config: {<fields>}}
    if nested is not None:
        if not isinstance(nested, dict):
            raise ConfigError(f"config={nested!r} must be a mapping of the method's fields")
        both = sorted(set(nested) & set(fields))
        if both:
            raise ConfigError(f"{', '.join(both)} given both directly under method and under method.config; "
                              f"keep one (this recipe nests its fields: override method.config.{both[0]}=...)")
        fields.update(nested)
    name, fields = resolve_alias(name, fields)
    if name not in METHODS:
        hint = ("; PR-DARTS searches an architecture rather than pruning a given model: run it with "
                "`prunekit search <recipe>` (docs/prdarts.md)" if name in ("prdarts", "pr-darts", "dass", "darts") else "")
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(method_names())}{hint}")
    config_cls, handler = METHODS.get(name)
    return MethodSection(name, config_cls.from_dict(fields), handler)


def method_names() -> list[str]:
    from ..methods import METHODS

    return sorted(set(METHODS.list()) | {a for a, (target, _) in ALIASES.items() if target in METHODS})


def default_recipe_text() -> str:
    return resources.files("prunekit").joinpath("recipes", DEFAULT_RECIPE).read_text(encoding="utf-8")


def read_source(source: str | None) -> tuple[dict[str, Any], str, Path | None]:
    """(raw mapping, description, run directory or None) for a recipe file, a run dir or None."""
    if source is None:
        return load_yaml_text(default_recipe_text(), "default recipe"), "default recipe", None
    path = Path(source)
    run_dir = None
    if path.is_dir():
        run_dir, path = path, path / "recipe.yaml"
        if not path.is_file() and (run_dir / "genotype.json").is_file() and (run_dir / "recipe.json").is_file():
            raise ConfigError(f"{source} is a `prunekit search` run: its network is {run_dir / 'network.safetensors'}, "
                              "which prunekit.methods.prdarts.load_network rebuilds (docs/prdarts.md); this command "
                              "reads runs of `prunekit run` and recipe files")
        if not path.is_file():
            raise ConfigError(f"{source} is a directory without recipe.yaml; pass a recipe file or a run directory")
    elif not path.is_file():
        first = source.split(".", 1)[0]
        if first in TOP_KEYS and path.suffix not in (".yaml", ".yml"):
            parse_override(source)  # raises: "override ... is not key=value"
        near = [str(p) for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p != path and p.is_file()]
        if not near and path.parent.is_dir():
            near = [str(path.parent / n) for n in difflib.get_close_matches(
                path.name, [q.name for q in path.parent.iterdir() if q.suffix in (".yaml", ".yml")], n=1)]
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"recipe {source!r} does not exist; {hint}pass a YAML recipe, a run directory, "
                          "or key=value overrides")
    raw = load_yaml_file(path, weights_hint=True)
    if isinstance(raw, dict) and "name" not in raw and run_dir is None:
        raw["name"] = path.stem
    return raw, str(path), run_dir


def load_recipe(source: str | None = None, overrides: Iterable[str] = (), method: str | None = None) -> tuple[Recipe, Path | None]:
    """Read a recipe (None: the embedded default), apply `--method` and overrides, validate."""
    raw, where, run_dir = read_source(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe is a mapping of sections ({', '.join(TOP_KEYS)}), "
                          f"got {type(raw).__name__}")
    if method is not None:
        raw["method"] = {"name": method}
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides, TOP_KEYS)
    try:
        return Recipe.from_dict(raw, where), run_dir
    except ConfigError as err:  # a bad value may come from the command line, not from the file
        given = ([f"--method {method}"] if method is not None else []) + overrides
        msg = str(err)
        if not given or not msg.startswith(f"{where}:"):
            raise
        shown = ", ".join(given[:4]) + (", ..." if len(given) > 4 else "")
        raise ConfigError(f"{where} with {shown}{msg[len(where):]}") from None


def _names_path(arg: str) -> bool:
    """True for an existing file or folder whose text before "=" is no dotted key (runs/lr=0.1-<time>)."""
    key = arg.partition("=")[0].strip()
    return not all(_KEY.fullmatch(p) for p in key.split(".")) and Path(arg).exists()


def split_arguments(args: Iterable[str]) -> tuple[str | None, list[str]]:
    """Positional arguments -> (recipe source or None, overrides)."""
    source, overrides = None, []
    for arg in args:
        if "=" in arg and not _names_path(arg):
            overrides.append(arg)
        elif source is None:
            source = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give at most one recipe ({source!r} already); "
                              "overrides are written key=value")
    return source, overrides


__all__ = ["ALIASES", "EvalSection", "MethodSection", "ModelSection", "Recipe", "TOP_KEYS", "build_method",
           "default_recipe_text", "load_recipe", "method_names", "read_source", "split_arguments"]
