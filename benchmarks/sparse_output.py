"""What SLR/ADMM's outputs buy on disk and in time: nonzeros, file size and measured latency.

For each model and sparsity the weights are hard-pruned with the SLR projection (`hard_prune_`,
the same call SLR ends with; weights are random, which changes neither sizes nor times), then:

- nonzeros of the pruned tensors, and the whole model's file size three ways: dense safetensors
  of the baked weights, prunekit's compact form (`save_sparse`: kept values + packed bit mask),
  and, for filter sparsity, the physically smaller model (`shrink_` + `save_pruned`);
- latency of the dense model next to the pruned one (interleaved, median of --repeats): masks
  baked into plain dense tensors for irregular and N:M (the arithmetic is the same, so no
  speed-up is expected on a CPU), the shrunk network for filter sparsity;
- on an Ampere-or-newer GPU also the 2:4 model with PyTorch's semi-structured kernels
  (`to_semi_structured_`, linear layers, float16); elsewhere that row says why it was skipped.

    python benchmarks/sparse_output.py                 # CPU, float32, batch 1 and 32
Writes benchmarks/results/sparse_output.json and docs/sparse_output.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit.core.environment import environment
from prunekit.cost.latency import LatencyConfig, compare_latency
from prunekit.cost.macs import count_cost
from prunekit.methods.slr import SLRConfig, hard_prune_, shrink_
from prunekit.models import create_model
from prunekit.surgery.masks import remove_masks
from prunekit.surgery.persist import save_pruned
from prunekit.surgery.sparse_io import save_sparse, to_semi_structured_

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    """Linear layers wide enough for 2:4 kernels to matter (a transformer MLP block's shapes)."""

    def __init__(self, width: int = 1024, depth: int = 4):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


MODELS = {  # name -> (builder, per-sample input shape, layers pruned: model -> names (None: SLR's default))
    "resnet56": (lambda: create_model("resnet56", num_classes=10), (3, 32, 32), None),
    "mlp1024": (MLP, (64, 1024), _linears),
}
SETTINGS = {  # label -> SLRConfig fields
    "irregular 70%": {"sparsity_type": "irregular", "sparsity": 0.7},
    "irregular 90%": {"sparsity_type": "irregular", "sparsity": 0.9},
    "2:4": {"sparsity_type": "nm", "n": 2, "m": 4},
    "filter 50%": {"sparsity_type": "filter", "sparsity": 0.5},
}


def _size(write) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        write(path)
        return os.path.getsize(path)


def _dense_size(model: nn.Module) -> int:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return _size(lambda p: save_file(state, p))


def one(name: str, label: str, args) -> dict[str, Any]:
    build, shape, layers = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    x = torch.randn(1, *shape)
    pruned = copy.deepcopy(dense)
    cfg = SLRConfig(**SETTINGS[label], layers=layers(dense) if layers else None)
    masks = hard_prune_(pruned, cfg, example_inputs=x)
    kept = sum(int(m.sum()) for k, m in masks.items() if k.endswith("weight"))
    total = sum(m.numel() for k, m in masks.items() if k.endswith("weight"))
    row: dict[str, Any] = {"model": name, "setting": label, "pruned_weights": total, "kept_weights": kept,
                           "sparsity": 1 - kept / total, "file_dense": _dense_size(dense)}
    row["file_sparse"] = _size(lambda p: save_sparse(pruned, p))
    remove_masks(pruned, bake=True)
    if SETTINGS[label]["sparsity_type"] == "filter":
        plan = shrink_(pruned, x)
        row["file_shrunk"] = _size(lambda p: save_pruned(pruned, plan, p))
    row["macs_dense"], row["macs_pruned"] = count_cost(dense, x).macs, count_cost(pruned, x).macs
    row["latency"] = {}
    for batch in args.batches:
        cfg_lat = LatencyConfig(batch_size=batch, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
        cmp = compare_latency({"dense": dense, "pruned": pruned}, shape, cfg_lat)
        row["latency"][str(batch)] = {k: {"median_ms": r.median_ms, "min_ms": r.min_ms, "max_ms": r.max_ms}
                                      for k, r in cmp.results.items()}
        row["latency"][str(batch)]["speedup"] = 1 / cmp.ratios["pruned"]
        print(f"{name:9s} {label:14s} batch {batch:3d}: dense {cmp.results['dense'].median_ms:.2f} ms, "
              f"pruned {cmp.results['pruned'].median_ms:.2f} ms", flush=True)
    return row


def semi_structured(args) -> dict[str, Any]:
    """2:4 linear layers on sparse tensor cores, float16, against the same dense model."""
    build, shape, layers = MODELS["mlp1024"]
    torch.manual_seed(0)
    dense = build().eval().cuda().half()
    sparse = copy.deepcopy(dense)
    hard_prune_(sparse, SLRConfig(**SETTINGS["2:4"], layers=layers(dense)))
    converted = to_semi_structured_(sparse)
    out = {"converted_layers": len(converted), "latency": {}}
    for batch in args.batches:
        cfg = LatencyConfig(device="cuda", dtype="float16", batch_size=batch, warmup=args.warmup, repeats=args.repeats)
        cmp = compare_latency({"dense": dense, "2:4": sparse}, shape, cfg)
        out["latency"][str(batch)] = {"dense_ms": cmp.results["dense"].median_ms,
                                      "sparse_ms": cmp.results["2:4"].median_ms, "speedup": 1 / cmp.ratios["2:4"]}
    return out


def markdown(out: dict) -> str:
    env = out["environment"]
    lines = ["# Sparse outputs: size on disk and measured latency", "",
             f"Measured by `python benchmarks/sparse_output.py` on {out['date']}: CPU {env.get('cpu_model')} "
             f"({env.get('cpu_count')} cores, {out['threads']} torch thread(s)), GPU "
             f"{(env.get('cuda') or {}).get('device_name', 'none')}, torch {env.get('torch')}, prunekit commit "
             f"{str(env.get('git_commit'))[:10]}. float32, random weights (sizes and times do not depend on "
             f"the values), hard-pruned with SLR's projection. Latency: median over {out['repeats']} interleaved "
             f"runs after {out['warmup']} warm-up runs; min-max in brackets; speed-up = dense / pruned. *MACs kept* "
             "counts what the kernels compute: the zeros of irregular and N:M tensors are still multiplied by "
             "dense kernels, so only filter sparsity, shrunk to a smaller dense network, removes arithmetic. "
             "*compact file*: `save_sparse` (kept values + 1-bit mask); *shrunk file*: `save_pruned` of the "
             "physically smaller network.", "",
             "| model | setting | sparsity of pruned weights | dense file | compact file | shrunk file | MACs kept | "
             + " | ".join(f"batch {b}: dense ms / pruned ms (speed-up)" for b in out["batches"]) + " |",
             "|---" * (7 + len(out["batches"])) + "|"]
    for r in out["rows"]:
        lat = []
        for b in out["batches"]:
            d = r["latency"][str(b)]
            lat.append(f"{d['dense']['median_ms']:.2f} ({d['dense']['min_ms']:.2f}-{d['dense']['max_ms']:.2f}) / "
                       f"{d['pruned']['median_ms']:.2f} ({d['pruned']['min_ms']:.2f}-{d['pruned']['max_ms']:.2f}) "
                       f"({d['speedup']:.2f}x)")
        shrunk = f"{r['file_shrunk'] / 2**20:.2f} MiB" if "file_shrunk" in r else "-"
        lines.append(f"| {r['model']} | {r['setting']} | {r['sparsity']:.3f} | {r['file_dense'] / 2**20:.2f} MiB | "
                     f"{r['file_sparse'] / 2**20:.2f} MiB ({r['file_sparse'] / r['file_dense']:.2f}x) | {shrunk} | "
                     f"{r['macs_pruned'] / r['macs_dense']:.2f} | " + " | ".join(lat) + " |")
    semi = out["semi_structured"]
    lines += ["", "2:4 with PyTorch's semi-structured kernels (float16, linear layers of mlp1024): " +
              (semi["skipped"] if "skipped" in semi else
               "; ".join(f"batch {b}: dense {v['dense_ms']:.3f} ms, 2:4 {v['sparse_ms']:.3f} ms ({v['speedup']:.2f}x)"
                         for b, v in semi["latency"].items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rows = [one(name, label, args) for name in MODELS for label in SETTINGS
            if not (name == "mlp1024" and label == "filter 50%")]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        semi = semi_structured(args)
    else:
        semi = {"skipped": "not run: needs an NVIDIA GPU of compute capability 8.0 or newer (none on this machine)"}
    out = {"environment": environment(ROOT), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": args.threads,
           "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup, "dtype": "float32",
           "rows": rows, "semi_structured": semi, "wall_seconds": round(time.perf_counter() - started, 1)}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "sparse_output.json").write_text(json.dumps(out, indent=1))
    (ROOT / "docs" / "sparse_output.md").write_text(markdown(out))
    return out


if __name__ == "__main__":
    main()
