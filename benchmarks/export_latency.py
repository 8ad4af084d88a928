"""Do pruned models stay faster once exported? onnxruntime latency against eager PyTorch, interleaved.

Per model (CIFAR resnet56 at 32x32; torchvision mobilenet_v2, resnet50, convnext_tiny at 224x224;
random weights, seed 0), float32, four versions:
    dense      the model as built
    tp         Torch-Pruning 1.6 at its best (L2 magnitude, local, pruning_ratio=--tp-ratio, round_to=8,
               classifier ignored), as benchmarks/latency_vs_tp.py prunes it
    default    prunekit's default call at the MACs Torch-Pruning reached:
               prune_(model, MagnitudeConfig(macs_fraction=f), x) (widths rounded to multiples of 16)
    unrounded  the same with round_to=None
Without torch_pruning installed, `tp` is left out and f = 0.5. Each version is exported to ONNX with
`export_model` (which checks the file against the model), then timed in onnxruntime (CPU provider,
one intra-op thread, sequential execution, all graph optimisations) and in eager PyTorch (one
thread, inference mode): all runners are called round-robin in a rotating order, so that load on
the machine hits them alike; medians and p10-p90 per runner, at batch 1 and 16. Speed-up = dense
median / pruned median within one runtime.

    taskset -c 1 python benchmarks/export_latency.py          # the four models
    python benchmarks/export_latency.py --models resnet56 --repeats 50
    python benchmarks/export_latency.py --table               # the markdown table of the results file

Needs the export extra (pip install -e ".[export]"). Results are written after every (model, batch)
and a rerun skips those already in the file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_vs_tp import build as build_model  # noqa: E402  (also makes torchvision importable here)

try:
    from latency_vs_tp import tp_prune  # noqa: E402
except ImportError:  # torch_pruning not installed: no tp version
    tp_prune = None

from prunekit.core.environment import cpu_model  # noqa: E402
from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.export import export_model  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "export_latency.json"
PK_VERSIONS = {"default": {}, "unrounded": {"round_to": None}}


def build(name: str, tp_ratio: float) -> tuple[dict[str, torch.nn.Module], torch.Tensor, dict[str, int]]:
    dense, x = build_model(name)
    models, macs = {"dense": dense}, {"dense": count_cost(dense, x).macs}
    frac = 0.5
    if tp_prune is not None:
        models["tp"] = copy.deepcopy(dense)
        tp_prune(models["tp"], x, tp_ratio)
        macs["tp"] = count_cost(models["tp"], x).macs
        frac = macs["tp"] / macs["dense"]
    for version, extra in PK_VERSIONS.items():
        pruned = copy.deepcopy(dense)
        prune_(pruned, MagnitudeConfig(macs_fraction=frac, **extra), x)
        models[version], macs[version] = pruned.eval(), count_cost(pruned, x).macs
    return {k: m.eval() for k, m in models.items()}, x, macs


def ort_session(path: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def runners(models: dict, x: torch.Tensor, batch: int, folder: str) -> dict:
    xb = x.repeat(batch, 1, 1, 1)
    feed = xb.numpy()
    out = {}
    for version, model in models.items():
        path = os.path.join(folder, f"{version}.onnx")
        if not os.path.exists(path):
            export_model(model, x, path)
        session = ort_session(path)
        name = session.get_inputs()[0].name
        out[f"ort/{version}"] = lambda s=session, n=name: s.run(None, {n: feed})
        out[f"torch/{version}"] = lambda m=model: m(xb)
    return out


def timed(calls: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    names = list(calls)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                calls[n]()
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]  # rotating start
            for n in order:
                t0 = time.perf_counter()
                calls[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "n": len(times)}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet56", "mobilenet_v2", "resnet50", "convnext_tiny"])
    p.add_argument("--tp-ratio", type=float, default=0.3, help="Torch-Pruning's channel ratio (~half the MACs)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per runner at batch 1 (a third at larger batches)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    import onnxruntime

    torch.set_num_threads(1)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    data["environment"] = {"cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__, "threads": 1, "dtype": "float32"}
    for name in args.models:
        todo = [b for b in args.batches if f"{name}:{b}" not in data["rows"]]
        if not todo:
            continue
        models, x, macs = build(name, args.tp_ratio)
        with tempfile.TemporaryDirectory() as folder:
            for batch in todo:
                repeats = args.repeats if batch == 1 else max(5, args.repeats // 3)
                times = timed(runners(models, x, batch, folder), args.warmup, repeats)
                row = {"model": name, "batch": batch, "macs": macs, "load_avg": os.getloadavg()[0],
                       "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
                       "runners": {n: summary(t) for n, t in times.items()}}
                data["rows"][f"{name}:{batch}"] = row
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(data, indent=1) + "\n")
                print(table({"rows": {f"{name}:{batch}": row}}, header=False))


def table(data: dict, header: bool = True) -> str:
    order = [v for v in ("tp", "default", "unrounded") if any(v in r["macs"] for r in data["rows"].values())]
    lines = [f"| model | batch | MACs kept ({' / '.join(order)}) | runtime | dense ms | "
             + " | ".join(f"{v} ms" for v in order) + f" | speed-up ({' / '.join(order)}) | "
             + ("default / tp | " if "tp" in order else "") + "load avg |",
             "|" + "---|" * (7 + len(order) + ("tp" in order))] if header else []
    for row in data["rows"].values():
        m, r = row["macs"], row["runners"]
        kept = " / ".join(f"{m[v] / m['dense']:.3f}" for v in order)
        for rt in ("torch", "ort"):
            med = {v: r[f"{rt}/{v}"]["median_ms"] for v in ["dense", *order]}
            cells = " | ".join(f"{med[v]:.2f} ({r[f'{rt}/{v}']['p10_ms']:.2f}-{r[f'{rt}/{v}']['p90_ms']:.2f})"
                               for v in ["dense", *order])
            speed = " / ".join(f"{med['dense'] / med[v]:.2f}x" for v in order)
            vs_tp = f" {med['tp'] / med['default']:.2f} |" if "tp" in order else ""
            lines.append(f"| {row['model']} | {row['batch']} | {kept} | {'onnxruntime' if rt == 'ort' else 'eager'} "
                         f"| {cells} | {speed} |{vs_tp} {row['load_avg']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
