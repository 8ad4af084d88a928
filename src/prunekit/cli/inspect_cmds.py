"""Commands that look without training: eval, bench, report, info. They write no run directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..core.environment import check_input_fits
from ..core.errors import ConfigError, PrunekitError

_TOPICS = ("models", "datasets", "methods", "criteria", "recipes", "recipe")
# Descriptions for registered items whose code carries no docstring.
_NOTES = {"l1": "L1 norm of every weight slice of a channel, over the whole group (group-level)",
          "l2": "L2 norm of every weight slice of a channel, over the whole group (group-level)",
          "random": "seeded random scores (a baseline)",
          "magnitude": "score channel groups with a criterion, remove the lowest physically (one-shot or iterative)"}

_PREFIX_NOTES = {"evolved": "an evolved function written as text, e.g. evolved:div(var(P), rho5(var(Q))) "
                            "(prunekit evolve writes them; needs labelled data)"}


@click.command("eval")
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE]...")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Weights to evaluate (default: the run directory's pruned, else dense, model).")
@click.option("--split", type=click.Choice(["test", "val"]), default=None, help="Split to score (default: eval.split).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(args, weights, split, as_json) -> None:
    """Accuracy, loss, params and MACs of saved weights on a data split.

    \b
    prunekit eval runs/digits-small_cnn-20250101-120000
    prunekit eval my.yaml --weights pruned.safetensors --split val
    """
    from ..engine import evaluate
    from .commands import resolve
    from .pipeline import prepare

    recipe, weights = resolve(args, "eval", weights)
    if weights is None and recipe.init is None:
        raise ConfigError("`prunekit eval` needs weights: a run directory, --weights PATH or init=PATH")
    if split is not None:
        recipe.eval.split = split
        recipe.eval.validate()
        if split == "val" and recipe.data.val_fraction == 0:
            raise ConfigError("--split val needs data.val_fraction > 0")
    job = prepare(recipe, weights, progress=False, echo=lambda s: None, times=False)
    split = recipe.eval.split
    scores = evaluate(job.model, job.loader(split))
    cost = job.cost()
    out = {"weights": job.weights, "split": split, "accuracy": scores["acc"], "loss": scores["loss"],
           "n": scores["n"], "params": cost.params, "macs": cost.macs}
    if as_json:
        click.echo(json.dumps(out))
        return
    from ..report.tables import fmt_count

    click.echo(f"{split} accuracy {scores['acc']:.4f} ({scores['n']} images), loss {scores['loss']:.4f}; "
               f"params {fmt_count(cost.params)}, MACs {fmt_count(cost.macs)} ({job.weights})")


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(f"--input-shape {text!r} is invalid; give the per-sample shape, e.g. 3,32,32")
    check_input_fits((1, *shape), f"--input-shape {text}")
    return shape


def built_model(recipe: Any, weights: str | None, input_shape: str | None) -> tuple[Any, tuple[int, ...]]:
    """The recipe's model with `weights` loaded (a pruned file rebuilds the pruned architecture)
    and the per-sample input shape: --input-shape, else the one the plan recorded, else the model's."""
    from ..models import create_model, get_model_spec
    from .pipeline import load_weights

    spec = get_model_spec(recipe.model.name)
    shape = _parse_shape(input_shape)
    model = create_model(recipe.model.name, recipe.model.num_classes or spec.num_classes, **recipe.model.kwargs)
    plan = None
    if weights is not None:
        model, plan = load_weights(model, weights)
    if shape is None:
        shape = tuple(plan.input_shapes[0][1:]) if plan is not None and plan.input_shapes else tuple(spec.input_shape)
    return model, shape


