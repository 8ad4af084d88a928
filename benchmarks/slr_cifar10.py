"""SLR vs ADMM on CIFAR-10: hard-pruned accuracy during training, then masked retraining.

For every seed: a dense ResNet-56 (prunekit.models, or --model vgg16 ...) is trained (or loaded
from --baseline), then every arm starts from a copy of it. An arm is "optimization:kind:sparsity"
(optimization slr, slr_ref = SLR with the reference code's aliased W_prev, or admm; kind a
projection), default: slr and admm at irregular 0.7 and 0.9 and filter 0.5, over all convs but
the stem. Per arm:

1. SLR/ADMM training for --epochs with the penalty (SLRHook, one Z/U update per epoch, f from the
   epoch's training loss as in the reference). After every epoch a copy is hard-pruned and its
   validation accuracy measured with the training-time BN statistics and again after BN
   recalibration on --recal-batches training batches (the "retrain-free" curve);
   ||W - Z||/||W|| and SLR's s and acceptance flags are recorded too.
2. The final model is hard-pruned (filter arms also close the following BN's channels) and
   evaluated; masked retraining (fresh optimizer) for each of --retrain epochs (default 5 and
   10), each from that same hard-pruned point.
3. Filter arms are shrunk to a physically smaller network; MACs/params before/after are counted
   and the accuracy of the shrunk network is checked against the masked one.

Curves use the validation split (5,000 train images held out); test accuracy is reported,
never used to choose anything. Results, with device, dtype, batch size, epochs, seeds and the
environment, go to benchmarks/results/slr_cifar10_*.json.

CPU smoke setting (a few minutes on 2 cores once the decoded images are cached; numbers at
chance level, it only proves the pipeline runs):
    python benchmarks/slr_cifar10.py --device cpu --limit-train 256 --pretrain-epochs 1 \\
        --epochs 2 --retrain 1 --batch-size 64 --eval-batches 4 --recal-batches 2 \\
        --arms slr:irregular:0.7 admm:filter:0.5
Full setting (GPU; not run here):
    python benchmarks/slr_cifar10.py --baseline 'benchmarks/results/resnet56_dense_{seed}.safetensors' \\
        --pretrain-epochs 160 --epochs 50 --seeds 0 1 2
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
from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.data import DataConfig, load_data  # noqa: E402
from prunekit.data.subsets import FirstBatches  # noqa: E402
from prunekit.engine.evaluate import evaluate  # noqa: E402
from prunekit.engine.hooks import Hook  # noqa: E402
from prunekit.engine.train import TrainConfig, train  # noqa: E402
from prunekit.methods.slr import SLRConfig, SLRHook, hard_prune_, recalibrate_bn, shrink_  # noqa: E402
from prunekit.models import create_model  # noqa: E402
from prunekit.surgery.masks import remove_masks, sparsity_report  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_ARMS = ["slr:irregular:0.7", "admm:irregular:0.7", "slr:irregular:0.9", "admm:irregular:0.9",
                "slr:filter:0.5", "admm:filter:0.5"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 image folder or tarball")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="optimization:kind:sparsity")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train images")
    p.add_argument("--baseline", default=None, help="dense weights (.safetensors; {seed} is replaced): loaded if "
                   "present, else written")
    p.add_argument("--pretrain-epochs", type=int, default=160)
    p.add_argument("--pretrain-lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=50, help="SLR/ADMM training epochs")
    p.add_argument("--lr", type=float, default=0.01, help="SLR/ADMM and retraining lr (reference: 0.01)")
    p.add_argument("--momentum", type=float, default=0.5, help="reference: 0.5, Nesterov")
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--retrain", nargs="+", type=int, default=[5, 10], help="masked retraining budgets")
    p.add_argument("--recal-batches", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=None,
                   help="score only the first N val/test batches of 512 images (test has 20, val 10 at "
                   "the default hold-out; a smaller N scores a class-ordered prefix of test: smoke runs only)")
    p.add_argument("--markdown", nargs="+", default=None, metavar="RESULT_JSON",
                   help="print the docs table of saved results of one setting (e.g. one file per seed or "
                   "per arm; summary recomputed from their runs) and exit")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/<auto>.json)")
    args = p.parse_args(argv)
    if args.baseline and "{seed}" not in args.baseline and len(args.seeds) > 1:
        # each seed carves its own validation split: one dense model for all would have trained on
        # the other seeds' validation images
        p.error("--baseline needs {seed} in its path when more than one seed runs")
    return args


def parse_arm(text: str) -> tuple[str, SLRConfig]:
    opt, kind, sparsity = text.split(":")
    if opt not in ("slr", "slr_ref", "admm"):
        raise SystemExit(f"arm {text!r}: optimization must be slr, slr_ref or admm")
    return text, SLRConfig(optimization="admm" if opt == "admm" else "slr", sparsity_type=kind,
                           sparsity=None if kind in ("nm", "pattern") else float(sparsity),
                           clone_previous=opt != "slr_ref")


class HardPruneProbe(Hook):
    """After each epoch: accuracy of a hard-pruned copy, without and with BN recalibration."""

    def __init__(self, slr: SLRHook, bundle: Any, example: torch.Tensor, recal_batches: int):
        self.slr, self.bundle, self.example, self.recal_batches = slr, bundle, example, recal_batches

    def on_epoch_end(self, model, epoch, metrics):
        probe = copy.deepcopy(model)
        closing = self.example if self.slr.config.sparsity_type == "filter" else None
        hard_prune_(probe, self.slr.state, example_inputs=closing)
        metrics["probe/hard_acc"] = evaluate(probe, self.bundle.val)["acc"]
        recalibrate_bn(probe, self.bundle.train, self.recal_batches)
        metrics["probe/hard_acc_bn"] = evaluate(probe, self.bundle.val)["acc"]


def dense_baseline(args, bundle, seed: int, device: str) -> torch.nn.Module:
    model = create_model(args.model, num_classes=bundle.num_classes).to(device)
    path = Path(args.baseline.replace("{seed}", str(seed))) if args.baseline else None
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path), device=str(device)))
        return model
    cfg = TrainConfig(epochs=args.pretrain_epochs, lr=args.pretrain_lr, momentum=0.9, nesterov=True,
                      seed=seed, log_every=0)
    train(model, bundle.train, bundle.val, cfg, device=device, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def evaluate_both(model, bundle) -> dict[str, float]:
    return {"val_acc": evaluate(model, bundle.val)["acc"], "test_acc": evaluate(model, bundle.test)["acc"]}


def run_arm(args, bundle, dense, config: SLRConfig, seed: int, device: str) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    example = next(iter(bundle.val))[0][:2]
    config = config.replace(epochs=args.epochs, rho=args.rho)
    slr = SLRHook(model, config)
    probe = HardPruneProbe(slr, bundle, example, args.recal_batches)
    phase = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, nesterov=True,
                        seed=seed, log_every=0)
    t0 = time.perf_counter()
    history = train(model, bundle.train, bundle.val, phase, hooks=[slr, probe], device=device, progress=False).history
    keys = ("epoch", "val_acc", "probe/hard_acc", "probe/hard_acc_bn", "slr/w_z_rel", "slr/w_proj_rel",
            "slr/s", "slr/accepted_w", "slr/accepted_z")
    out: dict[str, Any] = {"curve": [{k: h[k] for k in keys if k in h} for h in history],
                           "train_time_s": time.perf_counter() - t0, "before_prune": evaluate_both(model, bundle)}
    closing = example if config.sparsity_type == "filter" else None
    hard_prune_(model, slr, example_inputs=closing)
    out["hard"] = evaluate_both(model, bundle)
    recal = copy.deepcopy(model)
    recalibrate_bn(recal, bundle.train, args.recal_batches)
    out["hard_bn"] = evaluate_both(recal, bundle)
    out["sparsity"] = sparsity_report(model)
    out["retrain"] = {}
    for budget in args.retrain:
        retrained = copy.deepcopy(model)
        train(retrained, bundle.train, bundle.val, phase.replace(epochs=budget), device=device, progress=False)
        out["retrain"][str(budget)] = evaluate_both(retrained, bundle)
        if budget == max(args.retrain) and config.sparsity_type == "filter":
            out["shrink"] = shrink_report(retrained, example, bundle)
    return out


def shrink_report(model, example, bundle) -> dict[str, Any]:
    """Shrink the retrained filter-sparse model; MACs/params before and after, accuracy kept."""
    remove_masks(model, bake=True)
    before = count_cost(model, example)
    masked_acc = evaluate(model, bundle.val)["acc"]
    plan = shrink_(model, example)
    after = count_cost(model, example)
    return {"macs_before": before.macs, "macs_after": after.macs, "params_before": before.params,
            "params_after": after.params, "macs_ratio": before.macs / max(after.macs, 1),
            "val_acc_masked": masked_acc, "val_acc_shrunk": evaluate(model, bundle.val)["acc"],
            "groups_pruned": len(plan.groups)}


def summarise(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean, sample std and n over seeds of the headline numbers of each arm."""
    def stats(values: list[float]) -> dict[str, Any]:
        std = statistics.stdev(values) if len(values) > 1 else None
        return {"mean": statistics.fmean(values), "std": std, "n": len(values)}

    summary = {}
    for arm, runs in per_seed.items():
        row = {"hard_val": stats([r["hard"]["val_acc"] for r in runs]),
               "hard_bn_val": stats([r["hard_bn"]["val_acc"] for r in runs]),
               "hard_test": stats([r["hard"]["test_acc"] for r in runs]),
               "hard_bn_test": stats([r["hard_bn"]["test_acc"] for r in runs])}
        for budget in runs[0]["retrain"]:
            row[f"retrain{budget}_val"] = stats([r["retrain"][budget]["val_acc"] for r in runs])
            row[f"retrain{budget}_test"] = stats([r["retrain"][budget]["test_acc"] for r in runs])
        row["curve_hard_val"] = [stats([r["curve"][i]["probe/hard_acc"] for r in runs])["mean"]
                                 for i in range(len(runs[0]["curve"]))]
        summary[arm] = row
    return summary


