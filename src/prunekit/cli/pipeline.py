"""The work behind the CLI's commands: build the model and data, then train, prune, fine-tune.

`prepare` does everything that can fail on a bad recipe (data, model, weights, a dry run of a
one-shot method) before anything is written; the stages then run in order on one `Job`, each
ending with an evaluation that is recorded for the result and the report.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.environment import check_input_fits
from ..core.errors import CheckpointError, ConfigError, PrunekitError, load_error_text
from ..core.modes import evaluating
from ..cost.macs import Cost, count_cost
from ..data import DataBundle, load_data
from ..engine import MetricsLog, TrainConfig, evaluate, seed_everything, train
from ..models import create_model
from ..surgery.copying import adopt_
from ..surgery.plan import Plan
from .recipe import Recipe

Echo = Callable[[str], None]


@dataclass
class Job:
    """One model going through the stages of a recipe, with what each stage measured."""

    recipe: Recipe
    bundle: DataBundle
    model: nn.Module
    example: torch.Tensor
    plan: Plan | None = None
    weights: str | None = None
    progress: bool = True
    echo: Echo = print
    run_dir: Path | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    before_prune: nn.Module | None = None  # a copy of the model just before pruning
    # the dry run of a one-shot method on a copy: (weights then, pruned copy, result, seconds, its warnings)
    trial: tuple[tuple, nn.Module, Any, float, list] | None = None  # ... and the warnings it gave
    prune_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def log_path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None else None

    def log(self, event: str, **fields: Any) -> None:
        with MetricsLog(self.log_path) as log:
            log.write(event, **fields)

    def example_on_model(self) -> torch.Tensor:
        device = next(iter(self.model.parameters())).device
        return self.example.to(device)

    def cost(self) -> Cost:
        return count_cost(self.model, self.example_on_model())

    def loader(self, split: str):
        return self.bundle.test if split == "test" else self.bundle.val

    @property
    def val_loader(self):
        return self.bundle.val if self.bundle.val.num_samples > 0 else None

    def evaluate(self, stage: str) -> dict[str, Any]:
        """Accuracy on the reported split (and on val when it exists) plus params/MACs."""
        cost = self.cost()
        split = self.recipe.eval.split
        result = evaluate(self.model, self.loader(split))
        entry = {"step": stage, "params": cost.params, "macs": cost.macs, "accuracy": result["acc"],
                 "loss": result["loss"], "split": split}
        if split != "val" and self.val_loader is not None:
            entry["val_accuracy"] = evaluate(self.model, self.val_loader)["acc"]
        self.evaluations.append(entry)
        self.log("evaluation", **entry)
        return entry

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def prepare(recipe: Recipe, weights: str | None = None, progress: bool = True, echo: Echo = print,
            check_method: bool = False, times: bool = True) -> Job:
    """Load the data, build the model, load weights; with check_method, dry-run one-shot pruning.
    `times`: the job ends by timing the model (bench section), whose input is checked now."""
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    bundle = load_data(recipe.data)
    num_classes = recipe.model.num_classes
    if num_classes is not None and num_classes != bundle.num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but dataset {recipe.data.name!r} has "
                          f"{bundle.num_classes} classes; set model.num_classes=null")
    recipe.model.num_classes = bundle.num_classes
    seed_everything(recipe.seed)
    model = create_model(recipe.model.name, bundle.num_classes, **recipe.model.kwargs)
    example = _example_input(bundle)
    if times and recipe.eval.latency:  # the run's last step: refused now, not after hours of training
        check_input_fits((recipe.bench.batch_size, *bundle.input_shape), f"{recipe.source}: bench.batch_size="
                         f"{recipe.bench.batch_size} (or set eval.latency=false)")
    weights = weights or recipe.init
    plan = None
    if weights is not None:
        model, plan = load_weights(model, weights)
    job = Job(recipe, bundle, model, example, plan, weights, progress, echo)
    _check_forward(job)
    if check_method and recipe.method is not None and _trains(recipe.method.handler):
        from ..graph.groups import check_ignore
        from ..methods import check_training_phases

        check_ignore(model, getattr(recipe.method.config, "ignore", None) or ())  # not after hours of training
        recipe.method.config.check_model_with(model, example)
        section = ("method_train" if recipe.method_train is not None
                   else "train" if recipe.train is not None else "the default TrainConfig")
        check_training_phases(recipe.method.config, recipe.trainer_for_method, section)
    elif check_method and recipe.method is not None:
        trial = copy.deepcopy(model)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as said:  # said again by the prune stage, once
            warnings.simplefilter("always")
            result = run_method(job, trial)
        # kept for the prune stage: a model nothing changed until then is not pruned (and timed) twice
        job.trial = (_weights_key(model), trial, result, time.perf_counter() - start, said)
    return job


def _weights_key(model: nn.Module) -> tuple:
    """What the dry run's result depends on besides the recipe: the architecture and the weights."""
    from ..surgery.plan_check import architecture_fingerprint
    from ..surgery.verify import weight_norms

    return architecture_fingerprint(model), weight_norms(list(model.state_dict(keep_vars=True).values()))


