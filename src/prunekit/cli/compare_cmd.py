"""`prunekit compare RECIPE [KEY=VALUE]...`: several pruning arms on one dense model."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("compare")
@click.argument("args", nargs=-1, metavar="RECIPE [KEY=VALUE]...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <out>/<name> from the recipe). Rerunning into the same folder "
                   "resumes: finished arm x seed records are not run again.")
@click.option("--arms", "only", default=None, help="Comma-separated arms to run now (the report still "
                                                   "includes every finished arm).")
@click.option("--report-only", is_flag=True, help="Run and load nothing (no data, no training); write the "
                                                "table and report from the records already in the output folder.")
@click.option("--dry-run", is_flag=True, help="Check the recipe, print it resolved and stop.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
def compare_cmd(args, out, only, report_only, dry_run, quiet) -> None:
    """Prune one dense model with several methods to one target and compare them.

    Every arm is fine-tuned on the same epoch budget for every seed; the table (accuracy mean
    ± std, MACs, params, latency), the accuracy-vs-MACs plot with its Pareto front, compare.md
    and compare.json go to the output folder. See docs/compare.md.

    \b
    prunekit compare recipes/compare_gator_resnet20.yaml
    prunekit compare recipes/compare_slr_resnet20.yaml seeds=[0] data.limit_train=512 --out runs/smoke
    """
    from ..compare import CompareRecipe, run_compare
    from ..compare.recipe import TOP_KEYS
    from ..core.errors import ConfigError
    from .overrides import apply_overrides, load_yaml_file
    from .recipe import split_arguments

    source, overrides = split_arguments(args)
    if source is None:
        raise ConfigError("`prunekit compare` needs a compare recipe (e.g. recipes/compare_gator_resnet20.yaml)")
    raw = load_yaml_file(source)
    if isinstance(raw, dict) and "name" not in raw:
        raw["name"] = Path(source).stem
    recipe = CompareRecipe.from_dict(apply_overrides(raw, overrides, TOP_KEYS), source)
    if dry_run:
        click.echo(json.dumps(recipe.to_dict(), indent=2))
        for line in _dry_run_checks(recipe, out):
            click.echo(line)
        return
    echo = (lambda s: None) if quiet else click.echo
    arms = [a.strip() for a in only.split(",") if a.strip()] if only else None
    try:
        result = run_compare(recipe, out, only=arms, echo=echo, report_only=report_only)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the finished arm x seed records stay in {_folder(recipe, out)}: run the same "
                   "command again to continue from them", err=True)
        raise SystemExit(130) from None
    for note in result.notes:
        echo(f"note: {note}")
    echo(f"report: {result.report}")


def _dry_run_checks(recipe, out) -> list[str]:
    """What a real run would find on disk: the data, the dense model and finished records. A
    missing data folder or archive, dense weights nothing can make, damaged or replaced ones, ones
    trained with other settings, and records the recipe can no longer reuse fail here."""
    from ..compare.run import check_on_disk, dense_paths
    from ..core.errors import ConfigError
    from ..data.imagefolder import existing_root
    from ..models import create_model

    if recipe.data.root is not None:
        existing_root(recipe.data.root)
    create_model(recipe.model_name, None, **recipe.model_kwargs)  # an unknown model or keyword fails as a run would
    folder = _folder(recipe, out)
    weights, _ = dense_paths(recipe, folder)
    lines = [f"output folder: {folder}" + (" (exists: finished records are reused)" if folder.exists() else "")]
    if weights.is_file():
        lines.append(f"dense model: {weights}")
    elif recipe.dense_train is not None:
        lines.append(f"dense model: {weights} is missing; it will be trained ({recipe.dense_train.epochs} epochs)")
    else:
        raise ConfigError(f"dense weights {weights} do not exist and the recipe has no dense.train to make them")
    records = len(list((folder / 'arms').glob('*/seed*.json')))
    if not weights.is_file():
        lines.append(f"records on disk: {records}" + (" (not checked: the dense model they were made from is not "
                                                      "there, and records of other weights are refused)" if records else ""))
    else:
        lines.append(f"records on disk: {records}, {check_on_disk(recipe, folder)} of them reused")
    return lines


def _folder(recipe, out) -> Path:
    """The output folder a run writes into: --out, else <recipe out>/<recipe name>."""
    from ..compare.run import output_folder

    return output_folder(recipe, out)
