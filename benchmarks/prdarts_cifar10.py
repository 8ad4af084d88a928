"""PR-DARTS on a CIFAR-10 subset: search a sparse cell, then compare it with DARTS-V2 and two
random cells at equal density, with the same short training and several seeds.

For each density (default 0.1 and 0.01, i.e. 90% and 99% sparsity):
1. search (seed 0; with --search-density, one search at that density serves every density): a
   reduced supernet (--layers cells of --channels channels) through the three
   phases (dense pretrain, HYDRA score training, finetune), first order unless --unrolled, on
   --limit-train weight-split images; the alpha split is the other half of CIFAR-10 train;
2. evaluate each genotype (searched, darts_v2, random_a, random_b) for every seed: an
   EvalNetwork of the same size trained dense, then its per-layer top-k scores learned, then
   finetuned at the density (auxiliary head, drop path, cutout 16); test accuracy on
   a fixed random subset of the test split (all of it in the gpu preset), nonzero weights and MACs counted.
Everything lands in one JSON (resumable: finished searches and arms are skipped on rerun), with
device, load average, epochs, seeds and per-arm mean and spread.

CPU smoke (one thread, about 25 minutes on a loaded 2-core machine):
    python benchmarks/prdarts_cifar10.py --device cpu --preset smoke
Reduced CPU search and evaluation (2 threads; about 80 minutes of search and 3 minutes per
evaluation arm on 2 cores shared with one other job):
    python benchmarks/prdarts_cifar10.py --device cpu --preset cpu --threads 2 --search-density 0.1
GPU run (see docs/prdarts.md for the expected time):
    python benchmarks/prdarts_cifar10.py --device cuda --preset gpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.core.environment import environment  # noqa: E402
from prunekit.data import DataConfig, load_data  # noqa: E402
from prunekit.data.augment import CutoutLoader  # noqa: E402
from prunekit.engine.evaluate import evaluate  # noqa: E402
from prunekit.layers.sparse import count_nonzeros  # noqa: E402
from prunekit.methods.prdarts import (DARTS_V2, EvalNetwork, EvalSchedule, Genotype, PRDartsConfig,  # noqa: E402
                                      random_genotype, search, train_at_density)
from prunekit.methods.prdarts.network import inference_nonzeros, sparse_macs  # noqa: E402
from prunekit.data.subsets import FirstBatches, random_batches  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
PRESETS = {
    # tiny: checks the pipeline on a CPU; accuracies are near chance
    "smoke": dict(limit_train=512, batch_size=32, channels=8, layers=5, search_epochs=(1, 1, 1),
                  eval_epochs=(1, 1, 1), seeds=[0, 1], test_batches=8, val_batches=4),
    # reduced search for 2 CPU cores: 3,000 weight-split images; with about 50x fewer architect steps
    # than DARTS's 50 epochs, the architect's learning rate is raised 10x. One search takes over an
    # hour on 2 shared cores, so it is run once (--search-density 0.1) for both densities
    "cpu": dict(limit_train=3000, batch_size=64, channels=8, layers=5, search_epochs=(3, 1, 3),
                eval_epochs=(6, 2, 6), seeds=[0, 1], test_batches=None, val_batches=10, arch_lr=3e-3),
    # sized to about 6 minutes on one modern GPU (estimate; kernel-launch bound at this size)
    "gpu": dict(limit_train=5000, batch_size=128, channels=16, layers=5, search_epochs=(4, 2, 4),
                eval_epochs=(4, 1, 4), seeds=[0, 1], test_batches=None, val_batches=10),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--search-density", type=float, default=None,
                   help="search once at this density and evaluate its cell at every --densities "
                        "(default: one search per density)")
    p.add_argument("--unrolled", action="store_true", help="second-order architect (default: first order)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/prdarts_cifar10_<preset>_<device>.json)")
    p.add_argument("--table", action="store_true", help="print the markdown tables of the results JSON and stop")
    return p.parse_args(argv)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"searches": {}, "arms": {}}


def _save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def run_search(args, preset, bundle, density: float) -> dict[str, Any]:
    pre, sco, fin = preset["search_epochs"]
    cfg = PRDartsConfig(channels=preset["channels"], layers=preset["layers"], density=density, pretrain_epochs=pre,
                        score_epochs=sco, finetune_epochs=fin, unrolled=args.unrolled, seed=0,
                        **({"arch_lr": preset["arch_lr"]} if "arch_lr" in preset else {}))
    t0 = time.perf_counter()
    res = search(cfg, bundle.train, bundle.val, bundle.num_classes, device=args.device,
                 eval_loader=FirstBatches(bundle.val, preset["val_batches"]))
    return {"genotype": res.genotype.to_dict(), "config": cfg.to_dict(), "time_s": time.perf_counter() - t0,
            "load_avg": os.getloadavg(), "param_free_share": res.genotype.parameter_free_share(),
            "history": [{k: h.get(k) for k in ("phase", "phase_epoch", "val_acc", "alpha_entropy_normal",
                                                "alpha_entropy_reduce", "param_free_share", "arch_loss")}
                        for h in res.history]}


def run_arm(args, preset, bundle, genotype: Genotype, density: float, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = EvalNetwork(genotype, preset["channels"], bundle.num_classes, preset["layers"], auxiliary=True)
    dense, scores, fine = preset["eval_epochs"]
    schedule = EvalSchedule(dense, scores, fine, seed=seed)
    t0 = time.perf_counter()
    hist = train_at_density(net, density, CutoutLoader(bundle.train, 16, seed), None, schedule, device=args.device)
    test = evaluate(net, bundle.test_subset, torch.device(args.device))
    macs = sparse_macs(net.cpu(), torch.zeros(1, 3, 32, 32))
    return {"test_acc": test["acc"], "test_n": test["n"], "time_s": time.perf_counter() - t0,
            "load_avg": os.getloadavg(), **count_nonzeros(net), **macs,
            **{f"{k}_inference": v for k, v in inference_nonzeros(net).items()},  # without the training-only head
            "train_acc_last": hist[-1]["train_acc"] if hist else None}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for key, arm in results["arms"].items():
        name, density, _ = key.split("/")
        groups.setdefault(f"{name}/{density}", []).append(arm["test_acc"])
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
            for k, v in sorted(groups.items())}


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per search (time, final alpha entropy, parameter-free share), then one row
    per density x cell (test accuracy mean +- std over seeds, nonzeros, MACs)."""
    rows = ["| sparsity | search time | alpha entropy normal / reduce (max 2.079) | parameter-free ops in the cell |",
            "|---|---|---|---|"]
    for key, s in sorted(results["searches"].items(), key=lambda kv: -float(kv[0])):
        last = s["history"][-1]
        rows.append(f"| {100 * (1 - float(key)):g}% | {s['time_s'] / 60:.1f} min | {last['alpha_entropy_normal']:.4f} / "
                    f"{last['alpha_entropy_reduce']:.4f} | {s['param_free_share']:.2f} |")
    rows += ["", "| sparsity | cell | test acc % (mean ± std) | seeds | nonzero / total weights (inference) "
             "| same with the auxiliary head | MACs (dense kernels) | MACs over nonzeros |", "|---|---|---|---|---|---|---|---|"]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for arm_key, arm in results["arms"].items():
        name, density, _ = arm_key.split("/")
        by.setdefault((density, name), []).append(arm)
    for (density, name), arms in sorted(by.items(), key=lambda kv: (-float(kv[0][0]), kv[0][1])):
        accs = [100 * a["test_acc"] for a in arms]
        origin = results.get("searched_at", {}).get(density, density)
        if name == "searched" and origin != density:
            name = f"searched (at {100 * (1 - float(origin)):g}%)"
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        rows.append(f"| {100 * (1 - float(density)):g}% | {name} | {statistics.mean(accs):.1f}{spread} | {len(arms)} | "
                    f"{arms[0]['nonzero_inference']:,} / {arms[0]['total_inference']:,} | "
                    f"{arms[0]['nonzero']:,} / {arms[0]['total']:,} | {arms[0]['macs'] / 1e6:.2f} M | "
                    f"{arms[0]['nonzero_macs'] / 1e6:.3f} M |")
    return "\n".join(rows)