def check_timing(recipe: Recipe) -> None:
    """ConfigError now when the run's last step, timing the model as `bench` says, cannot run here."""
    from ..cost.latency import timing_device

    if not recipe.eval.latency:
        return
    try:
        timing_device(recipe.bench)
    except ConfigError as err:
        raise ConfigError(f"{recipe.source}: bench: {err}; or set eval.latency=false") from None


def fresh_model(recipe: Recipe, weights: str | None) -> nn.Module:
    """The recipe's model as `prepare` builds it (same seed), with `weights` loaded if given."""
    seed_everything(recipe.seed)
    model = create_model(recipe.model.name, recipe.model.num_classes, **recipe.model.kwargs)
    return load_weights(model, weights)[0] if weights is not None else model


def _example_input(bundle: DataBundle) -> torch.Tensor:
    loader = bundle.val if bundle.val.num_samples > 0 else bundle.test
    x, _ = next(iter(loader))
    return x[:1].detach().to("cpu").clone()


def _check_forward(job: Job) -> None:
    try:
        with torch.no_grad(), evaluating(job.model):
            out = job.model(job.example_on_model())
    except (RuntimeError, ValueError, TypeError) as err:
        shape = "x".join(map(str, job.bundle.input_shape))
        raise ConfigError(f"model {job.recipe.model.name!r} cannot take {job.recipe.data.name} images "
                          f"({shape}): {_first_line(err)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != job.bundle.num_classes:
        raise ConfigError(f"model {job.recipe.model.name!r} must return (batch, {job.bundle.num_classes}) logits; "
                          f"got {getattr(out, 'shape', type(out).__name__)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def load_weights(model: nn.Module, path: str | Path) -> tuple[nn.Module, Plan | None]:
    """Load dense or pruned weights into a freshly built `model`; returns (model, plan or None).

    A .safetensors file with a prunekit plan inside is replayed with `load_pruned` (masks
    included); one without is a dense state dict (its checksum verified when it has one); a .pt
    file must be a prunekit training checkpoint (read weights-only; its masks are restored).
    Weights holding NaN or inf are refused: every number computed from them would be meaningless.
    """
    from ..core.modules import first_nonfinite, nonfinite_words

    model, plan = _load_weights(model, Path(path))
    bad = first_nonfinite(model)
    if bad is not None:
        kind, name = bad
        raise CheckpointError(f"{path}: {kind} {name} holds {nonfinite_words(kind)} (a diverged training, or a "
                              "damaged file); give weights saved from a training that converged")
    return model, plan


def _safetensors_header(path: Path) -> bool:
    """Whether the file starts as a .safetensors file does (whatever its name): an 8-byte
    little-endian header length that fits the file, then the header's opening brace."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _load_weights(model: nn.Module, path: Path) -> tuple[nn.Module, Plan | None]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from ..engine.checkpoint import load_checkpoint
    from ..surgery.mask_io import restore_masks_from_state, unpaired_masks
    from ..surgery.persist import PLAN_KEY, load_pruned, read_plan
    from ..surgery.tensor_file import SHA_KEY, dtype_kind_error, header_dtypes, load_state_, read_tensor_file

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"weights {path} is a directory; give a file inside it (dense.safetensors, "
                              "pruned.safetensors or ckpt/<stage>/last.pt), or the run directory as the recipe")
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; give the path of a run's dense.safetensors or "
                              "pruned.safetensors (or ckpt/<stage>/last.pt), or the run directory as the recipe")
    safetensors = path.suffix == ".safetensors" or (not zipfile.is_zipfile(path) and _safetensors_header(path))
    if not safetensors and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is neither a .safetensors weights file nor a readable training checkpoint "
                              "(last.pt is a zip archive; this file is not one, or is cut short); give "
                              "dense.safetensors or pruned.safetensors from a run, or an intact ckpt/<stage>/last.pt")
    if safetensors:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (OSError, SafetensorError, ValueError) as err:
            raise CheckpointError(f"cannot read {path} ({_first_line(err)}): it is not an intact .safetensors file, "
                                  "or is cut short; give dense.safetensors or pruned.safetensors from a run, or "
                                  "copy the file again") from None
        if PLAN_KEY in meta:
            return load_pruned(model, path), read_plan(path)
        if SHA_KEY in meta:  # written by prunekit: checksummed, module versions kept
            meta, tensors = read_tensor_file(path)
            load_state_(model, tensors, meta, path)
            return model, None
        try:
            kind = dtype_kind_error(model.state_dict(), header_dtypes(path))  # the header only
            if kind:
                raise CheckpointError(f"weights in {path} do not fit this model: {kind}")
            load_model(model, str(path), strict=True)
        except (RuntimeError, SafetensorError, ValueError) as err:
            raise CheckpointError(f"weights in {path} do not fit this model: {load_error_text(err)}") from None
        return model, None
    state = load_checkpoint(path, "give the run's dense.safetensors or pruned.safetensors, or an intact "
                                  "ckpt/<stage>/last.pt, as --weights")["model"]
    unpaired = unpaired_masks(state)
    if unpaired:
        raise CheckpointError(f"{path} holds a weight mask without its masked weight ({unpaired[0]}): "
                              "the file is damaged or was edited; give an intact ckpt/<stage>/last.pt or the run's "
                              "model.safetensors")
    restore_masks_from_state(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        pruned = ("; a training checkpoint holds weights without a plan, so one written while a pruned model trained "
                  "has widths only its plan rebuilds: give that stage's model.safetensors or the run's "
                  "pruned.safetensors instead" if "size mismatch" in str(err) else "")
        raise CheckpointError(f"weights in {path} do not fit this model{pruned}: {load_error_text(err)}") from None
    return model, None


def save_weights(job: Job, path: Path) -> Path:
    """Write the model: with its plan and masks (pruned) via save_pruned, else as a dense state dict."""
    from ..surgery.persist import save_pruned
    from ..surgery.tensor_file import save_state_file

    model = job.model
    if job.plan is not None:
        return save_pruned(model, job.plan, path)
    save_state_file(model, path)
    return path


def train_stage(job: Job, stage: str, cfg: TrainConfig, ckpt_dir: Path | None = None, resume: bool = False) -> None:
    """Train the model in place for cfg.epochs; epochs are logged to metrics.jsonl.

    With `ckpt_dir` the training state is checkpointed there after every epoch; with `resume`
    training continues after the last checkpointed epoch (see prunekit.engine.train).
    """
    job.log("stage", name=stage, epochs=cfg.epochs, resume=resume)
    result = job.timed(stage, lambda: train(job.model, job.bundle.train, job.val_loader, cfg, ckpt_dir=ckpt_dir,
                                            log_path=job.log_path, progress=job.progress, resume=resume))
    if result.start_epoch:
        job.echo(f"{stage}: resumed after epoch {result.start_epoch} of {cfg.epochs}")
    last = result.final_metrics
    val = f", val acc {last['val_acc']:.4f}" if "val_acc" in last else ""
    job.echo(f"{stage}: {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, train loss {last.get('train_loss', float('nan')):.4f}{val} "
             f"({job.seconds[stage]:.1f} s)")


def _trains(handler: Callable) -> bool:
    return "train_loader" in inspect.signature(handler).parameters


def run_method(job: Job, model: nn.Module, ckpt_dir: Path | None = None, resume: bool = False) -> Any:
    """Call the recipe's method on `model` with the keyword arguments its handler accepts.

    A method that trains and accepts `ckpt_dir`/`resume` checkpoints its training there.
    """
    method, recipe = job.recipe.method, job.recipe
    params = inspect.signature(method.handler).parameters
    available = {"train_loader": job.bundle.train, "val_loader": job.val_loader,
                 "train_config": recipe.trainer_for_method, "progress": job.progress}
    if ckpt_dir is not None:
        available.update(ckpt_dir=ckpt_dir, resume=resume)
    if "batches" in params and recipe.calibration_batches > 0:
        job.bundle.train.set_epoch(0)
        available["batches"] = list(itertools.islice(iter(job.bundle.train), recipe.calibration_batches))
    kwargs = {k: v for k, v in available.items() if k in params}
    device = next(iter(model.parameters())).device
    from ..methods import prune_  # its checks, and the fingerprints that keep the plan to this architecture

    return prune_(model, method.config, job.example.to(device), **kwargs)


def prune_stage(job: Job, ckpt_dir: Path | None = None, resume: bool = False) -> None:
    """Prune with the recipe's method; the plan is composed with a plan the model already had.

    A training method (SLR, ADMM, Gator) checkpoints its training in `ckpt_dir` every epoch and,
    with `resume`, continues from there.
    """
    from ..engine.logging import to_plain

    method = job.recipe.method
    job.before_prune = copy.deepcopy(job.model)
    job.log("stage", name="prune", method=method.label)
    before = job.cost()
    trial, job.trial = job.trial, None
    if trial is not None and trial[0] == _weights_key(job.model):  # the dry run pruned these very weights
        adopt_(job.model, trial[1])
        result, job.seconds["prune"] = trial[2], trial[3]
        for w in trial[4]:  # its warnings, as the pruning would have given them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
        result = job.timed("prune", lambda: run_method(job, job.model, ckpt_dir, resume))
    plan = result.plan
    job.plan = plan if job.plan is None else job.plan.compose(plan)
    try:
        job.prune_metrics = to_plain(result.metrics)
    except PrunekitError:
        job.prune_metrics = {"note": "method metrics could not be serialised"}
    after = job.cost()
    for note in job.prune_metrics.get("notes", []):
        job.echo(f"note: {note}")
    job.echo(f"prune: {method.label}, MACs {_count(before.macs)} -> {_count(after.macs)} "
             f"({before.macs / max(after.macs, 1):.2f}x fewer), params {_count(before.params)} -> "
             f"{_count(after.params)} ({job.seconds['prune']:.1f} s){_zeros_note(job)}")


def _zeros_note(job: Job) -> str:
    """Zeros inside the kept kernels, which the dense MACs above do not show (masks, N:M, SSC)."""
    from ..surgery.mask_io import weight_sparsity

    weights = weight_sparsity(job.model)["weights"]
    if not weights["zeros"]:
        return ""
    from ..layers.ssc import SSCConv2d

    ssc = any(isinstance(m, SSCConv2d) for m in job.model.modules())
    note = (f"; {weights['zeros']:,} of the {weights['numel']:,} conv/linear weights are zero "
            f"({weights['sparsity']:.1%}{', SSC layers counted as the dense convs they stand for' if ssc else ''})")
    macs = job.prune_metrics.get("macs_nonzero")
    if isinstance(macs, (int, float)) and not isinstance(macs, bool):
        note += f", MACs on nonzero weights {_count(macs)}"
    return note


def _count(n: float) -> str:
    from ..report.tables import fmt_count

    return fmt_count(n)


def measure(job: Job) -> dict[str, Any]:
    """Whole-model latency (before pruning vs now, interleaved) and per-layer latency."""
    from ..cost.latency import compare_latency, out_of_memory_as_config_error
    from ..cost.memory_format import timed_as_it_runs

    cfg, out = job.recipe.bench, {}
    if not job.recipe.eval.latency:
        return out
    shape = tuple(job.bundle.input_shape)
    models = {"after": job.model}
    if job.before_prune is not None:
        models = {"before": job.before_prune, "after": job.model}
    models = {k: _baked(m) for k, m in models.items()}  # time the exported model, not the mask multiply
    cfg = timed_as_it_runs(job.model, cfg)  # both models alike, so the ratio is the pruning's, not the layout's
    saved = (f" (the model is saved in {job.run_dir}: time it with `prunekit bench {job.run_dir} "
             "bench.batch_size=N`)" if job.run_dir is not None else "")
    t0 = time.perf_counter()
    with out_of_memory_as_config_error(cfg, "the models", "bench",
                                       f"give a smaller bench.batch_size or set eval.latency=false{saved}"):
        cmp = compare_latency(models, shape, cfg)
        out = {k: r.to_dict() for k, r in cmp.results.items()}
        if job.recipe.eval.layer_latency:
            out["layers"] = {k: layer_latency(m, job.example, cfg) for k, m in models.items()}
    job.seconds["latency"] = time.perf_counter() - t0
    return out


def _baked(model: nn.Module) -> nn.Module:
    """`model` itself when it has no masks, else a copy with its masks baked in."""
    from ..surgery.masks import bake_masks_, masked_modules

    return bake_masks_(copy.deepcopy(model)) if masked_modules(model) else model


def layer_latency(model: nn.Module, example: torch.Tensor, cfg: Any) -> dict[str, float]:
    """Median latency (ms) of every conv/linear layer alone, on its real input shape."""
    from ..cost.latency import measure_latency
    from ..layers.ssc import SSCConv2d

    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, SSCConv2d)):
            def grab(m, args, n=name):
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(n, tuple(args[0].shape[1:]))
            handles.append(mod.register_forward_pre_hook(grab))
    try:
        with torch.no_grad(), evaluating(model):
            model(example.to(next(iter(model.parameters())).device))
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return {name: measure_latency(modules[name], shape, cfg).median_ms for name, shape in shapes.items()}
