"""The workflow commands: run, train, prune, finetune. Each writes one new run directory.

Positional arguments are a recipe (a YAML file or a run directory; none = the embedded default)
and any number of dotted overrides such as `train.epochs=3 method.macs_fraction=0.4`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from ..core.errors import ConfigError

_RUN_DIR_HELP = "Run directory to create (default: <out>/<name>-<timestamp>); must be new or empty."
_WEIGHTS_HELP = ("Weights to start from: a .safetensors file from a run (dense, or pruned with its plan "
                 "inside) or a training checkpoint last.pt. Same as init=PATH.")

# Which file of a run directory each command starts from when given that directory.
_PREFERRED = {"prune": ("dense.safetensors", "pruned.safetensors"),
              "finetune": ("pruned.safetensors", "dense.safetensors"),
              "eval": ("pruned.safetensors", "dense.safetensors"),
              "bench": ("pruned.safetensors", "dense.safetensors")}


def workflow_options(fn: Callable) -> Callable:
    fn = click.option("--quiet", "-q", is_flag=True, help="Print only errors.")(fn)
    fn = click.option("--dry-run", is_flag=True,
                      help="Check everything (recipe, data, model, pruning target), print the resolved "
                           "recipe and stop; writes nothing.")(fn)
    fn = click.option("--weights", type=click.Path(dir_okay=False), default=None, help=_WEIGHTS_HELP)(fn)
    fn = click.option("--out", type=click.Path(file_okay=False), default=None, help=_RUN_DIR_HELP)(fn)
    return click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE]...")(fn)


def method_option(fn: Callable) -> Callable:
    return click.option("--method", default=None,
                        help="Replace the recipe's method section by this method's defaults (e.g. "
                             "magnitude, slr, admm); set its fields with method.<field>=value.")(fn)


def run_dir_weights(run_dir: Path | None, command: str) -> str | None:
    """The weights file of a run directory that `command` starts from, if any."""
    if run_dir is None or command not in _PREFERRED:
        return None
    for name in _PREFERRED[command]:
        if (run_dir / name).is_file():
            return str(run_dir / name)
    return None


def resolve(args: tuple[str, ...], command: str, weights: str | None, method: str | None = None):
    """(recipe, weights) for a command: run-directory weights apply unless --weights is given."""
    from .recipe import load_recipe, split_arguments

    source, overrides = split_arguments(args)
    recipe, run_dir = load_recipe(source, overrides, method)
    if weights is None and not any(o.split("=", 1)[0].strip() == "init" for o in overrides):
        weights = run_dir_weights(run_dir, command)
    return recipe, weights


def execute(command: str, args: tuple[str, ...], out: str | None, weights: str | None, dry_run: bool,
            quiet: bool, method: str | None = None) -> None:
    from .pipeline import prepare, prune_stage, save_weights, train_stage
    from .rundir import choose_run_dir, create_run_dir, finish

    recipe, weights = resolve(args, command, weights, method)
    stages = _stages(command, recipe)
    if command in ("prune", "finetune") and weights is None and recipe.init is None:
        raise ConfigError(f"`prunekit {command}` needs weights to start from: --weights PATH, init=PATH, "
                          "or a run directory as the recipe")
    echo = (lambda s: None) if quiet else click.echo
    run_path = None if dry_run else choose_run_dir(recipe.name, recipe.out, out)
    job = prepare(recipe, weights, progress=not quiet, echo=echo, check_method="prune" in stages)
    if dry_run:
        click.echo(recipe.to_yaml(), nl=False)
        return
    run_path = create_run_dir(job, run_path, explicit=out is not None)
    echo(f"run directory: {run_path}")
    echo(f"data: {recipe.data.name}, {job.bundle.train.num_samples} train / {job.bundle.val.num_samples} val / "
         f"{job.bundle.test.num_samples} test images; model: {recipe.model.name}")
    if "train" not in stages or job.weights is not None:
        _report_eval(job, "loaded" if job.weights is not None else "initial")
    for stage in stages:
        if stage == "train":
            train_stage(job, "train", recipe.train)
            if job.plan is None:
                save_weights(job, run_path / "dense.safetensors")
            _report_eval(job, "dense" if job.plan is None else "trained")
        elif stage == "prune":
            prune_stage(job)
            _report_eval(job, "pruned")
        else:
            train_stage(job, "finetune", recipe.finetune)
            _report_eval(job, "fine-tuned")
    title = f"prunekit {command}: {recipe.name}"
    finish(job, title)
    echo(f"report: {run_path / 'report.md'}")


def _stages(command: str, recipe) -> list[str]:
    if command == "run":
        return [s for s, sec in (("train", recipe.train), ("prune", recipe.method), ("finetune", recipe.finetune))
                if sec is not None]
    section = {"train": recipe.train, "prune": recipe.method, "finetune": recipe.finetune}[command]
    key = {"train": "train", "prune": "method", "finetune": "finetune"}[command]
    if section is None:
        raise ConfigError(f"`prunekit {command}` needs a '{key}' section in the recipe "
                          f"(it is null or absent in {recipe.source}); add one or set {key}.<field>=...")
    return [command]


def _report_eval(job, stage: str) -> None:
    from ..report.tables import fmt_count

    e = job.evaluate(stage)
    val = f", val acc {e['val_accuracy']:.4f}" if e.get("val_accuracy") is not None else ""
    job.echo(f"{stage}: {e['split']} acc {e['accuracy']:.4f}{val}; params {fmt_count(e['params'])}, "
             f"MACs {fmt_count(e['macs'])}")


@click.command("run")
@workflow_options
@method_option
def run(args, out, weights, dry_run, quiet, method) -> None:
    """Train, prune, fine-tune, evaluate and report, as the recipe says.

    Without a recipe the embedded default runs: a small CNN on scikit-learn digits, half of its
    MACs removed by the magnitude pruner, then fine-tuned (no download, no GPU needed).

    \b
    prunekit run
    prunekit run method.macs_fraction=0.3 finetune.epochs=10 --out runs/mine
    prunekit run --method gator method.target=0.5 method.epochs=3
    prunekit run recipes/resnet56_cifar10_slr.yaml init=dense.safetensors train=null
    """
    execute("run", args, out, weights, dry_run, quiet, method)


@click.command("train")
@workflow_options
def train_cmd(args, out, weights, dry_run, quiet) -> None:
    """Train the recipe's model densely (the train section); saves dense.safetensors."""
    execute("train", args, out, weights, dry_run, quiet)


@click.command("prune")
@workflow_options
@method_option
def prune_cmd(args, out, weights, dry_run, quiet, method) -> None:
    """Prune trained weights with the recipe's method; saves pruned.safetensors and plan.json.

    \b
    prunekit prune runs/my-train-run                   (starts from its dense.safetensors)
    prunekit prune --weights dense.safetensors method.macs_fraction=0.4
    """
    execute("prune", args, out, weights, dry_run, quiet, method)


@click.command("finetune")
@workflow_options
def finetune_cmd(args, out, weights, dry_run, quiet) -> None:
    """Fine-tune a pruned model (the finetune section); saves the result with its plan.

    \b
    prunekit finetune runs/my-prune-run finetune.epochs=10
    """
    execute("finetune", args, out, weights, dry_run, quiet)
