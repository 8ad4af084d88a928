"""Prune every torchvision classification model at 50% channels (classifier kept) and report.

For each model: build, prune with the reference magnitude pruner (L2, local, channel_ratio=0.5,
probing on), run a forward, check the output shape is unchanged and parameters dropped.
Writes benchmarks/results/zoo_coverage.json and docs/zoo_coverage.md.

    python benchmarks/zoo_coverage.py            # all models
    python benchmarks/zoo_coverage.py resnet50   # some models
On machines whose torchvision wheel does not match torch, put ../shared/tools on the path first
(this script does it when that folder exists).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOOLS = ROOT.parent / "shared" / "tools"
if SHARED_TOOLS.exists():
    sys.path.insert(0, str(SHARED_TOOLS))
    import torchvision_cpu  # noqa: F401

import torchvision.models as tvm  # noqa: E402

from prunekit.core.environment import environment  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402


def input_size(name: str) -> int:
    return 299 if name.startswith("inception") else 224


def try_model(name: str) -> dict:
    t0 = time.perf_counter()
    model = tvm.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, input_size(name), input_size(name))
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    p0 = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    t2 = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    p1 = sum(p.numel() for p in model.parameters())
    ok = out.shape == ref.shape and p1 < p0
    return {"model": name, "ok": bool(ok), "params_before": p0, "params_after": p1,
            "macs_before": result.cost_before.macs, "macs_after": result.cost_after.macs,
            "prune_seconds": round(t2 - t1, 2), "total_seconds": round(time.perf_counter() - t0, 2)}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    rows = []
    for name in names:
        try:
            row = try_model(name)
        except Exception as err:  # report every failure, keep going
            row = {"model": name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        rows.append(row)
        print(("OK  " if row["ok"] else "FAIL") + f" {name} {row.get('error', '')}", flush=True)
    out = {"environment": environment(), "config": MagnitudeConfig(channel_ratio=0.5).to_dict(), "rows": rows,
           "passed": sum(r["ok"] for r in rows), "total": len(rows)}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "zoo_coverage.json").write_text(json.dumps(out, indent=1))
    if len(names) == len(tvm.list_models(module=tvm)):
        write_markdown(out)


def write_markdown(out: dict) -> None:
    env = out["environment"]
    lines = ["# torchvision model-zoo coverage", "",
             f"{out['passed']}/{out['total']} classification models pruned at 50% channels (magnitude L2, local, "
             "classifier kept): forward runs, output shape unchanged, parameters drop.",
             f"Produced by `python benchmarks/zoo_coverage.py` on {env.get('cpu_model')}, torch {env.get('torch')}, "
             "batch 1, float32, one run per model.", "",
             "| model | ok | params before | params after | MACs before | MACs after | prune s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if r["ok"]:
            lines.append(f"| {r['model']} | yes | {r['params_before']/1e6:.2f}M | {r['params_after']/1e6:.2f}M | "
                         f"{r['macs_before']/1e9:.2f}G | {r['macs_after']/1e9:.2f}G | {r['prune_seconds']} | |")
        else:
            lines.append(f"| {r['model']} | no | | | | | | {r.get('error', 'check failed')} |")
    (ROOT / "docs" / "zoo_coverage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or tvm.list_models(module=tvm))