def _pm(stat: dict[str, Any]) -> str:
    """mean ± sample std (n) as percentages."""
    if stat.get("mean") is None:
        return "-"
    spread = f" ± {100 * stat['std']:.1f}" if stat.get("std") is not None else ""
    return f"{100 * stat['mean']:.1f}{spread} (n={stat['n']})"


SETTING = ("model", "device", "dtype", "batch_size", "limit_train", "pretrain_epochs", "epochs", "retrain_epochs",
           "lr", "momentum", "rho", "recal_batches", "eval_batches")


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from runs of the same setting: arms' runs pooled, the dense model once per seed."""
    first = dict(records[0])
    for rec in records[1:]:
        differ = [k for k in SETTING if rec.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"result files differ in {differ}: they are not one setting")
    runs: dict[str, list[dict[str, Any]]] = {}
    dense: dict[int, dict[str, Any]] = {}
    for rec in records:
        for arm, arm_runs in rec["runs"].items():
            runs.setdefault(arm, []).extend(arm_runs)
        for d in rec["dense"]:
            dense.setdefault(d["seed"], d)
    first.update(runs=runs, dense=list(dense.values()), summary=summarise(runs),
                 seeds=sorted({r["seed"] for arm_runs in runs.values() for r in arm_runs}),
                 complete=all(r.get("complete") for r in records),
                 wall_s=sum(r["wall_s"] for r in records),
                 commits=sorted({str(r["environment"].get("git_commit"))[:10] for r in records}))
    return first