@click.command("bench")
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE]...")
@click.option("--model", "model_name", default=None, help="Benchmark this model (e.g. resnet56, tv:resnet50).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Saved weights (a pruned file rebuilds the pruned architecture).")
@click.option("--input-shape", default=None, help="Per-sample input shape, e.g. 3,32,32 (default: the model's).")
@click.option("--latency/--no-latency", default=True, help="Time the forward pass (bench section settings).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(args, model_name, weights, input_shape, latency, as_json) -> None:
    """Parameters, MACs and latency of a model or of a saved (pruned) model. Loads no data.

    \b
    prunekit bench --model resnet56
    prunekit bench runs/digits-small_cnn-20250101-120000
    prunekit bench --model resnet20 bench.batch_size=32 bench.repeats=100
    """
    import torch

    from ..cost.latency import measure_latency
    from ..cost.macs import CONVENTION, count_cost
    from ..cost.memory_format import timed_as_it_runs
    from ..report.tables import fmt_count, fmt_int
    from ..surgery.masks import bake_masks_
    from .commands import resolve

    # --model resets the recipe's model section before the user's overrides, which may set its kwargs.
    reset = ("model.kwargs={}", "model.num_classes=null") if model_name else ()
    named = (f"model.name={model_name}",) if model_name else ()
    try:
        recipe, weights = resolve(reset + tuple(args) + named, "bench", weights)
    except ConfigError as err:  # show --model as given, not the overrides it stands for
        msg = str(err)
        for part in reset:
            msg = msg.replace(f"{part}, ", "")
        raise ConfigError(msg.replace(f"model.name={model_name}", f"--model {model_name}")) from None
    model, shape = built_model(recipe, weights, input_shape)
    example = torch.zeros(1, *shape)
    try:
        cost = count_cost(model, example)
    except PrunekitError as err:
        if input_shape is None:
            raise
        text = str(err)
        first = text.split(". Pass example inputs")[0] if ". Pass example inputs" in text else text
        raise ConfigError(f"--input-shape {input_shape}: {first}; give the per-sample shape {recipe.model.name} "
                          f"takes, without the batch (e.g. --input-shape 3,32,32)") from None
    out = {"model": recipe.model.name, "weights": weights, "input_shape": list(shape), "params": cost.params,
           "macs": cost.macs, "convention": CONVENTION}
    if latency:  # time the exported model: masks baked, no per-forward mask multiply
        out["latency"] = measure_latency(bake_masks_(model), shape, timed_as_it_runs(model, recipe.bench)).to_dict()
        out["latency"].pop("times_ms", None)
    if as_json:
        click.echo(json.dumps(out))
        return
    rows = [("model", recipe.model.name + (f" ({weights})" if weights else "")),
            ("input", "x".join(map(str, shape)) + " per sample"),
            ("params", f"{fmt_count(cost.params)} ({fmt_int(cost.params)})"),
            ("MACs", f"{fmt_count(cost.macs)} ({fmt_int(cost.macs)}) per sample")]
    if latency:
        lat = out["latency"]
        rows.append(("latency", f"{lat['median_ms']:.3f} ms median (p10 {lat['p10_ms']:.3f}, p90 {lat['p90_ms']:.3f}; "
                                f"{lat['n']} repeats; {lat['device']} {lat['device_name']}, {lat['dtype']}, "
                                f"batch {lat['batch']}, {_layout_and_threads(lat)})"))
    rows.append(("counting", CONVENTION))
    for key, value in rows:
        click.echo(f"{key:<9}{value}")


def _layout_and_threads(lat: dict) -> str:
    """'channels-last, 1 thread' from a latency record's settings (the layout the model was timed in)."""
    settings = lat.get("settings") or {}
    layout = "channels-last" if settings.get("channels_last") else "contiguous"
    threads = settings.get("threads_used") or settings.get("threads")
    return str(layout).replace("_", "-") + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir) -> None:
    """Re-render report.md, report.html and the plots of a run directory from its result.json."""
    from ..report import write_report

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; pass a run directory written by prunekit")
    if (path / "compare.json").is_file() and not (path / "result.json").is_file():
        raise ConfigError(f"{path} is a comparison folder: rewrite its report with `prunekit compare <recipe> --out "
                          f"{path} --report-only`")
    if not (path / "result.json").is_file():
        raise ConfigError(f"{path} has no result.json; pass a run directory written by prunekit")
    if (path / "recipe.json").is_file() and (path / "genotype.json").is_file():  # a `prunekit search` run
        from ..methods.prdarts.run import rewrite_search_report

        for p in rewrite_search_report(path):
            click.echo(str(p))
        return
    paths = write_report(path)
    for p in [paths.markdown, paths.html, *paths.plots]:
        click.echo(str(p))


@click.command("info")
@click.argument("topic", required=False, type=click.Choice(_TOPICS))
def info(topic) -> None:
    """List models, datasets, methods, importance criteria and the recipes in ./recipes; `info recipe`
    prints the default recipe."""
    if topic == "recipe":
        from .recipe import default_recipe_text

        click.echo(default_recipe_text(), nl=False)
        return
    for name in _TOPICS[:-1] if topic is None else (topic,):
        click.echo(f"{name}:")
        for line in _topic_lines(name):
            click.echo(f"  {line}")


def _topic_lines(topic: str) -> list[str]:
    if topic == "models":
        from ..models import MODELS

        lines = [f"{n:<24}{MODELS.get(n).description}" for n in MODELS.list()]
        return lines + ["tv:<name>               any torchvision classifier (when torchvision imports)",
                        "timm:<name>             any timm model (when timm imports)"]
    if topic == "datasets":
        from ..data import DATASETS

        return [f"{n:<24}{DATASETS.get(n).description}" for n in DATASETS.list()]
    if topic == "methods":
        from ..methods import METHODS
        from .recipe import ALIASES

        lines = []
        for n in METHODS.list():
            config_cls = METHODS.get(n)[0]
            lines.append(f"{n:<24}{config_cls.__name__}: {_NOTES.get(n) or _first_doc_line(config_cls)}")
        for alias, (target, fixed) in ALIASES.items():
            if target in METHODS:
                lines.append(f"{alias:<24}= {target} with " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
        return lines
    if topic == "recipes":
        return _recipe_lines(Path("recipes"))
    from ..importance.criteria import CRITERIA, CRITERION_FACTORIES

    lines = [f"{n:<24}{_NOTES.get(n) or _first_doc_line(CRITERIA.get(n))}" for n in CRITERIA.list()]
    return lines + [f"{p + ':<text>':<24}{_PREFIX_NOTES.get(p, 'built from the text by a registered factory')}"
                    for p in CRITERION_FACTORIES.list()]


def _recipe_lines(folder: Path) -> list[str]:
    """One line per recipes/*.yaml: its path and the first sentence of its leading comment."""
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        return [f"(no {folder}/ folder with .yaml recipes here; run from the repository root)"]
    lines = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")  # a file in another encoding is still listed
        lines.append(f"{str(f):<44}{_first_sentence(text)}")
    return lines


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of the comment block opening `text` (cut at `limit`, saying so)."""
    block = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        block.append(ln.lstrip("# ").strip())
    words = " ".join(w for w in block if w)
    end = words.find(". ")
    first = words if end < 0 else words[:end + 1]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _first_doc_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    name = getattr(obj, "__name__", "")
    if not doc or (name and doc.startswith(name + "(")):  # a dataclass's generated signature
        return ""
    return doc.splitlines()[0].strip()
