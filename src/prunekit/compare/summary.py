"""Turn arm records into the comparison's table, Pareto front, plot and markdown report.

Spread is the sample standard deviation over seeds (n given); one seed shows no spread. Accuracies
are shown in percent to two decimals, the precision at which seeds and arms differ.
An arm is on the Pareto front when no other arm has at most its MACs and at least its mean
accuracy, one of the two strictly. The front is listed by rising MACs.

>>> pareto_front({"a": (100.0, 0.9), "b": (50.0, 0.9), "c": (40.0, 0.8)})
['c', 'b']
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from ..report.plots import plot_pareto
from ..report.tables import fmt_count, markdown_table, md_escape

SUMMED = ("acc", "val_acc", "pruned_acc", "macs", "params", "macs_fraction", "params_fraction", "nonzero_fraction")


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """{mean, std, n} over the values that are not None (std None for fewer than two)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """arm -> {metric: stats} over its seeds, plus latency median and speed-up stats."""
    out = {}
    for arm, recs in records.items():
        if not recs:
            continue
        row = {k: stats([r.get(k) for r in recs]) for k in SUMMED}
        lat = [r["latency"] for r in recs if r.get("latency")]
        row["latency_ms"] = stats([x["median_ms"] for x in lat])
        row["dense_ms"] = stats([x.get("dense_median_ms") for x in lat])  # timed beside it: the speed-up's base
        row["speedup"] = stats([x.get("speedup") for x in lat])
        row["seeds"] = sorted(r["seed"] for r in recs)
        row["method_epochs"] = recs[0]["method_epochs"]
        row["finetune_epochs"] = recs[0]["finetune_epochs"]
        out[arm] = row
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (MACs, accuracy) that no other point dominates, by rising MACs."""
    front = []
    for name, (macs, acc) in points.items():
        dominated = any((m <= macs and a >= acc) and (m < macs or a > acc)
                        for other, (m, a) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if s.get("mean") is None:
        return "-"
    spread = f" ± {scale * s['std']:.{digits}f}" if s.get("std") is not None else ""
    return f"{scale * s['mean']:.{digits}f}{spread}"


def table_rows(summary: dict[str, dict[str, Any]], front: list[str]) -> list[list[str]]:
    rows = []
    for arm, s in summary.items():
        speed = s["speedup"]
        rows.append([arm + (" *" if arm in front else ""), _pm(s["acc"], digits=2), _pm(s["pruned_acc"], digits=2),
                     fmt_count(s["macs"]["mean"]), _pm(s["macs_fraction"], digits=1),
                     fmt_count(s["params"]["mean"]), _pm(s["nonzero_fraction"], digits=1),
                     "-" if s["latency_ms"]["mean"] is None else f"{s['latency_ms']['mean']:.2f}",
                     "-" if s["dense_ms"]["mean"] is None else f"{s['dense_ms']['mean']:.2f}",
                     "-" if speed["mean"] is None else f"{_pm(speed, 1.0, 2)}x",
                     f"{s['method_epochs']} + {s['finetune_epochs']}", str(s["acc"]["n"])])
    return rows


HEADERS = ["arm (* Pareto)", "acc %", "acc after prune %", "MACs", "MACs kept %", "params", "non-zero weights %",
           "latency ms", "dense ms (same run)", "speed-up", "epochs (method + fine-tune)", "seeds"]


def write_outputs(out_dir: Path, summary: dict[str, dict[str, Any]], context: dict[str, Any],
                  notes: list[str]) -> dict[str, Path | None]:
    """compare.md (table, plot, context, notes) and accuracy_vs_macs.png in `out_dir`."""
    points = {a: (s["macs"]["mean"], s["acc"]["mean"]) for a, s in summary.items() if s["acc"]["mean"] is not None}
    front = pareto_front(points)
    plot = plot_pareto(out_dir / "accuracy_vs_macs.png",
                       {a: (s["macs"]["mean"], s["acc"]["mean"], s["acc"]["std"]) for a, s in summary.items()
                        if a in points}, front, title=context.get("title"))
    # arm, model and recipe names are the user's: escaped like the table's cells
    lines = [f"# {md_escape(context.get('title', 'comparison'))}", "", md_escape(context["setting"]), "",
             markdown_table(HEADERS, table_rows(summary, front)), "",
             "acc: accuracy on the " + context["split"] + " split after fine-tuning, mean ± sample std over seeds; "
             "acc after prune: before any fine-tuning (for methods that train, after their own training). "
             "MACs and params: prunekit's counter (" + context["convention"] + "). Non-zero weights: share of "
             "the dense model's non-zero parameters (irregular and N:M sparsity lower it without lowering MACs). "
             "Latency: median forward time, " + context["latency"] + "; speed-up over the dense model timed "
             "interleaved in the same measurement (its time: dense ms, same run; on a busy machine it can differ "
             "from the dense row's own measurement). * marks the Pareto front of mean accuracy vs mean MACs.", ""]
    if plot is not None:
        lines += [f"![accuracy vs MACs]({plot.name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {md_escape(n)}" for n in notes] + [""]
    (out_dir / "compare.md").write_text("\n".join(lines), encoding="utf-8")
    return {"report": out_dir / "compare.md", "plot": plot, "front": front}