def markdown(record: dict[str, Any]) -> str:
    """The result table of one run, for docs/."""
    env, summ = record["environment"], record["summary"]
    dense = [d["test_acc"] for d in record["dense"]]
    dense_stat = {"mean": statistics.fmean(dense), "std": statistics.stdev(dense) if len(dense) > 1 else None,
                  "n": len(dense)}
    budgets = record["retrain_epochs"]
    lines = [f"Run of `benchmarks/slr_cifar10.py` ({'complete' if record.get('complete') else 'interrupted: arms done so far'}): "
             f"{record['model']} on CIFAR-10, device {record['device']} ({env.get('cpu_model')}, GPU "
             f"{(env.get('cuda') or {}).get('device_name', 'none')}), {record['dtype']}, batch {record['batch_size']}, "
             f"first {record['limit_train'] or 'all'} training images, seeds {record['seeds']}, dense training "
             f"{record['pretrain_epochs']} epochs, SLR/ADMM {record['epochs']} epochs (lr {record['lr']}, momentum "
             f"{record['momentum']}, rho {record['rho']}), BN recalibration on {record['recal_batches']} batches, "
             f"evaluation on {'the first ' + str(record['eval_batches']) + ' batches of 512 images of' if record['eval_batches'] else 'all of'} "
             f"val/test; prunekit commit(s) {', '.join(record.get('commits') or [str(env.get('git_commit'))[:10]])}; "
             f"{record['wall_s'] / 60:.0f} min of runs. "
             "Accuracies in %, mean ± sample standard deviation over seeds (n).", "",
             f"Dense test accuracy: {_pm(dense_stat)}.", "",
             "| arm | hard-pruned test (no retraining) | + BN recalibration | "
             + " | ".join(f"after {b} retraining epoch(s)" for b in budgets) + " | hard-pruned val per epoch |",
             "|---" * (4 + len(budgets)) + "|"]
    for arm, row in summ.items():
        curve = ", ".join(f"{100 * v:.1f}" for v in row["curve_hard_val"])
        lines.append(f"| {arm} | {_pm(row['hard_test'])} | {_pm(row.get('hard_bn_test', {}))} | "
                     + " | ".join(_pm(row[f'retrain{b}_test']) for b in budgets) + f" | {curve} |")
    shrunk = [(f"{arm} seed {r['seed']}", r["shrink"]) for arm, runs in record["runs"].items() for r in runs
              if "shrink" in r]
    if shrunk:
        lines += ["", "Filter arms, retrained model shrunk to a smaller dense network (per run): "
                  + "; ".join(f"{arm}: {s['macs_ratio']:.2f}x fewer MACs, params {s['params_before']:,} -> "
                              f"{s['params_after']:,}, val acc masked {100 * s['val_acc_masked']:.2f} / shrunk "
                              f"{100 * s['val_acc_shrunk']:.2f}" for arm, s in shrunk) + "."]
    return "\n".join(lines) + "\n"


