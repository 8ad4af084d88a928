"""Run directories: where a command's artefacts go, and the result/report written at the end.

A run directory holds:
    recipe.yaml          the resolved recipe (every default filled in); `prunekit run <dir>` reruns it
    dense.safetensors    the dense model after training, or the final model when nothing was
                         pruned (a state dict, no pickle)
    pruned.safetensors   the final pruned model with its plan and weight masks inside (load with load_pruned)
    plan.json            the same plan as plain JSON
    metrics.jsonl        per-epoch training records, stage markers and evaluations
    result.json          costs, accuracies, per-layer rows and latency (the report's input)
    report.md, report.html, *.png
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.integrity import claim_dir
from .pipeline import Job, measure, save_weights


def choose_run_dir(name: str, parent: str | Path, out: str | Path | None) -> Path:
    """The directory a run will write to; checked now, claimed only by `create_run_dir`.

    Without --out this is `<parent>/<name>-<timestamp>`; a name taken when the run directory is
    created gets a suffix there (`-2`, `-3`, ...).
    """
    if out is not None:
        path = Path(out).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"--out {path} already exists and is not an empty directory; "
                              "choose a new path (prunekit never overwrites a run)")
        _check_folders_above(path, "--out")
        return path
    parent = Path(parent).expanduser()
    _check_folders_above(parent / name, "out")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return parent / f"{name}-{stamp}"


def _check_folders_above(path: Path, what: str) -> None:
    """ConfigError when the nearest existing folder above `path` (or in its place) is a file."""
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"{what} {path}: {above} is a file, not a folder, so the run directory cannot be "
                                  "made there; choose another path")
            return


def create_run_dir(job: Job, path: Path, explicit: bool = False) -> Path:
    """Claim `path` for this run alone and write recipe.yaml into it; returns the directory used.

    Two runs never share a directory, even when started in the same second: the directory is
    made with an exclusive `os.mkdir` (a timestamped name that is taken moves on to `-2`, `-3`,
    ...), and recipe.yaml is created exclusively, so of two runs given the same `--out`
    (`explicit`) exactly one gets it and the other stops with a ConfigError before writing
    anything; a suffix there would put the run where the caller does not look for it.
    """
    recipe = job.recipe
    text = f"# Resolved recipe of this run ({recipe.source}).\n" + recipe.to_yaml()
    path = claim_dir(path, "recipe.yaml", text, explicit)
    job.run_dir = path
    return path


def finish(job: Job, title: str) -> dict[str, Any]:
    """Save the final model, plan, result.json and the report; returns the result dict."""
    from ..report import write_report
    from ..surgery.plan import save_plan

    run_dir = job.run_dir
    files = ["recipe.yaml", "metrics.jsonl"]
    if job.plan is not None:
        save_weights(job, run_dir / "pruned.safetensors")
        save_plan(job.plan, run_dir / "plan.json")
        files += ["pruned.safetensors", "plan.json"]
    else:  # the final dense model (after any fine-tuning)
        save_weights(job, run_dir / "dense.safetensors")
    if (run_dir / "dense.safetensors").exists():
        files.append("dense.safetensors")
    latency = measure(job)
    if latency:
        job.echo(_latency_line(latency))
    result = build_result(job, title, latency)
    result["files"] = files + ["result.json", "report.md", "report.html"]
    _write_json(run_dir / "result.json", result)
    paths = write_report(run_dir, result)
    result["files"] += [p.name for p in paths.plots]
    _write_json(run_dir / "result.json", result)
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, replaced atomically: a crash never leaves half a file there."""
    from ..core.integrity import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def _latency_line(latency: dict[str, Any]) -> str:
    after = latency["after"]
    head = f"latency ({after['device']}, {after['dtype']}, batch {after['batch']}): "
    if "before" in latency:
        from ..cost.latency_results import paired_change

        b = latency["before"]["median_ms"]
        line = head + f"{b:.3f} ms -> {after['median_ms']:.3f} ms median ({b / after['median_ms']:.2f}x"
        change = paired_change(latency["before"].get("times_ms") or [], after.get("times_ms") or [])
        if change["measured"] is False:
            return line + f"; no measurable change: faster in {change['faster_rounds']} of {change['rounds']} " \
                          "interleaved rounds, as noise would be)"
        return line + ")"
    return head + f"{after['median_ms']:.3f} ms median"


