"""The workflow commands: run, train, prune, finetune. Each writes one new run directory.

Positional arguments are a recipe (a YAML file or a run directory; none = the embedded default)
and any number of dotted overrides such as `train.epochs=3 method.macs_fraction=0.4`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import click

from ..core.errors import ConfigError

_RUN_DIR_HELP = "Run directory to create (default: <out>/<name>-<timestamp>); must be new or empty."
_WEIGHTS_HELP = ("Weights to start from: a .safetensors file from a run (dense, or pruned with its plan "
                 "inside) or a training checkpoint last.pt. Same as init=PATH.")

# The recipe section each stage runs.
_SECTION_KEYS = {"train": "train", "prune": "method", "finetune": "finetune"}
# Which file of a run directory each command starts from when given that directory.
_PREFERRED = {"prune": ("dense.safetensors", "pruned.safetensors"),
              "finetune": ("pruned.safetensors", "dense.safetensors"),
              "eval": ("pruned.safetensors", "dense.safetensors"),
              "bench": ("pruned.safetensors", "dense.safetensors"),
              "export": ("pruned.safetensors", "dense.safetensors")}


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
    """The weights file of a run directory that `command` starts from, if any. A run that pruned
    (its state says so) must still hold pruned.safetensors: its dense model is not a stand-in."""
    from .runstate import read_state

    if run_dir is None or command not in _PREFERRED:
        return None
    state = read_state(run_dir)
    pruned = run_dir / "pruned.safetensors"
    if _PREFERRED[command][0] == pruned.name and state is not None and "prune" in state["done"] \
            and not pruned.is_file():
        raise ConfigError(f"run directory {run_dir} pruned its model but {pruned.name} is missing; restore it, or give "
                          f"--weights {run_dir / 'dense.safetensors'} to use the dense model on purpose")
    for name in _PREFERRED[command]:
        if (run_dir / name).is_file():
            return str(run_dir / name)
    return None


def resolve(args: tuple[str, ...], command: str, weights: str | None, method: str | None = None):
    """(recipe, weights) for a command: run-directory weights apply unless --weights is given."""
    from .recipe import load_recipe, split_arguments

    from .runstate import check_finished

    source, overrides = split_arguments(args)
    recipe, run_dir = load_recipe(source, overrides, method)
    weights = None if weights is None else os.path.expanduser(weights)
    if weights is None and not any(o.split("=", 1)[0].strip() == "init" for o in overrides):
        if run_dir is not None and command in _PREFERRED:
            check_finished(run_dir, command)
            weights = run_dir_weights(run_dir, command)
            if weights is None:  # never a randomly initialised model in place of the run's
                raise ConfigError(f"run directory {run_dir} holds no weights ({' or '.join(_PREFERRED[command])}); "
                                  f"give --weights PATH, or a run directory that finished")
    return recipe, weights


def execute(command: str, args: tuple[str, ...], out: str | None, weights: str | None, dry_run: bool,
            quiet: bool, method: str | None = None) -> None:
    from .pipeline import check_timing, prepare
    from .rundir import choose_run_dir, create_run_dir
    from ..core.integrity import hold_dir

    recipe, weights = resolve(args, command, weights, method)
    stages = _stages(command, recipe)
    if command in ("prune", "finetune") and weights is None and recipe.init is None:
        raise ConfigError(f"`prunekit {command}` needs weights to start from: --weights PATH, init=PATH, "
                          "or a run directory as the recipe")
    check_timing(recipe)
    echo = (lambda s: None) if quiet else click.echo
    run_path = choose_run_dir(recipe.name, recipe.out, out)
    job = prepare(recipe, weights, progress=not quiet, echo=echo, check_method="prune" in stages)
    if job.weights is not None:  # the resolved recipe names the weights it starts from
        recipe.init = str(Path(job.weights).resolve())
    if dry_run:
        click.echo(recipe.to_yaml(), nl=False)
        return
    run_path = create_run_dir(job, run_path, explicit=out is not None)
    with hold_dir(run_path):
        _start(command, job, stages, recipe, run_path)


def _start(command: str, job, stages: list[str], recipe, run_path: Path) -> None:
    from ..core.integrity import file_digest
    from .runstate import new_state, write_state

    state = new_state(command, stages, None if job.weights is None else str(Path(job.weights).resolve()))
    state["recipe_sha256"] = file_digest(run_path / "recipe.yaml")  # a resume runs the same settings
    write_state(run_path, state)
    job.echo(f"run directory: {run_path}")
    job.echo(f"data: {recipe.data.name}, {job.bundle.train.num_samples} train / {job.bundle.val.num_samples} val / "
         f"{job.bundle.test.num_samples} test images; model: {recipe.model.name}")
    if "train" not in stages or job.weights is not None:
        _report_eval(job, "loaded" if job.weights is not None else "initial")
    _resumable(run_stages, job, state, run_path)


def _resumable(stages, job, state: dict, run_dir: Path, **kwargs) -> None:
    """Run `stages`; on Ctrl-C, say how to continue (the stages checkpoint as they go) and exit 130."""
    try:
        stages(job, state, **kwargs)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; continue with: prunekit resume {run_dir}", err=True)
        raise SystemExit(130) from None


def run_stages(job, state: dict, resume: bool = False) -> None:
    """Run the stages of `state` that have not finished, then write the result and the report.

    After each stage its weights and measurements are recorded in state.json, so a run stopped
    at any point continues from there (`prunekit resume`); training stages checkpoint every epoch.
    """
    from .pipeline import prune_stage, save_weights, train_stage
    from .rundir import finish
    from .runstate import stage_dir, write_state

    run_path, recipe = job.run_dir, job.recipe
    for stage in state["stages"]:
        if stage in state["done"]:
            continue
        ckpt = stage_dir(run_path, stage)
        if stage == "train":
            train_stage(job, "train", recipe.train, ckpt_dir=ckpt, resume=resume)
            if job.plan is None:
                save_weights(job, run_path / "dense.safetensors")
            _report_eval(job, "dense" if job.plan is None else "trained")
        elif stage == "prune":
            state["before_prune"] = state["weights"]
            prune_stage(job, ckpt_dir=ckpt, resume=resume)
            _report_eval(job, "pruned")
        else:
            train_stage(job, "finetune", recipe.finetune, ckpt_dir=ckpt, resume=resume)
            _report_eval(job, "fine-tuned")
        ckpt.mkdir(parents=True, exist_ok=True)
        save_weights(job, ckpt / "model.safetensors")
        state.update(weights=str((ckpt / "model.safetensors").relative_to(run_path)), evaluations=job.evaluations,
                     seconds=job.seconds, prune_metrics=job.prune_metrics, done=state["done"] + [stage])
        write_state(run_path, state)
    finish(job, f"prunekit {state['command']}: {recipe.name}")
    state["finished"] = True
    write_state(run_path, state)
    job.echo(f"report: {run_path / 'report.md'}")


def resume_run(run_dir: Path, quiet: bool) -> None:
    """Continue a stopped run in its own directory: finished stages are kept, the stage in
    progress continues from its last checkpointed epoch. The run directory is held for the whole
    resume: a run still in progress there is refused."""
    from ..core.integrity import hold_dir
    from .runstate import resumable_state

    if not run_dir.is_dir():
        resumable_state(run_dir)  # says what is wrong
    with hold_dir(run_dir):
        _resume(run_dir, quiet)


def _resume(run_dir: Path, quiet: bool) -> None:
    from .pipeline import check_timing, fresh_model, prepare
    from .recipe import load_recipe
    from ..core.integrity import file_digest
    from .runstate import resumable_state, weights_path

    state = resumable_state(run_dir)
    if state.get("recipe_sha256") not in (None, file_digest(run_dir / "recipe.yaml")):
        raise ConfigError(f"{run_dir / 'recipe.yaml'} changed since the run started; a resumed run keeps the settings "
                          f"its finished stages ran with (finished: {', '.join(state['done']) or 'none'}): put the "
                          "file back as it was, or start a new run with the edited recipe")
    recipe, _ = load_recipe(str(run_dir))
    check_timing(recipe)
    for stage in state["stages"]:
        key = _SECTION_KEYS[stage]
        if stage not in state["done"] and getattr(recipe, key) is None:
            raise ConfigError(f"{run_dir / 'recipe.yaml'} has no '{key}' section, but the stage '{stage}' is still "
                              "to do; restore the section to resume the run")
    echo = (lambda s: None) if quiet else click.echo
    job = prepare(recipe, weights_path(run_dir, state["weights"]), progress=not quiet, echo=echo)
    job.run_dir = run_dir
    job.evaluations, job.seconds = list(state["evaluations"]), dict(state["seconds"])
    job.prune_metrics = dict(state.get("prune_metrics") or {})
    if "prune" in state["done"]:  # the report compares with the model pruning started from
        job.before_prune = fresh_model(recipe, weights_path(run_dir, state["before_prune"]))
    todo = [s for s in state["stages"] if s not in state["done"]]
    echo(f"resuming {run_dir}: finished {', '.join(state['done']) or 'no stage'}; "
         f"to do: {', '.join(todo) or 'the result and the report'}")
    job.log("resume", done=state["done"], todo=todo)
    if not job.evaluations:  # stopped before the first evaluation
        if "train" not in state["stages"] or job.weights is not None:
            _report_eval(job, "loaded" if job.weights is not None else "initial")
    _resumable(run_stages, job, state, run_dir, resume=True)


def _stages(command: str, recipe) -> list[str]:
    if command == "run":
        return [s for s, sec in (("train", recipe.train), ("prune", recipe.method), ("finetune", recipe.finetune))
                if sec is not None]
    key = _SECTION_KEYS[command]
    if getattr(recipe, key) is None:
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


@click.command("resume")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--quiet", "-q", is_flag=True,
              help="Print only errors (a search prints only its genotype and report, as search -q does).")
def resume_cmd(run_dir: Path, quiet: bool) -> None:
    """Continue a stopped run (Ctrl-C, SIGKILL, a crash) in its own directory.

    Stages that finished are not redone; a training stage continues after its last
    checkpointed epoch (one is written after every epoch), so at most the epoch that was
    running is lost, and on CPU the outcome equals that of an uninterrupted run.

    \b
    prunekit resume runs/digits-small_cnn-20250101-120000
    prunekit resume runs/search-20250101-120000     (a PR-DARTS search: every phase continues alike)
    """
    from .runstate import STATE_NAME

    if (run_dir / "recipe.json").is_file() and not (run_dir / STATE_NAME).exists():
        from .search_cmd import resume_search

        resume_search(run_dir, quiet)
        return
    resume_run(run_dir, quiet)


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
