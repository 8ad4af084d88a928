"""Gator on CIFAR-10: accuracy at 50% MACs against the magnitude pruner, and latency vs MACs objective.

For every seed, a dense ResNet-56 (or --model) is trained (or loaded from --baseline); every arm
starts from a copy of it:

- gator_macs:   Gator, MACs cost, target 50% of the MACs; --gator-epochs of gated training
                (lr --lr, SGD momentum 0.9, wd 1e-4, cosine), conversion, --finetune-epochs.
- magnitude:    the core magnitude pruner (L2, local, MagnitudeConfig(macs_fraction=0.5)), then
                --gator-epochs + --finetune-epochs of fine-tuning: the same epoch budget.
- gator_macs_r8 / gator_latency_r8: Gator with channel counts rounded to multiples of 8,
                once with the MACs cost and once with the latency cost (per-layer latency tables
                timed on this device at batch --lut-batch), both at 50% of the MACs.

Then every model is timed interleaved (prunekit.cost.latency.compare_latency) at batch 1 and
256, float32 (and bfloat16 on CUDA), and MACs/params are counted. Results go to
benchmarks/results/gator_cifar10_*.json with device, dtype, batch, epochs, seeds and the
spread over seeds (mean, std, n); timings carry median, p10, p90 and n.

Quick CPU check (a smoke setting; under 10 minutes on 2 idle cores; ResNet-20, 1,024 training
images, 3 + 3 epochs, accuracies on every 8th val/test image; far from converged; docs/gator.md
gives the command of the reduced run it reports, on 5,000 images):
    python benchmarks/gator_cifar10.py --quick
Full setting (GPU; not run here):
    python benchmarks/gator_cifar10.py --baseline benchmarks/results/resnet56_dense_{seed}.safetensors \\
        --pretrain-epochs 160 --gator-epochs 30 --finetune-epochs 60 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.core.environment import environment  # noqa: E402
from prunekit.cost.latency import LatencyConfig, compare_latency  # noqa: E402
from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.data import DataConfig, load_data  # noqa: E402
from prunekit.engine.evaluate import evaluate  # noqa: E402
from prunekit.engine.train import TrainConfig, train  # noqa: E402
from prunekit.methods.gator import GatorConfig, gator_prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig, magnitude_prune_  # noqa: E402
from prunekit.models import create_model  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
QUICK = {"model": "resnet20", "device": "cpu", "limit_train": 1024, "batch_size": 64, "pretrain_epochs": 3,
         "pretrain_lr": 0.05, "gator_epochs": 2, "finetune_epochs": 1, "eval_every": 8, "lut_batch": 8,
         "latency_repeats": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced CPU setting: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 image folder or tarball")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--arms", nargs="+", default=["gator_macs", "gator_macs_r8", "gator_latency_r8"],
                   choices=["gator_macs", "gator_macs_r8", "gator_latency_r8"],
                   help="Gator arms to run (the magnitude arm always runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train images")
    p.add_argument("--baseline", default=None, help="dense weights ({seed} is replaced): loaded if present, else written")
    p.add_argument("--pretrain-epochs", type=int, default=160)
    p.add_argument("--pretrain-lr", type=float, default=0.1)
    p.add_argument("--gator-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.01, help="gated phase and fine-tuning lr (cosine)")
    p.add_argument("--target", type=float, default=0.5, help="fraction of the MACs kept")
    p.add_argument("--round-to", type=int, default=8, help="channel rounding of the latency comparison arms")
    p.add_argument("--lut-batch", type=int, default=64, help="batch size the latency tables are timed at")
    p.add_argument("--latency-batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=1, help="score every k-th val/test image (k > 1: quick runs)")
    p.add_argument("--markdown", nargs="+", default=None, metavar="RESULT_JSON",
                   help="print the docs tables of saved results (their runs pooled) and exit")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/<auto>.json)")
    if p.parse_known_args(argv)[0].quick:  # quick values are defaults: explicit flags still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.baseline and "{seed}" not in args.baseline and len(args.seeds) > 1:
        # each seed carves its own validation split: one dense model for all would have trained on
        # the other seeds' validation images
        p.error("--baseline needs {seed} in its path when more than one seed runs")
    return args


class EveryKth:
    """Every k-th image of each batch: a cheap, class-balanced score on class-ordered splits."""

    def __init__(self, loader: Any, k: int):
        self.loader, self.k = loader, k

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x[:: self.k], y[:: self.k]


def scores(model, bundle) -> dict[str, float]:
    return {"val_acc": evaluate(model, bundle.val)["acc"], "test_acc": evaluate(model, bundle.test)["acc"]}


def dense_baseline(args, bundle, seed: int, device: str) -> torch.nn.Module:
    model = create_model(args.model, num_classes=bundle.num_classes).to(device)
    path = Path(args.baseline.replace("{seed}", str(seed))) if args.baseline else None
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path), device=str(device)))
        return model
    cfg = TrainConfig(epochs=args.pretrain_epochs, lr=args.pretrain_lr, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, seed=seed, log_every=0)
    train(model, bundle.train, bundle.val, cfg, device=device, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def run_gator(args, bundle, dense, example, phase, device, **fields) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense)
    cfg = GatorConfig(target=args.target, epochs=args.gator_epochs, finetune_epochs=args.finetune_epochs,
                      seed=phase.seed, **fields)
    t0 = time.perf_counter()
    r = gator_prune_(model, cfg, example, train_loader=bundle.train, val_loader=bundle.val, train_config=phase,
                     device=device)
    m = r.metrics
    history = m.get("gated_history", [])
    out = {"config": cfg.to_dict(), "wall_s": time.perf_counter() - t0, **scores(model, bundle),
           "macs_fraction": m["macs_fraction"], "params_fraction": m["params_fraction"], "target": m["target"],
           "final": m["final"], "gated_val_acc": m.get("gated", {}).get("acc"),
           "converted_val_acc": m.get("converted", {}).get("acc"),
           "settled_at_step": history[-1].get("gator/settled_at") if history else None,
           "branches_cut": [b["group"] for b in m["conversion"]["branches"]],
           "conversion_max_abs_diff": m["conversion"]["max_abs_diff"],
           "widths": {n: len(k) for n, k in r.plan.groups.items()}}
    return model, out


def run_magnitude(args, bundle, dense, example, phase, device) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense).cpu()
    t0 = time.perf_counter()
    r = magnitude_prune_(model, MagnitudeConfig(macs_fraction=args.target), example.cpu())
    pruned_acc = scores(model.to(device), bundle)
    train(model, bundle.train, bundle.val, phase.replace(epochs=args.gator_epochs + args.finetune_epochs),
          device=device, progress=False)
    return model, {"wall_s": time.perf_counter() - t0, "after_prune": pruned_acc, **scores(model, bundle),
                   "macs_fraction": r.cost_after.macs / r.cost_before.macs,
                   "params_fraction": r.cost_after.params / r.cost_before.params}


def time_models(models: dict[str, torch.nn.Module], args, device: str) -> dict[str, Any]:
    dtypes = ["float32"] + (["bfloat16"] if device.startswith("cuda") else [])
    out = {}
    for dtype in dtypes:
        for batch in args.latency_batches:
            cfg = LatencyConfig(device="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, batch_size=batch,
                                warmup=max(2, args.latency_repeats // 5), repeats=args.latency_repeats)
            cmp = compare_latency(models, (3, 32, 32), cfg)
            out[f"{dtype}/b{batch}"] = {name: {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms,
                                               "n": r.n, "speedup": cmp.speedups[name]}
                                        for name, r in cmp.results.items()}
    return out


def stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _union(keys_per_run) -> list[str]:
    out: list[str] = []
    for keys in keys_per_run:
        out += [k for k in keys if k not in out]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std and n over seeds; arms missing from some seeds count only where they ran.
    Latency: the median of each model, and its speed-up over dense measured interleaved in the
    same run (the ratio is what compares across runs on a shared machine)."""
    summary: dict[str, Any] = {}
    for arm in _union(r["arms"] for r in runs):
        rows = [r["arms"][arm] for r in runs if arm in r["arms"]]
        summary[arm] = {k: stats([row.get(k) for row in rows])
                        for k in ("val_acc", "test_acc", "macs_fraction", "params_fraction")}
    summary["dense"] = {k: stats([r["dense"][k] for r in runs]) for k in ("val_acc", "test_acc")}
    summary["latency"] = {}
    for key in _union(r["latency"] for r in runs):
        cells = [r["latency"][key] for r in runs if key in r["latency"]]
        summary["latency"][key] = {
            name: {"median_ms": stats([c[name]["median_ms"] for c in cells if name in c]),
                   "speedup": stats([c[name].get("speedup") for c in cells if name in c])}
            for name in _union(cells)}
    return summary


