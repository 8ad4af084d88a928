"""Latency of SSC layers and SSC-converted models: structured execution vs dense vs masked.

For every case three models run interleaved in one `compare_latency` call: the dense original,
the SSC model with the structured execution (grouped k x k + grouped 1x1 over a channel
permutation) and the same SSC model with the masked execution (one dense conv on the masked
weight: equal width, equal work to dense). Reported per case: MAC reduction (dense / real
taps), speed-up of structured over dense (median), and their ratio against the goal of 0.6.

CPU (default, one thread, as in docs/ssc.md):
    python benchmarks/ssc_speed.py --out benchmarks/results/ssc_speed_cpu.json
GPU (structured vs dense, batch 1/16/256; a few minutes on one GPU):
    python benchmarks/ssc_speed.py --device cuda --batches 1 16 256 --repeats 100 \
        --out benchmarks/results/ssc_speed_cuda.json
Results are written after every case (rerunning skips finished cases).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.cost.latency import LatencyConfig, compare_latency
from prunekit.cost.macs import count_cost
from prunekit.layers.ssc import SSCConv2d
from prunekit.layers.ssc_patterns import SSCSpec
from prunekit.methods import prune_
from prunekit.methods.ssc import SSCConfig, fit_preset, preset_for
from prunekit.models import create_model

# (name, channels, spatial size): ResNet-20 stages and VGG layers at CIFAR resolution
LAYER_SHAPES = [("r20_s1", 16, 32), ("r20_s3", 64, 8), ("vgg_256", 256, 8), ("vgg_512", 512, 4)]
LAYER_PRESETS = [("het", 2), ("het", 4), ("het", 8), ("het", 16), ("grouped", 8)]
MODELS = [("resnet20", "het", 4), ("resnet20", "het", 8), ("vgg16_bn", "het", 4), ("vgg16_bn", "het", 8),
          ("vgg16_bn", "het", 16)]


def _with_execution(model: nn.Module, execution: str) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, SSCConv2d):
            m.execution = execution
    return twin


def layer_case(channels: int, size: int, spec: SSCSpec):
    torch.manual_seed(0)
    spec = fit_preset(spec, channels, channels)  # as the conversion does for layers a preset does not divide
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    ssc = SSCConv2d(channels, channels, 3, spec, padding=1, bias=False)
    macs_dense = channels * channels * 9 * size * size
    macs_ssc = ssc.macs_per_pixel() * size * size
    models = {"dense": dense, "structured": ssc, "masked": ssc.with_execution("masked")}
    return models, (channels, size, size), macs_dense, macs_ssc, {"preset": spec.to_dict()}


def model_case(name: str, family: str, reduction: int):
    torch.manual_seed(0)
    dense = create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ssc = copy.deepcopy(dense)
    r = prune_(ssc, SSCConfig(reduction=reduction, family=family), x)
    models = {"dense": dense, "structured": ssc.eval(), "masked": _with_execution(ssc, "masked").eval()}
    after = count_cost(ssc, x)
    return models, (3, 32, 32), r.cost_before.macs, after.macs, {"params_dense": r.cost_before.params,
                                                                 "params_ssc": after.params}


def run_case(models, shape, batch, args) -> dict:
    cfg = LatencyConfig(device=args.device, batch_size=batch, warmup=args.warmup, repeats=args.repeats,
                        threads=args.threads if args.device == "cpu" else None, channels_last=args.channels_last,
                        dtype=args.dtype, cuda_graph=args.cuda_graph)
    cmp = compare_latency(models, shape, cfg)
    out = {}
    for k, r in cmp.results.items():
        out[k] = {"median_ms": r.median_ms, "min_ms": r.min_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms,
                  "std_ms": r.std_ms, "n": r.n}
    out["device_name"] = cmp.results["dense"].device_name
    return out


def summarise(entry: dict) -> dict:
    t = entry["times"]
    mac_red = entry["macs_dense"] / entry["macs_ssc"]
    speedup = t["dense"]["median_ms"] / t["structured"]["median_ms"]
    return {"mac_reduction": mac_red, "speedup_vs_dense": speedup,
            "speedup_vs_dense_min": t["dense"]["min_ms"] / t["structured"]["min_ms"],
            "speedup_vs_masked": t["masked"]["median_ms"] / t["structured"]["median_ms"],
            "speedup_over_mac_reduction": speedup / mac_red, "goal_met": speedup >= 0.6 * mac_red}


def markdown(path: Path) -> str:
    """A table of the cases in a results file: median ms (p10-p90) per execution and the ratios."""
    data = json.loads(path.read_text())
    lines = ["| case | batch | MAC reduction | dense ms | structured ms | masked ms | speed-up (median) | "
             "speed-up (min) | / MAC reduction |", "|---|---|---|---|---|---|---|---|---|"]
    for key, c in data["cases"].items():
        t = c["times"]
        cell = lambda n: f"{t[n]['median_ms']:.3g} ({t[n]['p10_ms']:.3g}-{t[n]['p90_ms']:.3g})"
        name = key.rsplit(":b", 1)[0]
        lines.append(f"| {name} | {c['batch']} | {c['mac_reduction']:.2f}x | {cell('dense')} | {cell('structured')} | "
                     f"{cell('masked')} | {c['speedup_vs_dense']:.2f}x | {c['speedup_vs_dense_min']:.2f}x | "
                     f"{c['speedup_over_mac_reduction']:.2f} |")
    met = sum(c["goal_met"] for c in data["cases"].values())
    lines.append(f"\nGoal (median speed-up >= 0.6 x MAC reduction) met in {met} of {len(data['cases'])} cases.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true", help="time NHWC copies of every model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cuda-graph", action="store_true", help="replay each model's forward as a CUDA graph "
                    "(removes most launch cost, which dominates CIFAR-sized models on a GPU)")
    ap.add_argument("--only", choices=["layers", "models"], default=None)
    ap.add_argument("--out", default="benchmarks/results/ssc_speed_cpu.json")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    path = Path(args.out)
    if args.markdown:
        print(markdown(path))
        return
    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    setup = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
             "channels_last": args.channels_last, "cuda_graph": args.cuda_graph,
             "warmup": args.warmup, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
             "command": "python benchmarks/ssc_speed.py " + " ".join(os.sys.argv[1:])}
    old = data.get("setup") or {}
    changed = [k for k in setup if k != "command" and data["cases"] and k in old and old[k] != setup[k]]
    if changed:  # the cases already there were timed otherwise: a rerun must not skip them under this setup
        raise SystemExit(f"{path} holds cases timed with other settings "
                         f"({', '.join(f'{k}={old[k]}' for k in changed)}): use another --out")
    data["setup"] = setup
    cases = []
    if args.only != "models":
        for lname, c, s in LAYER_SHAPES:
            for fam, red in LAYER_PRESETS:
                cases.append((f"layer:{lname}:{fam}{red}", lambda c=c, s=s, fam=fam, red=red:
                              layer_case(c, s, preset_for(red, fam))))
    if args.only != "layers":
        for mname, fam, red in MODELS:
            cases.append((f"model:{mname}:{fam}{red}", lambda m=mname, fam=fam, red=red: model_case(m, fam, red)))
    for key, build in cases:
        for batch in args.batches:
            ck = f"{key}:b{batch}"
            if ck in data["cases"]:
                continue
            models, shape, macs_dense, macs_ssc, extra = build()
            t0 = time.time()
            entry = {"macs_dense": macs_dense, "macs_ssc": macs_ssc, "batch": batch, **extra,
                     "loadavg_before": os.getloadavg()[0], "times": run_case(models, shape, batch, args)}
            entry.update(summarise(entry))
            entry["seconds"] = time.time() - t0
            data["cases"][ck] = entry
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
            print(f"{ck:<34} MACs /{entry['mac_reduction']:.2f}  dense {entry['times']['dense']['median_ms']:.3f} ms  "
                  f"structured {entry['times']['structured']['median_ms']:.3f} ms  masked "
                  f"{entry['times']['masked']['median_ms']:.3f} ms  speed-up {entry['speedup_vs_dense']:.2f}x "
                  f"({entry['speedup_over_mac_reduction']:.2f} of the MAC reduction)  load {entry['loadavg_before']:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
