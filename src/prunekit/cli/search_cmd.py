"""`prunekit search RECIPE.yaml [key=value ...]`: a PR-DARTS search and its evaluation.

The recipe has the sections of `prunekit.methods.prdarts.run.SearchRecipe` (data, search,
evaluate, device, threads); dotted overrides such as `search.pretrain_epochs=2` apply on top.
Every phase (of the search and of the evaluation) checkpoints every epoch in the run directory;
`prunekit resume <run>` (or `--resume <run>`) continues a stopped search from there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..core.errors import ConfigError

TOP_KEYS = ("data", "search", "evaluate", "device", "threads", "limit_eval_batches")


@click.command("search")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create (default: runs/search-<timestamp>); must be new or empty.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Continue the stopped search in this run directory (same recipe; the same as prunekit resume DIR).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or phase lines; only the final genotype.")
def search_cmd(recipe: str | None, overrides: tuple[str, ...], out: str | None, resume_dir: Path | None,
               quiet: bool) -> None:
    """Search a sparse DARTS cell (PR-DARTS) and evaluate it; writes genotypes, alpha plots, report.

    A search recipe has the sections data, search (PRDartsConfig), evaluate (the derived
    network's training) and the keys device, threads, limit_eval_batches; KEY=VALUE overrides
    set any field, read as YAML.

    \b
    prunekit search recipes/prdarts_cifar10_cpu_smoke.yaml
    prunekit search recipes/prdarts_cifar10_cpu_smoke.yaml search.seed=1 evaluate.enabled=false
    prunekit search recipes/prdarts_cifar10.yaml device=cuda --out runs/dass
    prunekit resume runs/dass                      (continue a stopped search)
    """
    if resume_dir is not None:
        if out is not None:
            raise ConfigError("--resume continues a run in its own directory; leave out --out")
        resume_search(resume_dir, quiet, None if recipe is None else _parse(recipe, overrides))
        return
    if recipe is None:
        raise ConfigError("give a search recipe, e.g. prunekit search recipes/prdarts_cifar10_cpu_smoke.yaml")
    from .rundir import choose_run_dir

    parsed = _parse(recipe, overrides)
    _interruptible(parsed, choose_run_dir("search", Path("runs"), out), quiet, explicit=out is not None)


def _parse(recipe: str, overrides: tuple[str, ...]):
    from ..methods.prdarts.run import SearchRecipe
    from .overrides import apply_overrides, load_yaml_file

    raw = load_yaml_file(recipe)
    if not isinstance(raw, dict):
        raise ConfigError(f"{recipe}: a search recipe is a mapping with data, search, evaluate sections")
    return SearchRecipe.from_dict(apply_overrides(raw, overrides, allowed_top=TOP_KEYS))


def resume_search(run_dir: Path, quiet: bool, recipe: Any = None) -> None:
    """Continue a stopped search in its own directory (`prunekit resume`, `search --resume`):
    finished phases are read back, the phase in progress continues after its last saved epoch.
    A `recipe` given again must be the run's."""
    from ..methods.prdarts.run import resumable_search, saved_phases

    saved = resumable_search(run_dir)
    if recipe is not None:
        _check_same(recipe.to_dict(), saved.to_dict(), run_dir)
    done, todo = saved_phases(saved, run_dir)
    if not quiet:
        click.echo(f"resuming {run_dir}: finished {', '.join(done) or 'no phase'}; "
                   f"to do: {', '.join(todo) or 'the result and the report'}")
    _interruptible(saved, run_dir, quiet, resume=True)


def _check_same(now: dict[str, Any], run: dict[str, Any], run_dir: Path) -> None:
    from ..methods.prdarts.run import recipe_differences

    diff = recipe_differences(run, now)
    if diff:
        pairs = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, a, b in diff[:6])
        raise ConfigError(f"--resume {run_dir}: the recipe differs from the run's ({pairs}); resume with the run's "
                          f"recipe (prunekit resume {run_dir}) or start a new search with --out")


def _interruptible(recipe, run_dir: Path, quiet: bool, explicit: bool = True, resume: bool = False) -> None:
    """Run the search; on Ctrl-C, say how to continue (its phases checkpoint as they go) and exit 130."""
    from ..methods.prdarts.run import SearchInterrupted, run_search

    try:
        result = run_search(recipe, run_dir, explicit=explicit, progress=not quiet,
                            echo=None if quiet else click.echo, resume=resume)
    except SearchInterrupted as stop:
        click.echo(f"\ninterrupted; continue with: prunekit resume {stop.run_dir}", err=True)
        raise SystemExit(130) from None
    click.echo(f"genotype: {result['genotype']}")
    click.echo(f"report: {Path(result['run_dir']) / 'report.md'}")
