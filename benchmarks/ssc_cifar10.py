"""CIFAR-10 from scratch at equal parameters: SSC presets vs SNIP, GraSP, SynFlow, random and a
narrowed dense network, at 4x and 8x (and any other) reduction, several seeds; resumable JSON.

Every arm starts from a freshly initialised model (seeded), is pruned or converted at
initialisation, and trains with the shared protocol's schedule (`prunekit.protocol.PROTOCOL`:
its from-scratch `dense_train`, 30 epochs one-cycle SGD, batch 256, label smoothing 0.1), then
reports validation and test accuracy. Each (arm, seed) checkpoints every epoch under
`<out>.ckpt/` (removed once its record is written): a killed run resumes where it stopped when
the same command is run again, with the result of an uninterrupted run. Parameter budget per reduction = the whole-model
parameter count of the SSC "het" preset; PaI arms get the global sparsity over conv/Linear
weights that leaves exactly that many nonzero parameters; the narrowed dense arm is
MagnitudeConfig(params_fraction=budget/dense, scope="local", round_to=None) (uniformly thinner, at or just
below the budget). SSC arms train in the masked execution (`--execution`, default "masked": one
dense conv on the masked weight, the same function as the structured execution within 1e-5, and
1.8x faster per training step on this CPU: 204 against 363 ms, ResNet-20 het 4x, batch 64, one
thread); the execution is recorded. Each record holds params (nonzero) and MACs (nonzero: each masked layer's
MACs times its density), so equal-parameter and equal-MAC views both come from the JSON.
`--match macs` gives the pruning-at-initialisation arms SSC het's nonzero MACs instead of its
parameters (the sparsity found by bisection; records keyed `<arm>@macs`).

Real run (GPU, all arms, 4x and 8x, 2 seeds; ~25 arms x 30 epochs of ResNet-20):
    python benchmarks/ssc_cifar10.py --device cuda --seeds 0 1 --reductions 4 8 \
        --out benchmarks/results/ssc_cifar10.json
Smoke run (CPU, a minute):
    python benchmarks/ssc_cifar10.py --smoke --out benchmarks/results/ssc_cifar10_smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.data import load_data  # noqa: E402
from prunekit.engine.evaluate import evaluate  # noqa: E402
from prunekit.engine.train import train  # noqa: E402
from prunekit.importance.targets import target_weights  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.methods.pai import GraSPConfig, RandomInitConfig, SNIPConfig, SynFlowConfig  # noqa: E402
from prunekit.methods.ssc import SSCConfig  # noqa: E402
from prunekit.models import create_model  # noqa: E402
from prunekit.protocol import PROTOCOL  # noqa: E402

ARMS = ["dense", "ssc_het", "ssc_grouped", "ssc_block", "snip", "grasp", "synflow", "random", "narrow"]
PAI = {"snip": SNIPConfig, "grasp": GraSPConfig, "synflow": SynFlowConfig, "random": RandomInitConfig}
# SNIP and GraSP scored in training mode (BatchNorm on the calibration batch's statistics), as
# GraSP's reference code scores; the default arms score in eval mode. Not in the default run.
TRAIN_MODE_ARMS = ["snip_train", "grasp_train"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=PROTOCOL.model)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS + TRAIN_MODE_ARMS)
    ap.add_argument("--reductions", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--synflow-iterations", type=int, default=100)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    ap.add_argument("--match", default="params", choices=("params", "macs"),
                    help="what the pruning-at-init arms match of SSC het: its parameter count (default) or its "
                         "nonzero MACs (a bisection over the sparsity; records keyed '<arm>@macs')")
    ap.add_argument("--execution", default="masked", choices=("masked", "structured"),
                    help="SSC arms' execution while training and evaluating (same outputs; masked trains faster)")
    ap.add_argument("--smoke", action="store_true", help="512 images, 1 epoch, arms ssc_het/snip/synflow/narrow, 4x")
    ap.add_argument("--out", default="benchmarks/results/ssc_cifar10.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit_train, args.epochs, args.seeds, args.reductions = 512, 1, [0], [4]
        args.arms, args.synflow_iterations = ["ssc_het", "snip", "synflow", "narrow"], 10
    unmatched = [a for a in args.arms if a not in PAI and a not in TRAIN_MODE_ARMS]
    if args.match == "macs" and unmatched:
        ap.error(f"--match macs applies to the pruning-at-initialisation arms only, not {unmatched}")
    return args


def build_arm(arm: str, reduction: float, seed: int, args, example, calib) -> tuple[torch.nn.Module, dict]:
    """A fresh seeded model, pruned/converted at initialisation for `arm`; returns (model, record)."""
    def fresh():
        torch.manual_seed(seed)
        return create_model(args.model, num_classes=10)

    dense_params = count_cost(fresh(), example).params
    budget = count_cost(_ssc(fresh(), reduction, "het", example), example).params
    model, rec = fresh(), {}
    if arm == "dense":
        pass
    elif arm.startswith("ssc_"):
        r = prune_(model, SSCConfig(reduction=reduction, family=arm[4:], execution=args.execution), example)
        rec.update(preset=r.metrics["preset"], execution=args.execution)
    elif arm in PAI or arm in TRAIN_MODE_ARMS:
        weights = sum(getattr(model.get_submodule(m), p).numel() for m, p in target_weights(model).values())
        sparsity = (dense_params - budget) / weights
        extra = {"iterations": args.synflow_iterations} if arm == "synflow" else {}
        if arm in TRAIN_MODE_ARMS:
            arm, extra = arm[:-len("_train")], {"score_mode": "train"}
            rec["score_mode"] = "train"

        def pai(model, sparsity):
            return prune_(model, PAI[arm](sparsity=sparsity, **extra), example, batches=calib)

        if args.match == "macs":
            macs_budget = count_cost(_ssc(fresh(), reduction, "het", example), example).macs
            sparsity = _sparsity_for_macs(lambda s: pai(fresh(), s).metrics["macs_nonzero"], sparsity, macs_budget)
            rec.update(match="macs", macs_budget=macs_budget)
        r = pai(model, sparsity)
        rec.update(sparsity=sparsity, params_nonzero=r.metrics["params_nonzero"], macs_nonzero=r.metrics["macs_nonzero"])
    elif arm == "narrow":
        prune_(model, MagnitudeConfig(params_fraction=budget / dense_params, scope="local", probe=False,
                                      round_to=None), example)
    cost = count_cost(model, example)
    rec.setdefault("params_nonzero", cost.params)
    rec.setdefault("macs_nonzero", cost.macs)
    rec.update(params_dense=dense_params, budget=budget)
    return model, rec


def _sparsity_for_macs(macs_at, low: float, budget: int, steps: int = 24) -> float:
    """The lowest sparsity (searched above `low`, the equal-parameter one) whose masks keep at most
    `budget` nonzero MACs: bisection, as a higher sparsity never keeps more MACs (one score, one
    threshold; SynFlow's rounds make this near-monotone). Stops within 0.2% of the budget."""
    if macs_at(low) <= budget:
        return low
    high = 1.0 - 1e-4
    if macs_at(high) > budget:
        raise SystemExit(f"no sparsity below {high} keeps at most {budget:,} MACs")
    for _ in range(steps):
        mid = (low + high) / 2
        macs = macs_at(mid)
        if macs <= budget:
            high = mid
            if macs >= 0.998 * budget:
                break
        else:
            low = mid
    return high


def _ssc(model, reduction, family, example):
    prune_(model, SSCConfig(reduction=reduction, family=family), example)
    return model


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else None
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"records": {}}
    ckpt_root = out.parent / (out.name + ".ckpt")
    cfg = PROTOCOL.dense_train if args.epochs is None else PROTOCOL.dense_train.replace(epochs=args.epochs)
    data["setup"] = {"protocol_schedule": cfg.to_dict(), "model": args.model, "device": args.device,
                     "limit_train": args.limit_train, "synflow_iterations": args.synflow_iterations, "execution": args.execution,
                     "command": "python benchmarks/ssc_cifar10.py " + " ".join(sys.argv[1:])}
    dc = PROTOCOL.data_config(device=args.device, root=args.data).replace(limit_train=args.limit_train)
    bundle = load_data(dc)
    example = next(iter(bundle.val))[0][:2].cpu()
    calib = [tuple(t.cpu() for t in next(iter(bundle.train)))]
    for reduction in args.reductions:
        for arm in args.arms:
            for seed in args.seeds:
                matched = args.match == "macs" and (arm in PAI or arm in TRAIN_MODE_ARMS)
                key = f"{args.model}:{reduction:g}x:{arm}{'@macs' if matched else ''}:seed{seed}"
                if key in data["records"] or (arm == "dense" and reduction != args.reductions[0]):
                    continue
                t0 = time.time()
                model, rec = build_arm(arm, reduction, seed, args, example, calib)
                ckpt = ckpt_root / key.replace(":", "_")
                res = train(model, bundle.train, bundle.val, cfg.replace(seed=seed), device=args.device,
                            progress=False, ckpt_dir=ckpt, resume=True)
                rec.update(val_acc=evaluate(model, bundle.val)["acc"], test_acc=evaluate(model, bundle.test)["acc"],
                           seconds=time.time() - t0, loadavg=os.getloadavg()[0], epochs=cfg.epochs)
                if res.start_epoch:  # `seconds` covers this process only
                    rec["resumed_at_epoch"] = res.start_epoch
                data["records"][key] = rec
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1))
                shutil.rmtree(ckpt, ignore_errors=True)
                print(f"{key:<34} params {rec['params_nonzero']:>9,}  MACs {rec['macs_nonzero']:>12,}  "
                      f"test {rec['test_acc']:.4f}  ({rec['seconds']:.0f} s)", flush=True)
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    return out


if __name__ == "__main__":
    main()