def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 1, unit: str = "") -> str:
    if stat.get("mean") is None:
        return "-"
    spread = f" ± {scale * stat['std']:.{digits}f}" if stat.get("std") is not None else ""
    return f"{scale * stat['mean']:.{digits}f}{spread}{unit} (n={stat['n']})"


SETTING = ("model", "device", "dtype_train", "batch_size", "limit_train", "eval_every", "pretrain_epochs",
           "gator_epochs", "finetune_epochs", "lr", "target_macs_fraction", "round_to", "lut_batch",
           "latency_batches", "latency_repeats")


def markdown(records: list[dict[str, Any]]) -> str:
    """Docs tables for one or more result files of the same setting (e.g. one per seed)."""
    for rec in records[1:]:
        differ = [k for k in SETTING if rec.get(k) != records[0].get(k)]
        if differ:
            raise SystemExit(f"result files differ in {differ}: they are not one setting")
    runs: list[dict[str, Any]] = []
    for run in (run for rec in records for run in rec["runs"]):
        same = next((r for r in runs if r["seed"] == run["seed"]), None)
        if same is None:
            runs.append(copy.deepcopy(run))
            continue
        # a later file with more arms of the same seed: add its arms (and their timings), keep the first of each
        for arm, row in run["arms"].items():
            same["arms"].setdefault(arm, row)
            for key, cells in run["latency"].items():
                if arm in cells:
                    same["latency"].setdefault(key, {}).setdefault(arm, cells[arm])
    summ, rec, env = summarise(runs), records[0], records[0]["environment"]
    lines = [f"`benchmarks/gator_cifar10.py`: {rec['model']} on CIFAR-10, device {rec['device']} "
             f"({env.get('cpu_model')}, GPU {(env.get('cuda') or {}).get('device_name', 'none')}), "
             f"{rec['dtype_train']}, batch {rec['batch_size']}, first {rec['limit_train'] or 'all'} training images, "
             f"seeds {[r['seed'] for r in runs]}, dense {rec['pretrain_epochs']} epochs, Gator {rec['gator_epochs']} "
             f"gated + {rec['finetune_epochs']} fine-tuning epochs, magnitude {rec['magnitude_epochs']} fine-tuning "
             f"epochs (lr {rec['lr']}), target {rec['target_macs_fraction']} of the MACs, accuracies on every "
             f"k-th val/test image (k = {rec['eval_every']}); prunekit commits "
             f"{sorted({str(r['environment'].get('git_commit'))[:10] for r in records})}. "
             "Accuracy in %, mean ± sample std over seeds (n).", "",
             "| arm | MACs kept % | params kept % | val acc | test acc |", "|---|---|---|---|---|",
             f"| dense | 100 | 100 | {_pm(summ['dense']['val_acc'])} | {_pm(summ['dense']['test_acc'])} |"]
    for arm, row in summ.items():
        if arm in ("dense", "latency"):
            continue
        lines.append(f"| {arm} | {_pm(row['macs_fraction'])} | {_pm(row['params_fraction'])} | "
                     f"{_pm(row['val_acc'])} | {_pm(row['test_acc'])} |")
    lines += ["", f"Forward latency, {rec['device']}, interleaved, {rec['latency_repeats']} repeats per model: "
              "median ms (mean over seeds) and speed-up over dense in the same run (mean ± std over seeds).", "",
              "| model | " + " | ".join(summ["latency"]) + " |", "|---" * (1 + len(summ["latency"])) + "|"]
    for name in _union(summ["latency"][k] for k in summ["latency"]):
        cells = []
        for key in summ["latency"]:
            c = summ["latency"][key].get(name)
            cells.append("-" if c is None else
                         f"{c['median_ms']['mean']:.2f} ms, {_pm(c['speedup'], 1.0, 2, 'x')}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(Path(f).read_text()) for f in args.markdown]))
        return Path(args.markdown[0])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs, t_start = [], time.perf_counter()
    for seed in args.seeds:
        data_cfg = DataConfig(name="imagefolder", root=args.data, batch_size=args.batch_size, seed=seed,
                              val_fraction=0.1, limit_train=args.limit_train, device=device, eval_batch_size=256)
        bundle = load_data(data_cfg)
        if args.eval_every > 1:
            bundle.val, bundle.test = EveryKth(bundle.val, args.eval_every), EveryKth(bundle.test, args.eval_every)
        torch.manual_seed(seed)
        print(f"seed {seed}: dense", flush=True)
        dense = dense_baseline(args, bundle, seed, device)
        example = next(iter(bundle.val))[0][:2]
        phase = TrainConfig(epochs=1, lr=args.lr, momentum=0.9, weight_decay=1e-4, seed=seed, log_every=0)
        lut = LatencyConfig(device="cuda" if device.startswith("cuda") else "cpu", batch_size=args.lut_batch,
                            warmup=3, repeats=max(5, args.latency_repeats // 5))
        arms, models = {}, {"dense": dense}
        gator_arms = {"gator_macs": {}, "gator_macs_r8": {"round_to": args.round_to},
                      "gator_latency_r8": {"round_to": args.round_to, "cost": "latency", "target_metric": "macs",
                                           "latency": lut}}
        for name in args.arms:
            fields = gator_arms[name]
            print(f"seed {seed}: {name} ({time.perf_counter() - t_start:.0f} s)", flush=True)
            models[name], arms[name] = run_gator(args, bundle, dense, example, phase, device, **fields)
        print(f"seed {seed}: magnitude ({time.perf_counter() - t_start:.0f} s)", flush=True)
        models["magnitude"], arms["magnitude"] = run_magnitude(args, bundle, dense, example, phase, device)
        print(f"seed {seed}: latency ({time.perf_counter() - t_start:.0f} s)", flush=True)
        costs = {n: {"macs": c.macs, "params": c.params} for n, c in
                 ((n, count_cost(m.cpu(), example.cpu())) for n, m in models.items())}
        latency = time_models({n: m.to(device).eval() for n, m in models.items()}, args, device)
        runs.append({"seed": seed, "dense": scores(dense, bundle), "arms": arms, "costs": costs, "latency": latency})
    record = {
        "benchmark": "gator_cifar10", "setting": "quick (reduced CPU)" if args.quick else "full",
        "model": args.model, "device": device, "dtype_train": "float32", "batch_size": args.batch_size,
        "limit_train": args.limit_train, "eval_every": args.eval_every, "seeds": args.seeds,
        "pretrain_epochs": args.pretrain_epochs, "gator_epochs": args.gator_epochs,
        "finetune_epochs": args.finetune_epochs, "magnitude_epochs": args.gator_epochs + args.finetune_epochs,
        "lr": args.lr, "target_macs_fraction": args.target, "round_to": args.round_to, "lut_batch": args.lut_batch,
        "latency_batches": args.latency_batches, "latency_repeats": args.latency_repeats,
        "summary": summarise(runs), "runs": runs, "wall_s": time.perf_counter() - t_start,
        "environment": environment(REPO),
    }
    out = Path(args.out) if args.out else (REPO / "benchmarks" / "results" /
                                           f"gator_cifar10_{args.model}_{device.split(':')[0]}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