def _check_same_settings(results: dict, out: Path, **now) -> None:
    """Stop when `out` holds records of a run with other settings: they would be resumed as this
    run's (searches and arms are keyed by density and seed only) and the header overwritten."""
    if not (results.get("searches") or results.get("arms")):
        return
    differ = {k: (results.get(k), v) for k, v in now.items()
              if k in results and json.loads(json.dumps(results[k])) != json.loads(json.dumps(v))}
    if differ:
        text = ", ".join(f"{k}: {old!r} in the file, {new!r} now" for k, (old, new) in differ.items())
        raise SystemExit(f"{out} holds records made with other settings ({text}); give another --out, or the "
                         "same settings to resume it")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out or REPO / "benchmarks" / "results" / f"prdarts_cifar10_{args.preset}_{args.device.split(':')[0]}.json")
    if args.table:
        print(table(_load(out)))
        return
    torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = _load(out)
    _check_same_settings(results, out, preset=args.preset, settings=preset, unrolled=args.unrolled)
    results.update(preset=args.preset, settings=preset, unrolled=args.unrolled)
    # every run that wrote into the file, with where it ran (records of several runs may sit side by side)
    results.setdefault("runs", []).append({"device": args.device, "threads": args.threads,
                                           "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                                           "environment": environment()})
    results.update(device=args.device, threads=args.threads, environment=results["runs"][-1]["environment"])
    bundle = load_data(DataConfig(name="imagefolder", root=args.data, val_fraction=0.5,
                                  limit_train=preset["limit_train"], batch_size=preset["batch_size"],
                                  eval_batch_size=preset["batch_size"], device=args.device, seed=0))
    # the test split is class-sorted: a seeded random subset, the same for every arm
    bundle.test_subset = random_batches(bundle.test, preset["test_batches"], seed=0)
    for density in args.densities:
        key = f"{density:g}"
        searched_at = key if args.search_density is None else f"{args.search_density:g}"
        if searched_at not in results["searches"]:
            results["searches"][searched_at] = run_search(args, preset, bundle, float(searched_at))
            _save(out, results)
            print(f"search density {searched_at}: {results['searches'][searched_at]['genotype']}", flush=True)
        results.setdefault("searched_at", {})[key] = searched_at
        genotypes = {"searched": Genotype.from_dict(results["searches"][searched_at]["genotype"]), "darts_v2": DARTS_V2,
                     "random_a": random_genotype(101), "random_b": random_genotype(202)}
        for seed in preset["seeds"]:  # seeds outermost within a density: arms interleave in time
            for name, geno in genotypes.items():
                arm = f"{name}/{key}/{seed}"
                if arm in results["arms"]:
                    continue
                results["arms"][arm] = run_arm(args, preset, bundle, geno, density, seed)
                results["summary"] = summarise(results)
                _save(out, results)
                print(f"{arm}: test acc {results['arms'][arm]['test_acc']:.4f} "
                      f"({results['arms'][arm]['time_s']:.0f} s)", flush=True)
    results["summary"] = summarise(results)
    _save(out, results)
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
