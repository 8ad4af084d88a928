"""Graph-building and pruning speed of prunekit next to Torch-Pruning, measured in one run.

For each model (torchvision resnet50 first, then a spread of zoo architectures), batch 1,
224x224, float32, on the CPU, each timed step starts from a fresh copy of the same randomly
initialised model (the copy is made outside the timed region) and is repeated N times:

    pk_graph        prunekit.graph.build_graph(model, x)
    pk_prune        prunekit.methods.prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=False), x)
    pk_prune_probe  the same with probe=True (every group is first checked on the real model)
    tp_graph        torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)
    tp_groups       the same, then list(graph.get_all_groups()): the channel groups, which prunekit's
                    graph holds already (Torch-Pruning finds them when a pruner steps)
    tp_prune        torch_pruning.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=2),
                    pruning_ratio=0.5, ignored_layers=[classifier]).step()

Both pruners use L2 magnitude, local (per-group) ratios, 50% of the channels, classifier kept.
`prune_` also counts parameters/MACs before and after (from its graph) and records a replayable
plan; Torch-Pruning's step does neither. After each pruning the model must run and give the
original output shape; that, with the parameter count left, is reported per tool (coverage).
Medians with min/max over the repeats; ratios are prunekit/Torch-Pruning medians (< 1: prunekit
is faster).

    pip install -e .[bench]                      # torch-pruning==1.6.0
    python benchmarks/prune_speed.py             # default models and repeats
    python benchmarks/prune_speed.py --repeats 3 --models resnet50 mobilenet_v2
Writes benchmarks/results/prune_speed.json and docs/prune_speed.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOOLS = ROOT.parent / "shared" / "tools"
if SHARED_TOOLS.exists():
    sys.path.insert(0, str(SHARED_TOOLS))
    import torchvision_cpu  # noqa: F401

import torch_pruning as tp  # noqa: E402
import torchvision  # noqa: E402
import torchvision.models as tvm  # noqa: E402

from prunekit.core.environment import environment  # noqa: E402
from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.graph import build_graph  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402

DEFAULT_MODELS = ["resnet50", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                  "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121", "regnet_y_400mf", "resnext50_32x4d",
                  "googlenet", "convnext_tiny", "vit_b_16", "swin_t"]
STEPS = ("pk_graph", "pk_prune", "pk_prune_probe", "tp_graph", "tp_groups", "tp_prune")
PRUNING_STEPS = ("pk_prune", "pk_prune_probe", "tp_prune")


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear/Conv2d in definition order: the classifier of every torchvision model."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def _pk_graph(model, x):
    build_graph(model, x)


def _pk_prune(model, x):
    prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=False), x)


def _pk_prune_probe(model, x):
    prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=True), x)


def _tp_graph(model, x):
    tp.DependencyGraph().build_dependency(model, example_inputs=x)


def _tp_groups(model, x):
    list(tp.DependencyGraph().build_dependency(model, example_inputs=x).get_all_groups())


def _tp_prune(model, x):
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[classifier_of(model)])
    pruner.step()


RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "pk_graph": _pk_graph, "pk_prune": _pk_prune, "pk_prune_probe": _pk_prune_probe,
    "tp_graph": _tp_graph, "tp_groups": _tp_groups, "tp_prune": _tp_prune}


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(name: str, steps: tuple[str, ...], repeats: int, side: int) -> dict[str, Any]:
    torch.manual_seed(0)
    template = tvm.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, side, side)
    ref = _output(template, x)
    row: dict[str, Any] = {"model": name, "input": list(x.shape), "params": _params(template),
                           "macs": count_cost(template, x).macs, "steps": {}}
    for step in steps:
        times, info = [], {}
        for _ in range(repeats):
            model = copy.deepcopy(template)  # a fresh model, outside the timed region
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    RUNNERS[step](model, x)
            except Exception as err:  # a tool that cannot handle the model: record and move on
                info = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}",
                        "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]}
                break
            times.append(time.perf_counter() - t0)
        if times:
            info.update({"times": [round(t, 4) for t in times], "median": statistics.median(times),
                         "min": min(times), "max": max(times)})
            if step in PRUNING_STEPS and "ok" not in info:
                info.update(_check_pruned(model, x, ref, row["params"]))
            info.setdefault("ok", True)
        row["steps"][step] = info
        status = f"{info['median']:.3f}s" if times else "FAILED " + info["error"][:100]
        print(f"  {name:22s} {step:15s} {status}" + ("" if info.get("ok", False) or not times
                                                     else "  (pruned model broken: " + info.get("error", "") + ")"),
              flush=True)
    for pk, tpk in (("pk_graph", "tp_graph"), ("pk_graph", "tp_groups"), ("pk_prune", "tp_prune"),
                    ("pk_prune_probe", "tp_prune")):
        a, b = row["steps"].get(pk, {}), row["steps"].get(tpk, {})
        if "median" in a and "median" in b:
            row[f"ratio_{pk}_vs_{tpk}"] = a["median"] / b["median"]
    return row


def _check_pruned(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, params_before: int) -> dict[str, Any]:
    """Does the pruned model run, keep the output shape and have fewer parameters?"""
    try:
        out = _output(model, x)
    except Exception as err:
        return {"ok": False, "error": f"forward fails after pruning: {type(err).__name__}: {str(err)[:200]}"}
    params = _params(model)
    info: dict[str, Any] = {"params_after": params, "output_shape_kept": tuple(out.shape) == tuple(ref.shape),
                            "finite": bool(torch.isfinite(out).all())}
    try:
        info["macs_after"] = count_cost(model, x).macs
    except Exception as err:  # counting is a courtesy; a model prunekit cannot trace still counts as pruned
        info["macs_after_error"] = f"{type(err).__name__}: {str(err)[:120]}"
    info["ok"] = info["output_shape_kept"] and info["finite"] and params < params_before
    if not info["ok"]:
        info["error"] = ("output shape changed" if not info["output_shape_kept"] else
                         "non-finite output" if not info["finite"] else "no parameter removed")
    return info


def warm_up() -> None:
    """First calls pay for imports and lazily built tables; do them once before timing."""
    model = tvm.get_model("resnet18", weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    for step in STEPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            RUNNERS[step](copy.deepcopy(model), x)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier on a shared CPU)")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite docs/prune_speed.md from the saved JSON")
    ap.add_argument("--memory-gb", type=float, default=16, help="address-space cap for this process")
    args = ap.parse_args(argv)
    if args.markdown_only:
        out = json.loads((ROOT / "benchmarks" / "results" / "prune_speed.json").read_text())
        _write_doc(markdown(out))
        return out
    torch.set_num_threads(args.threads)
    _cap_memory(args.memory_gb)
    load_before = os.getloadavg()  # other processes on the machine move the timings; say how busy it was
    started = time.perf_counter()
    warm_up()
    rows: list[dict[str, Any]] = []
    env = environment(ROOT)
    for name in args.models:
        print(name, flush=True)
        try:
            rows.append(measure(name, STEPS, args.repeats, args.side))
        except Exception as err:  # the model itself failed to build or run
            rows.append({"model": name, "error": f"{type(err).__name__}: {str(err)[:300]}", "steps": {}})
        out = _write(args, env, rows, started, load_before)  # after every model: an interrupted run keeps its rows
    return out


def _cap_memory(gb: float) -> None:
    """A tool that runs away with memory gets an allocation error for that model, not the whole
    run killed by the kernel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gb * 2**30)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _write(args, env, rows, started, load_before) -> dict[str, Any]:
    out = {"environment": env, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "torch_pruning": _tp_version(), "threads": args.threads,
           "repeats": args.repeats, "input": [1, 3, args.side, args.side], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "wall_seconds": round(time.perf_counter() - started, 1),
           "load_average_1_5_15min": {"start": [round(v, 2) for v in load_before],
                                      "end": [round(v, 2) for v in os.getloadavg()]}, "rows": rows}
    if not args.no_write:
        (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "benchmarks" / "results" / "prune_speed.json").write_text(json.dumps(out, indent=1))
        (ROOT / "docs").mkdir(exist_ok=True)
        _write_doc(markdown(out))
    return out


