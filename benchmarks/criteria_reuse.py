"""Trace and probe once, prune many fresh copies: time against one default `prune_`, in one run.

For each model (default: CIFAR resnet56 at 1x3x32x32 and torchvision resnet50 at 1x3x224x224; any
torchvision model name runs at 224x224; float32, CPU, random initialisation) and each target
(channel_ratio=0.5 local; macs_fraction=0.5 global), one repeat times, interleaved:

    full        prune_(copy, MagnitudeConfig(target), x): trace + probe + l2 scoring + removal +
                final forward (the default path), median of `--full` runs
    reuse       prepare_pruning(dense, x) once, then prepared.prune_(copy_k, config_k) for
                k = 1..50, each with a different criterion (l2 times a per-criterion random factor
                in [1, 1.5), so every trial selects differently), verify=True (final forward)
    reuse_fast  the same with verify=False (no final forward; channels removed in place)

Copies (`copy.deepcopy` of the dense model) are made outside the timed regions and timed
separately (`deepcopy`). The claim checked: reuse / full < 5, i.e. tracing once and pruning 50
fresh copies with 50 criteria costs less than five default prunings. The load average is
recorded before and after each repeat (the machine is shared: numbers are noisy under load).

    python benchmarks/criteria_reuse.py                        # both models, 3 repeats
    python benchmarks/criteria_reuse.py --models resnet56 --repeats 1
    python benchmarks/criteria_reuse.py --table               # the markdown table of docs/criteria.md
Writes benchmarks/results/criteria_reuse.json (or --out) after every repeat.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOOLS = ROOT.parent / "shared" / "tools"
if SHARED_TOOLS.exists():
    sys.path.insert(0, str(SHARED_TOOLS))
    import torchvision_cpu  # noqa: F401

from prunekit import prepare_pruning  # noqa: E402
from prunekit.core.environment import environment  # noqa: E402
from prunekit.importance.criteria import CRITERIA  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.models import create_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "criteria_reuse.json"
TARGETS = {"channel_ratio=0.5": dict(channel_ratio=0.5), "macs_fraction=0.5,global": dict(macs_fraction=0.5, scope="global")}


def _model(name: str):
    """A torchvision model at 224x224 (random weights), or one of prunekit's CIFAR models at 32x32."""
    torch.manual_seed(0)
    import torchvision.models as tvm
    if name in tvm.list_models(module=tvm):
        return tvm.get_model(name).eval(), torch.randn(1, 3, 224, 224)
    return create_model(name, num_classes=10).eval(), torch.randn(1, 3, 32, 32)


def make_criterion(k: int):
    """l2 times a random factor in [1, 1.5) per channel, drawn from seed k: 50 distinct rankings."""
    l2 = CRITERIA.get("l2")

    def criterion(group, ctx):
        gen = torch.Generator().manual_seed(k * 7919 + group.size)
        return l2(group, ctx) * (1 + 0.5 * torch.rand(group.size, generator=gen))
    criterion.__qualname__ = f"l2_jitter_{k}"
    return criterion


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_repeat(name: str, target: dict, trials: int, full_runs: int) -> dict:
    dense, x = _model(name)
    load_before = os.getloadavg()
    full = []
    for _ in range(full_runs):
        model = copy.deepcopy(dense)
        full.append(_timed(lambda: prune_(model, MagnitudeConfig(**target), x)))
    arms = {}
    for arm, verify in (("reuse", True), ("reuse_fast", False)):
        copies = [copy.deepcopy(dense) for _ in range(trials)]
        configs = [MagnitudeConfig(criterion=make_criterion(k), **target) for k in range(trials)]
        per_trial: list[float] = []
        prepare: list = []
        kept: set = set()

        def run():
            prepare.append(prepare_pruning(dense, x))
            for model, cfg in zip(copies, configs):
                t = time.perf_counter()
                result = prepare[0].prune_(model, cfg, verify=verify)
                per_trial.append(time.perf_counter() - t)
                kept.add(json.dumps(result.plan.groups, sort_keys=True))
        total = _timed(run)
        arms[arm] = {"total_s": total, "prepare_s": total - sum(per_trial),
                     "per_trial_median_s": statistics.median(per_trial), "distinct_plans": len(kept)}
        del copies
    copy_times = [_timed(lambda: copy.deepcopy(dense)) for _ in range(5)]
    full_med = statistics.median(full)
    return {"model": name, "input": list(x.shape), "full_median_s": full_med, "full_runs_s": full,
            **{arm: {**v, "ratio_to_full": v["total_s"] / full_med} for arm, v in arms.items()},
            "deepcopy_median_s": statistics.median(copy_times), "trials": trials,
            "load_before": load_before, "load_after": os.getloadavg()}


