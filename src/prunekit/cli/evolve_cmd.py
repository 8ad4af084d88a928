"""`prunekit evolve RECIPE [KEY=VALUE]...`: evolve pruning functions, write a run directory.

An evolve recipe has two sections: `evolve` fills EvolveConfig (tasks, population, generations,
executor, ...) and `reevaluate` (top, seeds) says how many of the best functions are evaluated
again with fresh seeds next to the seven seed metrics. `--resume DIR` continues a killed search
from its last checkpoint (same recipe).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import ConfigError, PrunekitError

TOP_KEYS = ("name", "evolve", "reevaluate")


def load_evolve_recipe(source: str, overrides: list[str]):
    from ..core.config import check_folder_name, short_repr
    from ..evolve import EvolveConfig
    from .overrides import apply_overrides, load_yaml_file

    if source and Path(source).is_dir():
        raise ConfigError(f"{source} is a directory; give an evolve recipe file, or continue the run in it with "
                          f"prunekit evolve --resume {source}")
    raw = load_yaml_file(source) if source else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an evolve recipe is a mapping with sections {', '.join(TOP_KEYS)}")
    raw = apply_overrides(raw, overrides, TOP_KEYS)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; an evolve recipe has {', '.join(TOP_KEYS)}")
    if not isinstance(raw.get("reevaluate") or {}, dict):
        raise ConfigError(f"reevaluate={short_repr(raw.get('reevaluate'))} must be a mapping, e.g. {{top: 3, seeds: 3}}")
    reeval = {"top": 3, "seeds": 3, **(raw.get("reevaluate") or {})}
    if set(reeval) - {"top", "seeds"} or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in reeval.values()):
        raise ConfigError("reevaluate takes top and seeds, integers >= 0 (seeds 0 skips re-evaluation)")
    try:
        cfg = EvolveConfig.from_dict(raw.get("evolve") or {})
    except ConfigError as err:
        raise ConfigError(f"{source or 'recipe'}: evolve: {err}") from None
    name = raw.get("name")
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)  # `name: 2024` in YAML is a number
    if name:
        check_folder_name("name", name)
    else:  # from the recipe's file name, which may hold anything a file name may
        name = (Path(source).stem.strip() if source else "") or "evolve"
    return cfg, reeval, name, raw


@click.command("evolve")
@click.argument("args", nargs=-1, metavar="RECIPE [KEY=VALUE]...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<name>-<timestamp>); must be new or empty.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the search in this run directory from its last generation.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
def evolve_cmd(args, out, resume_dir, quiet) -> None:
    """Evolve channel-scoring functions by genetic programming; report the best as text and formula.

    \b
    prunekit evolve recipes/evolve_digits_cifar.yaml
    prunekit evolve recipes/evolve_digits_cifar.yaml evolve.generations=2 evolve.executor=ray
    prunekit evolve recipes/evolve_digits_cifar.yaml --resume runs/evolve_digits_cifar-20250101-120000
    """
    from ..core.integrity import claim_dir, hold_dir
    from ..evolve.report import best_criteria, comparison_set, counted, reevaluate, write_run
    from ..evolve.search import check_tasks, run_search
    from .overrides import dump_yaml
    from .recipe import split_arguments
    from .rundir import choose_run_dir

    source, overrides = split_arguments(args)
    if resume_dir is not None and out is not None:
        raise ConfigError(f"--out {out} and --resume {resume_dir} name two run directories; --resume continues the "
                          "search in its own directory (drop --out), --out starts a new one (drop --resume)")
    if resume_dir is not None:
        _check_evolve_run(Path(resume_dir))  # before anything else: the directory is what was asked about
    if source is None and resume_dir is not None and (Path(resume_dir) / "recipe.yaml").is_file():
        source = str(Path(resume_dir) / "recipe.yaml")
    if source is None:
        raise ConfigError("give an evolve recipe, e.g. prunekit evolve recipes/evolve_digits_cifar.yaml")
    cfg, reeval, name, raw = load_evolve_recipe(source, overrides)
    if resume_dir is not None:
        _check_same_search(Path(resume_dir), cfg, reeval)
    check_tasks(cfg)  # a model, data path or weights file that cannot be used fails before any work
    echo = (lambda s: None) if quiet else click.echo
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    else:
        run_dir = claim_dir(choose_run_dir(name, "runs", out), "recipe.yaml",
                            dump_yaml({"name": name, "evolve": cfg.to_dict(), "reevaluate": reeval}), out is not None)
    with hold_dir(run_dir, "evolution"):  # also through the re-evaluation and the report
        echo(f"run directory: {run_dir}")
        try:
            state = run_search(cfg, run_dir, resume=resume_dir is not None, progress=not quiet, echo=echo)
            rows = []
            if reeval["seeds"] > 0:
                echo(f"re-evaluating the best {counted(reeval['top'], 'function')} and the 7 seeds with "
                     f"{counted(reeval['seeds'], 'fresh seed')}")
                rows = reevaluate(cfg, run_dir, comparison_set(state, reeval["top"]), reeval["seeds"], progress=not quiet)
        except PrunekitError:
            if resume_dir is None:
                _remove_if_unused(run_dir)
            raise
        except KeyboardInterrupt:  # the search checkpoints every generation
            click.echo(f"\ninterrupted; continue with: prunekit evolve --resume {run_dir}", err=True)
            raise SystemExit(130) from None
        report = write_run(run_dir, cfg, state, rows)
        best = (run_dir / 'best.txt').read_text().strip()
        echo(f"best: {best}")
        echo(f"as a criterion: {best_criteria(cfg, best).replace('`', '')}")
        echo(str(report))


def _check_evolve_run(run_dir: Path) -> None:
    """ConfigError unless `run_dir` is an evolve run directory (its recipe.yaml has an evolve
    section): resuming must never write into another tool's or method's directory."""
    from .overrides import load_yaml_file

    recipe = run_dir / "recipe.yaml"
    raw = load_yaml_file(str(recipe)) if recipe.is_file() else None
    if not isinstance(raw, dict) or "evolve" not in raw:
        raise ConfigError(f"--resume {run_dir}: not an evolve run directory (no recipe.yaml with an 'evolve' "
                          "section); nothing was written there. Start a new run with --out")


def _check_same_search(run_dir: Path, cfg, reeval: dict) -> None:
    """ConfigError when the recipe and overrides given with --resume change what the search
    recorded in run_dir/recipe.yaml searches or re-evaluates: the run directory would then hold a
    search its recipe does not describe. Where and how jobs run (executor, workers, ...) may change."""
    recorded, recorded_reeval, _, _ = load_evolve_recipe(str(run_dir / "recipe.yaml"), [])
    was, now = recorded.search_dict(), cfg.search_dict()
    changed = sorted(f"evolve.{k}" for k in was if was[k] != now.get(k))
    changed += sorted(f"reevaluate.{k}" for k in recorded_reeval if recorded_reeval[k] != reeval.get(k))
    if changed:
        raise ConfigError(f"--resume {run_dir}: the settings given change {', '.join(changed)} from the search its "
                          "recipe.yaml records; a resumed search keeps them (only executor, workers, ray_address, "
                          "num_cpus, num_gpus, device and threads_per_job may change); start a new run for other settings")


def _remove_if_unused(run_dir: Path) -> None:
    """Take back a new run directory that holds only its recipe: a task that fails to load (data,
    dense weights) leaves nothing behind. Anything else (dense models, checkpoints) stays."""
    if sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml"]:
        (run_dir / "recipe.yaml").unlink()
        run_dir.rmdir()