def _record(args, device, arms, dense_runs, per_seed, t_start, complete: bool) -> dict[str, Any]:
    done = {name: runs for name, runs in per_seed.items() if runs}
    return {
        "benchmark": "slr_cifar10", "complete": complete, "model": args.model, "device": device,
        "dtype": "float32", "batch_size": args.batch_size, "limit_train": args.limit_train, "seeds": args.seeds,
        "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs, "retrain_epochs": args.retrain,
        "lr": args.lr, "momentum": args.momentum, "rho": args.rho, "recal_batches": args.recal_batches,
        "eval_batches": args.eval_batches,
        "arms": {name: cfg.to_dict() for name, cfg in arms}, "dense": dense_runs,
        "summary": summarise(done), "runs": done, "wall_s": time.perf_counter() - t_start,
        "environment": environment(REPO),
    }


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(merge_records([json.loads(Path(f).read_text()) for f in args.markdown])))
        return Path(args.markdown[0])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    arms = [parse_arm(a) for a in args.arms]
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in arms}
    dense_runs, t_start = [], time.perf_counter()
    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"slr_cifar10_{args.model}_{device.split(':')[0]}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        data_cfg = DataConfig(name="imagefolder", root=args.data, batch_size=args.batch_size, seed=seed,
                              val_fraction=0.1, limit_train=args.limit_train, device=device)
        bundle = load_data(data_cfg)
        if args.eval_batches is not None:
            bundle.val = FirstBatches(bundle.val, args.eval_batches)
            bundle.test = FirstBatches(bundle.test, args.eval_batches)
        torch.manual_seed(seed)
        dense = dense_baseline(args, bundle, seed, device)
        dense_runs.append({"seed": seed, **evaluate_both(dense, bundle)})
        for name, config in arms:
            print(f"seed {seed} arm {name}", flush=True)
            per_seed[name].append({"seed": seed, **run_arm(args, bundle, dense, config, seed, device)})
            record = _record(args, device, arms, dense_runs, per_seed, t_start, complete=False)
            out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # an interrupted run keeps its arms
    record = _record(args, device, arms, dense_runs, per_seed, t_start, complete=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