def table(data: dict) -> str:
    """Markdown table: per model and target, median (min-max) over repeats."""
    rows = ["| model | target | repeats | full prune_ ms | reuse: one trial ms | reuse x full | fast: one trial ms "
            "| fast x full | deepcopy ms | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    # runs of another commit, trial count or thread count are never pooled: they get a row of their own
    setting = lambda r: (r["trials"], str(r.get("git_commit")), r.get("threads", data.get("threads")))
    keys = sorted({(r["model"], r["target"], setting(r)) for r in data["runs"]},
                  key=lambda k: (k[0] != "resnet56", k[:2], str(k[2])))
    pairs = [k[:2] for k in keys]
    span = lambda xs, f=1.0: f"{statistics.median(xs) * f:.{0 if f > 1 else 1}f} ({min(xs) * f:.{0 if f > 1 else 1}f}-{max(xs) * f:.{0 if f > 1 else 1}f})"
    for model, target, how in keys:
        rs = [r for r in data["runs"] if (r["model"], r["target"], setting(r)) == (model, target, how)]
        loads = [x for r in rs for x in (r["load_before"][0], r["load_after"][0])]
        if pairs.count((model, target)) > 1:
            target = f"{target} ({how[0]} trials, commit {how[1][:10]}, {how[2]} thread(s))"
        rows.append(f"| {model} | {target} | {len(rs)} | {span([r['full_median_s'] for r in rs], 1e3)} | "
                    f"{span([r['reuse']['per_trial_median_s'] for r in rs], 1e3)} | {span([r['reuse']['ratio_to_full'] for r in rs])} | "
                    f"{span([r['reuse_fast']['per_trial_median_s'] for r in rs], 1e3)} | {span([r['reuse_fast']['ratio_to_full'] for r in rs])} | "
                    f"{statistics.median([r['deepcopy_median_s'] for r in rs]) * 1e3:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet50"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--full", type=int, default=3, help="default prunings per repeat (median taken)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the table of the saved results and stop")
    ap.add_argument("--out", default=str(OUT), help="results file (runs are appended; the table covers all of them)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    torch.set_num_threads(args.threads)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update({"environment": environment(), "threads": args.threads, "dtype": "float32", "device": "cpu",
                 "command": "python benchmarks/criteria_reuse.py " + " ".join(sys.argv[1:])})
    runs = data.setdefault("runs", [])
    for name in args.models:
        for tname, target in TARGETS.items():
            for rep in range(args.repeats):
                row = {"target": tname, "repeat": rep, "command": data["command"], "threads": args.threads,
                       "git_commit": data["environment"].get("git_commit"),
                       **one_repeat(name, target, args.trials, args.full)}
                runs.append(row)
                out.write_text(json.dumps(data, indent=1))
                print(f"{name} {tname} rep {rep}: full {row['full_median_s'] * 1e3:.0f} ms, reuse x{row['reuse']['ratio_to_full']:.2f}"
                      f" (trial {row['reuse']['per_trial_median_s'] * 1e3:.0f} ms), fast x{row['reuse_fast']['ratio_to_full']:.2f}"
                      f" (trial {row['reuse_fast']['per_trial_median_s'] * 1e3:.0f} ms), load {row['load_before'][0]:.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
