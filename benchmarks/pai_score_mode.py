"""SNIP and GraSP masks scored in eval mode (prunekit's default) against training mode (BatchNorm
on the calibration batch's statistics, as GraSP's reference code scores): how many kept
weights the two masks share, where they put them, and how many conv filters they leave empty. For scale, the eval-mode masks of two
different calibration batches (the protocol's first and second training batch) are compared too.

The models, sparsities and calibration batch are those of benchmarks/ssc_cifar10.py (ResNet-20
at a fresh seeded initialisation, the global sparsity that leaves the SSC "het" preset's
parameter count at 4x and 8x, the protocol's first training batch of 256 images). Nothing is
trained: this measures the masks only (about a minute on a CPU). Writes JSON and prints a line per case:

    python benchmarks/pai_score_mode.py --out benchmarks/results/pai_score_mode.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from prunekit.data import load_data  # noqa: E402
from prunekit.protocol import PROTOCOL  # noqa: E402
from prunekit.surgery.masks import get_mask, masked_modules  # noqa: E402
from ssc_cifar10 import build_arm  # noqa: E402


def masks_of(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": get_mask(mod, p).bool() for name, mod, p in masked_modules(model)}


def dead_filters(masks: dict[str, torch.Tensor]) -> int:
    """Conv filters (output channels) left with no kept weight."""
    return sum(int((~m.flatten(1).any(1)).sum()) for m in masks.values() if m.dim() == 4)


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    kept = sum(int(m.sum()) for m in a.values())
    shared = sum(int((a[k] & b[k]).sum()) for k in a)
    density = {k: (round(float(a[k].float().mean()), 4), round(float(b[k].float().mean()), 4)) for k in a}
    return {"kept": kept, "shared": shared, "shared_fraction": shared / kept, "density_eval_train": density,
            "dead_filters_eval_train": (dead_filters(a), dead_filters(b)),
            "conv_filters": sum(m.shape[0] for m in a.values() if m.dim() == 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reductions", type=float, nargs="+", default=[4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    ap.add_argument("--out", default="benchmarks/results/pai_score_mode.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bundle = load_data(PROTOCOL.data_config(device="cpu", root=args.data))
    example = next(iter(bundle.val))[0][:2].cpu()
    batches = iter(bundle.train)
    calib = [tuple(t.cpu() for t in next(batches))]
    calib_other = [tuple(t.cpu() for t in next(batches))]
    bench = argparse.Namespace(model=PROTOCOL.model, execution="masked", synflow_iterations=100)
    rows = []
    for reduction in args.reductions:
        for seed in args.seeds:
            for arm in ("snip", "grasp"):
                t0 = time.time()
                ev, rec_ev = build_arm(arm, reduction, seed, bench, example, calib)
                tr, rec_tr = build_arm(arm + "_train", reduction, seed, bench, example, calib)
                other, _ = build_arm(arm, reduction, seed, bench, example, calib_other)
                across = compare(masks_of(ev), masks_of(other))
                row = {"arm": arm, "reduction": reduction, "seed": seed, "sparsity": rec_ev["sparsity"],
                       "macs_nonzero_eval": rec_ev["macs_nonzero"], "macs_nonzero_train": rec_tr["macs_nonzero"],
                       **compare(masks_of(ev), masks_of(tr)),
                       "shared_fraction_eval_other_batch": across["shared_fraction"], "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                print(f"{arm:5s} {reduction:g}x seed {seed}: {row['shared_fraction']:.3f} of the kept weights shared "
                      f"(eval, another batch: {across['shared_fraction']:.3f}); "
                      f"MACs nonzero eval {row['macs_nonzero_eval']:,} / train {row['macs_nonzero_train']:,}; "
                      f"filters with no weight eval / train {row['dead_filters_eval_train']} of {row['conv_filters']}",
                      flush=True)
    out = {"about": " ".join(__doc__.split("\n\n")[0].split()), "command": "python benchmarks/pai_score_mode.py " + " ".join(sys.argv[1:]),
           "device": f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}, 1 thread",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calibration": "first protocol training "
           "batch (256 augmented images)", "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
