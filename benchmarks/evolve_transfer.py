"""Transfer benchmark of evolved pruning functions: prune 40% of the block-internal channels of a
trained CIFAR-10 ResNet with each criterion, fine-tune every arm the same way, compare.

Arms (default): ga_func2 (the paper's Eq. 3), the 7 seed metrics (abs_snr, fdr, sym_div, t_stat,
seed_l1, seed_l2, seed_geo_median), random, and the core's l1, fpgm and taylor; add any evolved
function with --extra-arm 'evolved:samples=512:<text>' (a text criterion reads 256 images unless told). Block-internal = the groups of each block's first conv
(conv1 -> bn1 -> relu -> conv2 input); residual streams and the stem are kept, so every arm has
the same parameters and MACs. Scores use the first --calib training images (no augmentation),
the same for every arm. Arms are interleaved seed by seed (load drifts hit all arms alike), and
every finished (arm, seed) is appended to the results JSON at once: a killed run resumes. Each
fine-tune checkpoints every epoch under `<out>.ckpt/<arm>_seed<n>/` (removed once its record is
written), so a run killed mid-arm resumes from that arm's last finished epoch.

Defaults follow the shared CPU protocol (prunekit.protocol: ResNet-20, batch 256,
15 fine-tune epochs one-cycle to lr 0.05, label smoothing 0.1, seeds 0-2, dense weights from
benchmarks/protocol_dense.py).

    # real run (GPU: about 12 arms x 3 seeds x ~1 min on an H200)
    python benchmarks/evolve_transfer.py --device cuda
    # CPU smoke (one core, minutes): a 1-epoch dense model on 512 images, 1 fine-tune epoch
    python benchmarks/evolve_transfer.py --smoke --out benchmarks/results/evolve_transfer_smoke.json
    # table (mean +- std over seeds) and the paper's claim checked, from one or more result files
    python benchmarks/evolve_transfer.py --report benchmarks/results/evolve_transfer*.json
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunekit.core.environment import environment  # noqa: E402
from prunekit.data import DataConfig, load_data  # noqa: E402
from prunekit.engine import evaluate, train  # noqa: E402
from prunekit.engine.train import TrainConfig  # noqa: E402
from prunekit.importance.context import ScoreContext  # noqa: E402
from prunekit.importance.criteria import resolve_criterion  # noqa: E402
from prunekit.importance.select import select_removal  # noqa: E402
from prunekit.models import create_model  # noqa: E402
from prunekit.surgery.prepared import prepare_pruning  # noqa: E402
from prunekit.surgery.shrink import remove_channels_  # noqa: E402

ARMS = ["ga_func2", "abs_snr", "fdr", "sym_div", "t_stat", "seed_l1", "seed_l2", "seed_geo_median",
        "random", "l1", "fpgm", "taylor"]
INTERNAL = re.compile(r"layer\d+\.\d+\.conv1$")


def protocol_settings() -> dict:
    """The shared protocol's numbers (prunekit.protocol)."""
    from prunekit.protocol import PROTOCOL
    return {"model": PROTOCOL.model, "data_root": PROTOCOL.data_root, "batch": PROTOCOL.batch_size,
            "dense": PROTOCOL.dense_path, "finetune": PROTOCOL.finetune.to_dict(), "seeds": list(PROTOCOL.seeds),
            "source": "prunekit.protocol"}


def parse_args(argv=None) -> argparse.Namespace:
    proto = protocol_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=str(REPO / proto["data_root"]))
    p.add_argument("--dense", default=str(REPO / proto["dense"]), help="trained dense weights (.safetensors)")
    p.add_argument("--arms", nargs="*", default=ARMS, help="criteria to compare (none: only --extra-arm)")
    p.add_argument("--extra-arm", action="append", default=[], help="more criteria, e.g. 'evolved:samples=512:<text>'")
    p.add_argument("--seeds", nargs="+", type=int, default=proto["seeds"])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--epochs", type=int, default=proto["finetune"]["epochs"],
                   help="fine-tune epochs per arm (0: score the pruned networks as they are)")
    p.add_argument("--calib", type=int, default=512, help="calibration images for data criteria")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny everything; trains its own 1-epoch dense model")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/evolve_transfer.json"))
    p.add_argument("--report", nargs="+", default=None, help="print the table of these result files and stop")
    args = p.parse_args(argv)
    args.proto = proto
    if args.smoke:
        args.limit_train, args.epochs, args.seeds, args.calib = 512, 1, [0], 128
        args.dense = str(REPO / "local/evolve_transfer_smoke_dense.safetensors")  # never committed
    return args


