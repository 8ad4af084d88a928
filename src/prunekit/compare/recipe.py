"""Compare recipes: one dense model, several pruning arms, one shared budget, N seeds.

A compare recipe is YAML with these keys (each section fills one typed config):

    protocol        a named protocol (prunekit.protocol.PROTOCOLS, e.g. "cifar10_resnet20") whose
                    seeds, device, model, data, dense, finetune and method_train sections are the
                    defaults; keys given in the recipe are merged over them
    name            the comparison's name; results go to <out>/<name>/ (fixed, so a rerun resumes)
    out             parent folder (default "runs")
    seeds           list of seeds; each arm runs once per seed
    device          "auto" (CUDA when available), "cpu" or "cuda[:i]"; data batches live there too
    threads         CPU threads torch may use (null: torch's default)
    model           {name, kwargs}: `create_model(name, num_classes, **kwargs)`
    data            prunekit.data.DataConfig (its seed fixes the val split of the dense model)
    dense           {weights: a dense .safetensors to start from, or null;
                     train: TrainConfig used when weights is null or missing (then saved and cached)}
    target          {metric: macs | params, fraction: 0.5, tolerance: 0.03} or null: what the
                    arms are meant to keep; every arm's achieved fraction is checked against it
    method_train    TrainConfig of methods that train while pruning (their own epochs replace it)
    finetune        TrainConfig of the shared budget: its `epochs` is the number of training
                    epochs every arm gets after the dense model, method training included
    calibration_batches  training batches handed to one-shot methods with data-dependent criteria
    eval            {split: test | val, latency: true | false, max_batches: null or k (score only
                    k batches of val and test, drawn with the data seed: smoke runs; the report says so)}
    bench           prunekit.cost.latency.LatencyConfig of the latency measurement (channels_last
                    unstated: each arm and the dense model in the layout the arm runs in)
    arms            mapping arm name -> {method: {name, <config fields>} or null (the dense model),
                     finetune: true | false, keep_zeros: true | false}; an arm name is a folder
                     name (its records go to arms/<name>/)

`method.name` is a registered prunekit method ("magnitude", "gator", "slr" with
`optimization: admm` for ADMM) or an outside baseline ("torch_pruning").

>>> r = CompareRecipe.from_dict({"model": {"name": "small_cnn"}, "data": {"name": "digits"},
...     "dense": {"train": {"epochs": 2}}, "finetune": {"epochs": 2}, "arms": {"dense": {"method": None},
...     "l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}}}})
>>> list(r.arms), r.arms["l2"].budget_left(r.finetune.epochs)
(['dense', 'l2'], 2)
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.config import Config, check_choice, check_folder_name, check_limit, check_range
from ..core.errors import ConfigError
from ..cost.latency import LatencyConfig
from ..cost.memory_format import bench_config
from ..data.config import DataConfig
from ..engine.train import TrainConfig
from ..methods import TRAINED_EPOCH_FIELDS, check_training_phases, resolve_alias

TOP_KEYS = ("protocol", "name", "out", "seeds", "device", "threads", "model", "data", "dense", "target", "method_train",
            "finetune", "calibration_batches", "eval", "bench", "arms")

@dataclass
class TargetSection(Config):
    """What every pruned arm is meant to keep: `fraction` of the dense model's `metric`."""

    metric: str = "macs"
    fraction: float = 0.5
    tolerance: float = 0.03

    def validate(self) -> None:
        check_choice("metric", self.metric, ("macs", "params"))
        check_range("fraction", self.fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("tolerance", self.tolerance, 0.0, 1.0)


@dataclass
class ArmSpec:
    """One arm: a method config (None: the dense model itself) and how it is fine-tuned.

    trained_epochs: epochs the method trains itself (Gator's gated and fine-tuning epochs, SLR's
    penalised and retraining epochs; 0 for one-shot methods). The arm's fine-tuning gets what is
    left of the shared budget, so every pruned arm trains the same number of epochs in total.
    keep_zeros: weights that are exactly zero after pruning stay zero while fine-tuning (masks),
    for irregular and N:M sparsity.
    """

    name: str
    method: str | None
    config: Config | None
    handler: Callable | None
    finetune: bool = True
    keep_zeros: bool = False
    skip_reason: str | None = None

    @property
    def trains(self) -> bool:
        return self.handler is not None and "train_loader" in inspect.signature(self.handler).parameters

    @property
    def trained_epochs(self) -> int:
        if not self.trains:
            return 0
        return sum(getattr(self.config, f) for f in TRAINED_EPOCH_FIELDS
                   if isinstance(getattr(self.config, f, None), int) and not isinstance(getattr(self.config, f), bool))

    def budget_left(self, budget: int) -> int:
        """Fine-tuning epochs of this arm under a shared budget of `budget` epochs."""
        if self.method is None:
            return 0
        left = budget - self.trained_epochs
        if left < 0:
            raise ConfigError(f"arm {self.name!r} trains {self.trained_epochs} epochs itself, more than the shared "
                              f"budget finetune.epochs={budget}; raise finetune.epochs or lower the method's epochs")
        return left if self.finetune else 0

    def to_dict(self) -> dict[str, Any]:
        """What the arm's records are made from (part of their spec)."""
        cfg = self.config.to_dict() if self.config is not None else None
        return {"method": self.method, "config": cfg, "finetune": self.finetune, "keep_zeros": self.keep_zeros}

    def to_recipe(self) -> dict[str, Any]:
        """The arm as a recipe writes it: `build_arm(name, arm.to_recipe())` builds it again (the
        method's seed comes from the recipe's seeds)."""
        fields = {} if self.config is None else {k: v for k, v in self.config.to_dict().items() if k != "seed"}
        method = None if self.method is None else {"name": self.method, **fields}
        return {"method": method, "finetune": self.finetune, "keep_zeros": self.keep_zeros}


@dataclass
class CompareRecipe:
    model_name: str
    data: DataConfig
    arms: dict[str, ArmSpec]
    finetune: TrainConfig
    name: str = "compare"
    out: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    threads: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    dense_weights: str | None = None
    dense_train: TrainConfig | None = None
    target: TargetSection | None = None
    method_train: TrainConfig = field(default_factory=TrainConfig)
    calibration_batches: int = 4
    eval_split: str = "test"
    latency: bool = True
    eval_max_batches: int | None = None
    bench: LatencyConfig = field(default_factory=lambda: bench_config({}))
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "CompareRecipe":
        """Build and validate every section; errors name the source and the section."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a compare recipe is a mapping with keys {', '.join(TOP_KEYS)}")
        unknown = sorted(set(raw) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")
        try:
            raw = with_protocol(raw)
            return _build(cls, raw, source)
        except ConfigError as err:
            msg = str(err)
            raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    def spec_of(self, arm: str) -> dict[str, Any]:
        """What decides an arm's numbers: its config, the budget, the data and evaluation. The
        training device is recorded beside (the report notes records from several devices)."""
        spec = self.arms[arm]
        # Where the data lives and how it is loaded do not change the numbers; the dense sha256
        # (added by the runner) pins the model.
        data = {k: v for k, v in self.data.to_dict().items() if k not in ("root", "device", "num_workers")}
        return {"arm": spec.to_dict(), "model": {"name": self.model_name, "kwargs": self.model_kwargs},
                "data": data, "method_train": self.method_train.to_dict(),
                "finetune": self.finetune.to_dict(), "finetune_epochs": spec.budget_left(self.finetune.epochs),
                "eval_split": self.eval_split, "eval_max_batches": self.eval_max_batches,
                "calibration_batches": self.calibration_batches}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out": self.out, "seeds": list(self.seeds), "device": self.device,
                "threads": self.threads, "model": {"name": self.model_name, "kwargs": self.model_kwargs},
                "data": self.data.to_dict(), "dense": {"weights": self.dense_weights, "train":
                                                       self.dense_train.to_dict() if self.dense_train else None},
                "target": self.target.to_dict() if self.target else None,
                "method_train": self.method_train.to_dict(), "finetune": self.finetune.to_dict(),
                "calibration_batches": self.calibration_batches,
                "eval": {"split": self.eval_split, "latency": self.latency, "max_batches": self.eval_max_batches}, "bench": self.bench.to_dict(),
                "arms": {n: a.to_recipe() for n, a in self.arms.items()}}


def with_protocol(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` merged over the sections of its named protocol (a recipe without one is unchanged)."""
    from ..protocol import PROTOCOLS

    name = raw.get("protocol")
    if name is None:
        return raw
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol={name!r} is unknown; available: {', '.join(sorted(PROTOCOLS))}")
    sections = PROTOCOLS[name].compare_sections()
    merged = _merge(sections, {k: v for k, v in raw.items() if k != "protocol"})
    given = raw.get("dense")
    if not (isinstance(given, dict) and "weights" in given) and _dense_changed(sections, merged):
        merged["dense"] = {**merged["dense"], "weights": None}  # its own dense model, in the output folder
    return merged


# The settings that shape a trained dense model: weights trained with other values are another model.
DENSE_TRAIN_KEYS = ("epochs", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                    "warmup_epochs", "label_smoothing", "seed")
DENSE_DATA_KEYS = ("name", "val_fraction", "seed", "limit_train", "image_size", "batch_size", "augment")


def dense_settings(data: Any, train: Any) -> dict[str, Any]:
    """{"data.<key>" / "dense.train.<key>": value} of the settings that shape a trained dense model,
    for the keys the given sections hold (a section that is not a mapping holds none)."""
    out = {}
    for prefix, section, keys in (("data", data, DENSE_DATA_KEYS), ("dense.train", train, DENSE_TRAIN_KEYS)):
        if isinstance(section, dict):
            out.update({f"{prefix}.{k}": section[k] for k in keys if k in section})
    return out


def _dense_changed(protocol: dict[str, Any], merged: dict[str, Any]) -> bool:
    """Whether `merged` changes what the protocol's cached dense model was trained with (its model,
    data or dense.train): its weights then do not belong to this recipe."""
    def settings(r: dict[str, Any]) -> dict[str, Any]:
        dense = r.get("dense")
        return dense_settings(r.get("data"), dense.get("train") if isinstance(dense, dict) else None)

    def model(r: dict[str, Any]) -> Any:
        m = r.get("model")  # no kwargs, null and {} build the same model
        return {**m, "kwargs": m.get("kwargs") or {}} if isinstance(m, dict) else m

    return model(merged) != model(protocol) or settings(merged) != settings(protocol)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def spec_hash(spec: dict[str, Any]) -> str:
    """A short stable hash of an arm's spec: a finished record is reused only if it matches."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(raw: dict[str, Any], key: str, build: Callable[[Any], Any]) -> Any:
    try:
        return build(raw[key]) if raw.get(key) is not None else None
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _build(cls: type[CompareRecipe], raw: dict[str, Any], source: str) -> CompareRecipe:
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ConfigError("model needs a mapping with a 'name' (see `prunekit info models`)")
    unknown = sorted(map(str, set(model) - {"name", "kwargs"}))
    if unknown:
        why = " (compare takes the number of classes from the data)" if "num_classes" in unknown else ""
        raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}{why}; a compare recipe's model takes name "
                          "and kwargs")
    if not isinstance(raw.get("data"), dict):
        raise ConfigError("the recipe needs a 'data' section (a mapping with at least 'name')")
    finetune = _section(raw, "finetune", TrainConfig.from_dict)
    if finetune is None:
        raise ConfigError("finetune is required: its epochs is the shared training budget of every arm")
    if not isinstance(model.get("kwargs") or {}, dict):
        raise ConfigError(f"model.kwargs={model['kwargs']!r} must be a mapping of keyword arguments of the model, "
                          "e.g. {width: 2}")
    out = cls(model_name=model["name"], model_kwargs=dict(model.get("kwargs") or {}),
              data=_section(raw, "data", DataConfig.from_dict), arms={}, finetune=finetune, source=source)
    dense = raw.get("dense") or {}
    if not isinstance(dense, dict) or set(dense) - {"weights", "train"}:
        raise ConfigError("dense must be a mapping with 'weights' and/or 'train'")
    out.dense_weights = dense.get("weights")
    if out.dense_weights is not None and (not isinstance(out.dense_weights, str) or "\0" in out.dense_weights):
        raise ConfigError(f"dense.weights={out.dense_weights!r} must be a path to a .safetensors file (text) or null")
    out.dense_train = _section(dense, "train", TrainConfig.from_dict)
    if out.dense_weights is None and out.dense_train is None:
        raise ConfigError("dense needs weights (a .safetensors file) or train (a TrainConfig) to make the dense model")
    out.target = _section(raw, "target", TargetSection.from_dict)
    out.method_train = _section(raw, "method_train", TrainConfig.from_dict) or TrainConfig()
    out.bench = _section(raw, "bench", bench_config) or bench_config({})
    _scalars(out, raw)
    arms = raw.get("arms")
    if isinstance(arms, dict):  # `arms.<name>=null` removes an arm, as `train=null` removes a section
        arms = {n: a for n, a in arms.items() if a is not None}
    if not isinstance(arms, dict) or not arms:
        raise ConfigError("arms must be a non-empty mapping of arm name -> {method: ...} (an arm set to null is "
                          "removed)")
    out.arms = {}
    for n, a in arms.items():
        _check_arm_name(str(n), out.arms)
        try:
            out.arms[str(n)] = build_arm(str(n), a)
        except ConfigError as err:
            close = difflib.get_close_matches(str(n), [str(k) for k in arms if k != n], n=1)
            if close and isinstance(a, dict) and isinstance(a.get("method"), dict) and "name" not in a["method"]:
                raise ConfigError(f"{err}; did you mean arm {close[0]!r}? (an override of a misspelt arm "
                                  "adds a new one)") from None
            raise
    for arm in out.arms.values():
        _check_fine_tuning(arm, out.finetune)
        if arm.trains:
            try:
                check_training_phases(arm.config, out.method_train)
            except ConfigError as err:
                raise ConfigError(f"arm {arm.name!r}: {err}") from None
    return out


def _check_fine_tuning(arm: ArmSpec, finetune: TrainConfig) -> None:
    """ConfigError when a method alone exceeds the budget, or when the epochs it leaves cannot
    carry the fine-tuning config (a warm-up as long as they are): found now, not after the
    method has trained."""
    left = arm.budget_left(finetune.epochs)
    if left == 0:
        return
    try:
        finetune.replace(epochs=left)
    except ConfigError as err:
        raise ConfigError(f"arm {arm.name!r} is fine-tuned for {left} epoch{'s' if left != 1 else ''} "
                          f"(finetune.epochs={finetune.epochs} less the {arm.trained_epochs} its method trains), "
                          f"for which {err}; lower finetune.warmup_epochs or the method's epochs") from None


def _check_arm_name(name: str, earlier: dict[str, ArmSpec]) -> None:
    """ConfigError unless `name` is one new folder name: its records go to arms/<name>/."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or not name.isprintable() or name != name.strip():
        raise ConfigError(f"arm name {name!r} must be a folder name (its records go to arms/<name>/): not empty, "
                          "'.' or '..', and without path separators, control characters or leading and trailing spaces")
    if name in earlier:
        raise ConfigError(f"arm {name!r} is given twice (arm names are compared as text); rename one")


def _scalars(out: CompareRecipe, raw: dict[str, Any]) -> None:
    out.name = raw.get("name") or out.name
    out.out = raw.get("out") or out.out
    if not isinstance(out.name, str):
        raise ConfigError(f"name={out.name!r} must be text (quote it in YAML: name: '{out.name}')")
    check_folder_name("name", out.name)
    if not isinstance(out.out, str) or "\0" in out.out:
        raise ConfigError(f"out={out.out!r} must be a folder path (text without NUL)")
    seeds = raw.get("seeds", out.seeds)
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"seeds={seeds!r} must be a non-empty list of distinct integers >= 0")
    check_limit("seeds", seeds)
    out.seeds = seeds
    out.device = raw.get("device") or "auto"
    if not isinstance(out.device, str) or not (out.device in ("auto", "cpu") or out.device.startswith("cuda")):
        raise ConfigError(f"device={out.device!r} must be 'auto', 'cpu' or 'cuda[:index]'")
    threads = raw.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be an integer >= 1 or null")
    check_limit("threads", threads)
    out.threads = threads
    cal = raw.get("calibration_batches", out.calibration_batches)
    if isinstance(cal, bool) or not isinstance(cal, int) or cal < 0:
        raise ConfigError(f"calibration_batches={cal!r} must be an integer >= 0")
    out.calibration_batches = cal
    ev = raw.get("eval") or {}
    if not isinstance(ev, dict) or set(ev) - {"split", "latency", "max_batches"}:
        raise ConfigError("eval must be a mapping with 'split' (test or val), 'latency' (true or false) and "
                          "'max_batches' (null or an integer >= 1)")
    k = ev.get("max_batches")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"eval.max_batches={k!r} must be null or an integer >= 1")
    out.eval_max_batches = k
    out.eval_split = ev.get("split", "test")
    check_choice("eval.split", out.eval_split, ("test", "val"))
    if out.eval_split == "val" and out.data.val_fraction == 0:
        raise ConfigError("eval.split=val reports the validation split, but data.val_fraction=0 holds none out; "
                          "raise data.val_fraction or report eval.split=test")
    out.latency = ev.get("latency", True)
    if not isinstance(out.latency, bool):
        raise ConfigError(f"eval.latency={out.latency!r} must be true or false")


