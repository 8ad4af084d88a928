"""`prunekit export`: a run's (pruned) model as ONNX, a torch.export program or TorchScript, checked."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.environment import check_input_fits
from ..core.errors import ConfigError
from ..export import FORMATS


@click.command("export")
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE]...")
@click.option("--to", "out", required=True, type=click.Path(dir_okay=False),
              help="File to write: .onnx, .pt2 or .ts (the format follows the suffix unless --format is given).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None, help="Export format.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Weights to export (default: the run directory's pruned, else dense, model).")
@click.option("--input-shape", default=None, help="Per-sample input shape, e.g. 3,32,32 (default: the plan's or "
                                                  "the model's).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch of the example the export is traced and checked with.")
@click.option("--static-batch", is_flag=True, help="Fix the batch size to --batch (default: any batch size).")
@click.option("--no-check", is_flag=True, help="Skip running the exported model against the original.")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_cmd(args, out, fmt, weights, input_shape, batch, static_batch, no_check, force, as_json) -> None:
    """Export saved weights for deployment, masks baked in, and check the export computes the same outputs.

    \b
    prunekit export runs/digits-small_cnn-20250101-120000 --to model.onnx     (pip install "prunekit[export]")
    prunekit export runs/<run> --to model.pt2           torch.export program (torch.export.load)
    prunekit export my.yaml --weights pruned.safetensors --to model.ts --static-batch
    """
    import torch

    from ..cost.macs import count_cost
    from ..export import export_model
    from ..report.tables import fmt_count
    from .commands import resolve
    from .inspect_cmds import built_model

    recipe, weights = resolve(tuple(args), "export", weights)
    if weights is None and recipe.init is None:
        raise ConfigError("`prunekit export` needs weights: a run directory, --weights PATH or init=PATH")
    _check_not_a_source(out, weights or recipe.init, [a for a in args if Path(a).is_dir()])
    model, shape = built_model(recipe, weights or recipe.init, input_shape)
    check_input_fits((batch, *shape), f"--batch {batch} with input shape {','.join(map(str, shape))}")
    example = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    _check_shape(model, example, shape)
    # SIGTERM (cli.main.Terminated) unwinds through export_model, which removes its staging folder
    result = export_model(model, example, out, format=fmt, dynamic_batch=not static_batch, check=not no_check,
                          overwrite=force)
    cost = count_cost(model, example[:1])
    summary = {**result.to_dict(), "weights": weights or recipe.init, "input_shape": list(shape),
               "params": cost.params, "macs": cost.macs}
    if as_json:
        click.echo(json.dumps(summary))
        return
    checked = ("not checked (--no-check)" if result.max_abs_diff is None else
               f"checked at batch {', '.join(map(str, result.checked_batches))}: outputs within "
               f"{result.max_abs_diff:.2g} of the model's")
    click.echo(f"wrote {result.path} ({result.format}, {result.bytes / 1e6:.2f} MB; "
               f"{'any batch size' if result.dynamic_batch else f'batch {batch} only'}; {checked})")
    click.echo(f"model   {recipe.model.name}, params {fmt_count(cost.params)}, MACs {fmt_count(cost.macs)} per sample, "
               f"input {'x'.join(map(str, shape))} per sample")


def _check_shape(model, example, shape) -> None:
    """One ConfigError naming --input-shape when the model cannot take inputs of that shape."""
    from ..export import check_runs

    try:
        check_runs(model.eval(), (example[:1],))
    except ConfigError as err:
        raise ConfigError(f"the model cannot take inputs of per-sample shape {','.join(map(str, shape))}; give "
                          f"--input-shape to match, e.g. 3,32,32 for a CIFAR model ({err})") from None


def _check_not_a_source(out: str, weights: str, run_dirs: list[str]) -> None:
    """ConfigError when --to names the weights being exported or a file a run directory given
    keeps (its recipe, weights, plan, results, state, logs and reports, and anything under ckpt/,
    which a resume reads): with --force the export would replace it (a run whose
    pruned.safetensors became an ONNX file can no longer be evaluated, benched or exported). An
    earlier export in the run directory may be replaced."""
    target = Path(out).expanduser().resolve()
    if weights and target == Path(weights).expanduser().resolve():
        raise ConfigError(f"--to {out} is the weights being exported; write the export to another path")
    for run_dir in run_dirs:
        root = Path(run_dir).expanduser().resolve()
        inside = target.parent == root and target.suffix in RUN_SUFFIXES
        if inside or root / "ckpt" in target.parents:
            raise ConfigError(f"--to {out} is a file of the run being exported, which it keeps; write the export "
                              "to another path (the run's files stay as they are)")


# what a run directory keeps at its top level (exports are .onnx, .pt2, .ts or other names)
RUN_SUFFIXES = {".safetensors", ".json", ".jsonl", ".yaml", ".md", ".html", ".png"}
