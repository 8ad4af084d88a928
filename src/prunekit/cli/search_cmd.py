"""`prunekit search RECIPE.yaml [key=value ...]`: a PR-DARTS search and its evaluation.

The recipe has the sections of `prunekit.methods.prdarts.run.SearchRecipe` (data, search,
evaluate, device, threads); dotted overrides such as `search.pretrain_epochs=2` apply on top.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import ConfigError


@click.command("search")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create (default: runs/search-<timestamp>); must be new or empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or phase lines; only the final genotype.")
def search_cmd(recipe: str, overrides: tuple[str, ...], out: str | None, quiet: bool) -> None:
    """Search a sparse DARTS cell (PR-DARTS) and evaluate it; writes genotypes, alpha plots, report.

    A search recipe has the sections data, search (PRDartsConfig), evaluate (the derived
    network's training) and the keys device, threads, limit_eval_batches; KEY=VALUE overrides
    set any field, read as YAML.

    \b
    prunekit search recipes/prdarts_cifar10_cpu_smoke.yaml
    prunekit search recipes/prdarts_cifar10_cpu_smoke.yaml search.seed=1 evaluate.enabled=false
    prunekit search recipes/prdarts_cifar10.yaml device=cuda --out runs/dass
    """
    from ..methods.prdarts.run import SearchRecipe, run_search
    from .overrides import apply_overrides, load_yaml_file
    from .rundir import choose_run_dir

    raw = load_yaml_file(recipe)
    if not isinstance(raw, dict):
        raise ConfigError(f"{recipe}: a search recipe is a mapping with data, search, evaluate sections")
    raw = apply_overrides(raw, overrides, allowed_top=("data", "search", "evaluate", "device", "threads", "limit_eval_batches"))
    parsed = SearchRecipe.from_dict(raw)
    result = run_search(parsed, choose_run_dir("search", Path("runs"), out), explicit=out is not None,
                        progress=not quiet, echo=None if quiet else click.echo)
    click.echo(f"genotype: {result['genotype']}")
    click.echo(f"report: {Path(result['run_dir']) / 'report.md'}")