def _tp_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return "unknown"


def _load(out: dict, when: str) -> str:
    values = out.get("load_average_1_5_15min", {}).get(when)
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _cell(step: dict) -> str:
    if "median" not in step:
        return "fails"
    text = f"{step['median']:.2f} ({step['min']:.2f}-{step['max']:.2f})"
    return text if step.get("ok", True) else text + " broken"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def _coverage(step: dict) -> str:
    if "median" not in step:
        return "no: " + step.get("error", "?")[:80].replace("|", "/")
    if not step.get("ok"):
        return "no: " + step.get("error", "?")[:80].replace("|", "/")
    return "yes"


KEPT_SECTION = "## Probing only what the rules cannot prove"  # hand-written; kept when the doc is rewritten


def _write_doc(text: str) -> None:
    doc = ROOT / "docs" / "prune_speed.md"
    old = doc.read_text() if doc.exists() else ""
    doc.write_text(text.rstrip("\n") + "\n" + ("\n" + old[old.index(KEPT_SECTION):] if KEPT_SECTION in old else ""))


def markdown(out: dict) -> str:
    env = out["environment"]
    lines = [
        "# Pruning speed: prunekit vs Torch-Pruning", "",
        f"Measured by `python benchmarks/prune_speed.py` on {out['date']} in one run: CPU {env.get('cpu_model')} "
        f"({env.get('cpu_count')} cores, {out['threads']} torch thread(s)), GPU "
        f"{(env.get('cuda') or {}).get('device_name', 'none')}, python {env.get('python')}, torch {out['torch']}, "
        f"torchvision {out['torchvision']}, torch-pruning {out['torch_pruning']}, prunekit {env.get('prunekit')} "
        f"(commit {str(env.get('git_commit'))[:10]}{', uncommitted changes' if env.get('git_dirty') else ''}). "
        f"Input {'x'.join(map(str, out['input']))}, float32, random weights; every timing starts from a fresh copy "
        f"of the model (made outside the timed region). Seconds: median (min-max) of {out['repeats']} repeats; "
        f"{out['wall_seconds']} s for the whole run. Load average (1/5/15 min) "
        f"{_load(out, 'start')} at the start, {_load(out, 'end')} at the end: the CPU is shared, and a load above "
        f"the core count slows both tools alike, which leaves the ratios more telling than the seconds.", "",
        "Steps: *graph* builds the dependency graph only (`prunekit.graph.build_graph`, "
        "`tp.DependencyGraph().build_dependency`). prunekit's graph holds the channel groups; Torch-Pruning finds "
        "its groups later, when a pruner steps, so *TP graph+groups* adds `list(graph.get_all_groups())` to "
        "its build: that is the same information. *prune* is graph + L2 magnitude scores + removal of 50% of the "
        "channels of every group (local), classifier kept: `prune_(model, MagnitudeConfig(channel_ratio=0.5, "
        "probe=False), x)` and `tp.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=2), "
        "pruning_ratio=0.5, ignored_layers=[classifier]).step()`. *probe* is prunekit's default `probe=True`, which "
        "removes one channel of every group whose rules cannot prove removal exact on a copy and checks the "
        "forward (catching channel counts hard-coded in Python; see below). prunekit rounds kept widths to "
        "multiples of 16 by default (`round_to=16`, halved where that would miss the ratio by more than 2% of the "
        "channels), Torch-Pruning keeps half of every group, so their widths may differ. prunekit's `prune_` also "
        "runs the pruned model once and reports its parameters and MACs; Torch-Pruning's `step()` does not. "
        "Ratio = prunekit median / Torch-Pruning median (below 1: prunekit faster).", "",
        "| model | params | pk graph s | TP graph s | ratio | TP graph+groups s | ratio | pk prune s | "
        "pk prune+probe s | TP prune s | ratio (prune) | ratio (probe) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        s = r["steps"]
        if not s:
            lines.append(f"| {r['model']} | | | | | | | | | | | {r.get('error', '')} |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {_cell(s.get('pk_graph', {}))} | "
                     f"{_cell(s.get('tp_graph', {}))} | {_ratio(r, 'ratio_pk_graph_vs_tp_graph')} | "
                     f"{_cell(s.get('tp_groups', {}))} | {_ratio(r, 'ratio_pk_graph_vs_tp_groups')} | "
                     f"{_cell(s.get('pk_prune', {}))} | {_cell(s.get('pk_prune_probe', {}))} | "
                     f"{_cell(s.get('tp_prune', {}))} | {_ratio(r, 'ratio_pk_prune_vs_tp_prune')} | "
                     f"{_ratio(r, 'ratio_pk_prune_probe_vs_tp_prune')} |")
    both_ok = lambda r, k: all(r["steps"].get(step, {}).get("ok") for step in k[len("ratio_"):].split("_vs_"))
    ratios = {k: [r[k] for r in out["rows"] if k in r and both_ok(r, k)] for k in
              ("ratio_pk_graph_vs_tp_graph", "ratio_pk_graph_vs_tp_groups", "ratio_pk_prune_vs_tp_prune",
               "ratio_pk_prune_probe_vs_tp_prune")}
    lines += ["", "Median ratio over the models both tools handle (a pruned model that no longer runs does not "
              "count): " + ", ".join(
        f"{label} {statistics.median(v):.2f} ({len(v)} models)" for label, v in
        zip(("graph", "graph vs TP graph+groups", "prune", "prune+probe"), ratios.values()) if v) + ".", ""]
    lines += ["## Coverage", "",
              "Does the pruned model run with the original output shape, finite outputs and fewer parameters? "
              "Parameters and MACs (prunekit's count: conv/linear/matmul/attention multiply-accumulates per "
              "sample) after pruning.", "",
              "| model | params before | MACs before | prunekit | params after | MACs after | Torch-Pruning | "
              "params after | MACs after |",
              "|---|---|---|---|---|---|---|---|---|"]
    fmt_p = lambda v: f"{v / 1e6:.2f}M" if isinstance(v, int) else ""
    fmt_m = lambda v: f"{v / 1e9:.2f}G" if isinstance(v, int) else ""
    for r in out["rows"]:
        s = r["steps"]
        if not s:
            continue
        pk, tpr = s.get("pk_prune_probe", {}), s.get("tp_prune", {})
        lines.append(f"| {r['model']} | {fmt_p(r['params'])} | {fmt_m(r['macs'])} | {_coverage(pk)} | "
                     f"{fmt_p(pk.get('params_after'))} | {fmt_m(pk.get('macs_after'))} | {_coverage(tpr)} | "
                     f"{fmt_p(tpr.get('params_after'))} | {fmt_m(tpr.get('macs_after'))} |")
    ok_pk = sum(_coverage(r["steps"].get("pk_prune_probe", {})) == "yes" for r in out["rows"])
    ok_tp = sum(_coverage(r["steps"].get("tp_prune", {})) == "yes" for r in out["rows"])
    lines += ["", f"prunekit (probe on): {ok_pk}/{len(out['rows'])} models; Torch-Pruning with the call above: "
              f"{ok_tp}/{len(out['rows'])}. The call is the same for every model, for both tools; Torch-Pruning "
              "also takes per-model hints for attention (`num_heads=`, `unwrapped_parameters=`), not given here.", "",
              "## Where prunekit spends the time", "",
              "- Tracing runs one real forward of the model (eager, under `TorchFunctionMode`), queues every op "
              "and applies a rule per op after the forward; the forward alone is a large part of *graph* on the "
              "bigger models, the per-op rules (Python) on the small ones.",
              "- `prune_` works on a copy of the model that shares its tensors (`surgery.copying.share_copy`: surgery "
              "assigns new tensors and never writes into old ones), so that a failure leaves the caller's model "
              "as it was, hands the result back into the caller's own module objects, runs the pruned copy once to check that it still works, and reports its parameters and "
              "MACs from the graph it already has (equal to a recount, by test). Torch-Pruning edits the model "
              "in place and counts nothing.",
              "- Probing (only the groups the rules cannot prove exact; none on most CNNs, see below) adds a "
              "removal and two forwards when every probed group passes together. A bad group is found "
              "by halving, about log2(groups) trials that usually fail early in the forward, and the halves passed "
              "by are then tried together once: vit_b_16, whose stream "
              "prunekit couples to its attention heads while torchvision's code hard-codes `hidden_dim` in a "
              "reshape, is the slow case (without probing both tools break it: the *fails* and *broken* entries).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