def _method_label(job: Job, pruned: bool) -> str:
    """The recipe's method when this run pruned; else "none", naming the method that pruned
    the loaded weights where their plan says (a `prunekit finetune` of a pruned run)."""
    if job.recipe.method and pruned:
        return job.recipe.method.label
    earlier = job.plan.meta.get("method") if job.plan is not None else None
    return f"none (loaded weights pruned by {earlier})" if earlier else "none"


def build_result(job: Job, title: str, latency: dict[str, Any]) -> dict[str, Any]:
    """The report's input (prunekit.report.writer.ReportInput) plus the run's extra records."""
    from ..core.environment import environment
    from ..cost.macs import CONVENTION, count_cost
    from ..surgery.mask_io import weight_sparsity

    evals = job.evaluations
    pruned = [i for i, e in enumerate(evals) if e["step"] == "pruned"]
    if pruned:
        first, no_ft = evals[pruned[0] - 1], evals[pruned[0]]
    else:
        first, no_ft = evals[0], None
    last = evals[-1]
    after_cost = count_cost(job.model, job.example_on_model())
    if job.before_prune is not None:
        before_model = job.before_prune
        before_cost = count_cost(before_model, job.example.to(next(iter(before_model.parameters())).device))
    else:
        before_cost = after_cost
    layer_lat = latency.get("layers", {})
    result: dict[str, Any] = {
        "title": title,
        "method": _method_label(job, bool(pruned)),
        "config": job.recipe.to_dict(),
        "environment": environment(),
        "cost_before": {"params": before_cost.params, "macs": before_cost.macs,
                        "latency": latency.get("before")},
        "cost_after": {"params": after_cost.params, "macs": after_cost.macs, "latency": latency.get("after")},
        "accuracy_before": first["accuracy"],
        "accuracy_after": last["accuracy"],
        "layers": layer_rows(before_cost, after_cost, layer_lat.get("before", {}), layer_lat.get("after", {})),
        "counting_convention": CONVENTION,
        "history": [{k: e.get(k) for k in ("step", "params", "macs", "accuracy", "val_accuracy")} for e in evals],
        "split": job.recipe.eval.split,
        "stage_seconds": job.seconds,
        "prune_metrics": job.prune_metrics,
        "sparsity": weight_sparsity(job.model),  # zeros counted in the final weights
    }
    if no_ft is not None and no_ft is not last:
        result["accuracy_pruned_no_finetune"] = no_ft["accuracy"]
    if job.plan is not None:
        result["plan_groups"] = {n: {"size": job.plan.sizes[n], "kept": len(k)} for n, k in job.plan.groups.items()}
    return result


def layer_rows(before, after, lat_before: dict[str, float], lat_after: dict[str, float]) -> list[dict[str, Any]]:
    """One row per layer with weights and MACs (conv, linear): channels, params and MACs before/after, optional latency."""
    rows = []
    for name, b in before.per_module.items():
        if not b.get("out") or not b.get("macs"):
            continue  # norms (no MACs) and parameter-free products (no channels of their own)
        a = after.per_module.get(name, {})
        row = {"name": name, "channels_before": b["out"], "channels_after": a.get("out"),
               "params_before": b["params"], "params_after": a.get("params"),
               "macs_before": b["macs"], "macs_after": a.get("macs")}
        if name in lat_before or name in lat_after:
            row["latency_ms_before"] = lat_before.get(name)
            row["latency_ms_after"] = lat_after.get(name)
        rows.append(row)
    return rows
