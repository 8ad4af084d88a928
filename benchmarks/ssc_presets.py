"""The SSC preset table: per family and target, the preset, its 3x3 layer reduction, and the
whole-model parameter / MAC reductions on CIFAR ResNet-20, ResNet-56 and VGG-16-BN (layers a
preset does not divide take the nearest fitting preset; the stem, BN and classifier stay dense).

    python benchmarks/ssc_presets.py --out benchmarks/results/ssc_presets.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.ssc import PRESETS, SSCConfig, layer_reduction, preset_for  # noqa: E402
from prunekit.models import create_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/ssc_presets.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 32, 32)
    rows = []
    for family, table in PRESETS.items():
        for red in table:
            spec = preset_for(red, family)
            row = {"family": family, "target": red, "preset": spec.to_dict(), "layer_reduction": layer_reduction(spec)}
            for name in ("resnet20", "resnet56", "vgg16_bn"):
                model = create_model(name, num_classes=10)
                r = prune_(model, SSCConfig(reduction=red, family=family), x)
                after = count_cost(model, x)
                row[name] = {"params": after.params, "params_reduction": r.cost_before.params / after.params,
                             "macs_reduction": r.cost_before.macs / after.macs, "refitted": len(r.metrics["refitted"])}
            rows.append(row)
            print(f"{family:<8} {red:>3}x  G={spec.groups} P_s={spec.spatial_period} P_p={spec.point_period}  "
                  f"layer {row['layer_reduction']:.1f}x  " + "  ".join(
                      f"{n} {row[n]['params_reduction']:.2f}x/{row[n]['macs_reduction']:.2f}x" for n in
                      ("resnet20", "resnet56", "vgg16_bn")), flush=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/ssc_presets.py", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