def load_bundle(args, augment: bool):
    return load_data(DataConfig(name="imagefolder", root=args.data, batch_size=args.proto["batch"], val_fraction=0.1,
                                augment=augment, limit_train=args.limit_train,
                                device="cuda" if args.device.startswith("cuda") else "cpu"))


def dense_model(args, bundle) -> torch.nn.Module:
    from safetensors.torch import load_model, save_model

    model = create_model(args.proto["model"], bundle.num_classes)
    if not Path(args.dense).exists():
        if not args.smoke:
            raise SystemExit(f"{args.dense} is missing: train it with benchmarks/protocol_dense.py (or pass --dense)")
        train(model, bundle.train, None, TrainConfig(epochs=1, lr=0.05, log_every=0), progress=False, device=args.device)
        save_model(model.cpu(), args.dense)
    load_model(model, args.dense)
    return model.to(args.device).eval()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_arm(args, crit_name, seed, dense, prepared, calib, bundle, ckpt: Path | None = None) -> dict:
    """Prune a copy of `dense` with `crit_name`, fine-tune it (checkpointed every epoch in `ckpt`:
    a killed run resumes from its last epoch), evaluate; returns the arm's record."""
    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    groups = [g for g in prepared.graph.prunable_groups() if INTERNAL.search(g.name)]
    ctx = ScoreContext(model, batches=calib, seed=seed, graph=prepared.graph)
    crit = resolve_criterion(crit_name)
    scores = {g.name: crit(g, ctx).detach().cpu() for g in groups}
    remove_channels_(model, prepared.graph, select_removal(prepared.graph, scores, args.ratio))
    params = sum(p.numel() for p in model.parameters())
    pruned_val = evaluate(model, bundle.val, args.device)["acc"]  # the damage before any fine-tuning
    if args.epochs > 0:  # --epochs 0: the damage of each criterion alone, no fine-tuning
        ft = TrainConfig.from_dict({**args.proto["finetune"], "epochs": args.epochs, "seed": seed})
        loader = copy.copy(bundle.train)
        loader.seed = seed  # the fine-tune seed also sets the batch order
        res = train(model, loader, None, ft, progress=False, device=args.device, ckpt_dir=ckpt, resume=ckpt is not None)
        resumed = res.start_epoch
    else:
        resumed = 0
    val = evaluate(model, bundle.val, args.device)["acc"] if args.epochs > 0 else pruned_val
    test = evaluate(model, bundle.test, args.device)["acc"]
    return {"arm": crit_name, "seed": seed, "val_acc": val, "test_acc": test, "pruned_val_acc": pruned_val,
            "params": params,
            "seconds": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg()[0],
            **({"resumed_at_epoch": resumed} if resumed else {})}  # then `seconds` covers this process only


# Settings that change what an arm's accuracy means; files that differ in them are never pooled.
SETTING = ("epochs", "ratio", "calib", "limit_train", "smoke")


def _setting(data: dict) -> dict:
    settings = data.get("settings", {})
    key = {k: settings.get(k) for k in SETTING}
    if settings.get("dense_sha256") is not None:
        key["dense_sha256"] = settings["dense_sha256"]
    return key