def build_arm(name: str, raw: Any) -> ArmSpec:
    """{method: {name, fields...} or null, finetune, keep_zeros} -> ArmSpec (outside baselines that
    cannot be imported become arms with a skip_reason)."""
    from . import baselines
    from ..methods import METHODS

    if not isinstance(raw, dict) or "method" not in raw or set(raw) - {"method", "finetune", "keep_zeros"}:
        raise ConfigError(f"arm {name!r} must be a mapping with 'method' (null for the dense model) and "
                          "optionally 'finetune' and 'keep_zeros'")
    flags = {k: raw.get(k, d) for k, d in (("finetune", True), ("keep_zeros", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"arm {name!r}: {key}={value!r} must be true or false")
    method = raw["method"]
    if method is None:
        return ArmSpec(name, None, None, None, **flags)
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError(f"arm {name!r}: method needs a mapping with a 'name'")
    try:
        kind, fields = resolve_alias(method["name"], {k: v for k, v in method.items() if k != "name"})
    except ConfigError as err:
        raise ConfigError(f"arm {name!r}: {err}") from None
    if kind in baselines.BASELINES:
        config_cls, handler, reason = baselines.resolve(kind)
    elif kind in METHODS:
        (config_cls, handler), reason = METHODS.get(kind), None
    else:
        known = sorted(set(METHODS.list()) | set(baselines.BASELINES.list()))
        raise ConfigError(f"arm {name!r}: unknown method {kind!r}; available: {', '.join(known)} "
                          "(ADMM is slr with optimization: admm)")
    if "seed" in fields:
        raise ConfigError(f"arm {name!r}: method.seed={fields['seed']!r} would not be used: every arm runs once per "
                          "seed of the recipe's `seeds`, which sets the method's seed; remove it and list the seeds "
                          "in `seeds`")
    try:
        config = config_cls.from_dict(fields)
    except ConfigError as err:
        raise ConfigError(f"arm {name!r}: method {kind}: {err}") from None
    return ArmSpec(name, kind, config, handler, skip_reason=reason, **flags)


def with_seed(config: Config, seed: int) -> Config:
    """The config with its `seed` field (if it has one) set to the arm's seed."""
    if any(f.name == "seed" for f in dataclasses.fields(config)):
        return config.replace(seed=seed)
    return config