def report(paths: list[str]) -> None:
    """One table per setting (files of the same setting are pooled): per arm val/test mean +- std
    over seeds, and the paper's claim: Eq. 3 at least as good as the best seed metric (chosen on
    validation) within 1 std, and above random by more than 2 std, on test."""
    groups: list[tuple[dict, list[str], list[dict]]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        key = _setting(data)
        same = next((g for g in groups if g[0] == key), None)
        if same is None:
            groups.append((key, [p], list(data["records"])))
        else:
            same[1].append(p)
            same[2].extend(data["records"])
    for i, (key, files, recs) in enumerate(groups):
        if len(groups) > 1:
            print(("\n" if i else "") + f"Setting {key} ({', '.join(files)}):\n")
        _report_records(recs)


def _report_records(recs: list[dict]) -> None:
    import statistics

    arms: dict[str, dict[str, list[float]]] = {}
    for r in recs:
        arms.setdefault(r["arm"], {"val": [], "test": [], "pruned": []})
        arms[r["arm"]]["val"].append(r["val_acc"])
        arms[r["arm"]]["test"].append(r["test_acc"])
        if r.get("pruned_val_acc") is not None:  # recorded by later runs only
            arms[r["arm"]]["pruned"].append(r["pruned_val_acc"])
    stat = {a: {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for k, v in d.items() if v}
            for a, d in arms.items()}
    spread = lambda m, s: f"{100 * m:.2f}" + ("" if s is None else f" ± {100 * s:.2f}")  # no spread from one seed
    print("| criterion | n | val acc (%) | test acc (%) | val acc right after pruning (%, n) |\n|---|---|---|---|---|")
    for a in sorted(stat, key=lambda a: -stat[a]["test"][0]):
        pr = stat[a].get("pruned")
        shown = f"{spread(*pr)} ({len(arms[a]['pruned'])})" if pr else "-"
        print(f"| {a} | {len(arms[a]['test'])} | {spread(*stat[a]['val'])} | {spread(*stat[a]['test'])} | {shown} |")
    seeds = [a for a in ("abs_snr", "fdr", "sym_div", "t_stat", "seed_l1", "seed_l2", "seed_geo_median") if a in stat]
    if "ga_func2" in stat and seeds and "random" in stat:
        name = max(seeds, key=lambda a: stat[a]["val"][0])  # chosen on validation, compared on test
        (em, es), (bm, bs), (rm, rs) = stat["ga_func2"]["test"], stat[name]["test"], stat["random"]["test"]
        print(f"\nEq. 3 - best seed on validation ({name}), on test: {100 * (em - bm):+.2f} points; "
              f"Eq. 3 - random: {100 * (em - rm):+.2f} points (test accuracy)")
        if None in (es, bs, rs):
            few = sorted(a for a in ("ga_func2", name, "random") if stat[a]["test"][1] is None)
            print(f"Claim not checked: {', '.join(few)} ran one seed; the check needs a spread (two or more seeds).")
            return
        print(f"Within 1 std of the best seed (std {100 * es:.2f} / {100 * bs:.2f}): {em >= bm - bs}; "
              f"1-std bands overlap: {em + es >= bm - bs}; above random by more than 2 std: {em - rm > 2 * max(es, rs)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.exists() else {"records": []}
    have = {(r["arm"], r["seed"]) for r in done["records"]}
    bundle = load_bundle(args, augment=True)
    dense = dense_model(args, bundle)
    calib, n = [], 0
    for x, y in load_bundle(args, augment=False).train:
        calib.append((x, y))
        n += len(y)
        if n >= args.calib:
            break
    prepared = prepare_pruning(dense, calib[0][0][:1])
    sha = file_sha256(args.dense)
    earlier = done.get("settings", {}).get("dense_sha256")
    if earlier is not None and earlier != sha:
        raise SystemExit(f"{out} holds arms pruned from another dense model (sha256 {earlier[:12]}..., this one "
                         f"{sha[:12]}...): every arm must start from the same weights; write to a new --out")
    changed = [k for k in SETTING if done["records"] and k in done.get("settings", {})
               and done["settings"][k] != getattr(args, k)]
    if changed:
        was = ", ".join(f"{k}={done['settings'][k]}" for k in changed)
        raise SystemExit(f"{out} holds arms run with other settings ({was}): write to a new --out")
    done["settings"] = {k: v for k, v in vars(args).items() if k != "proto"} | {
        "protocol": args.proto, "environment": environment(), "dense_sha256": sha}
    # each (arm, seed) checkpoints every fine-tune epoch here, removed once its record is written
    ckpt_root = out.parent / (out.name + ".ckpt")
    for seed in args.seeds:  # interleaved: every arm of a seed before the next seed
        for arm in args.arms + args.extra_arm:
            if (arm, seed) in have:
                continue
            ckpt = ckpt_root / f"{arm}_seed{seed}"
            rec = run_arm(args, arm, seed, dense, prepared, calib, bundle, ckpt)
            print(json.dumps(rec), flush=True)
            done["records"].append(rec)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1, default=str))
            tmp.replace(out)
            shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
