"""Latency of pruned models: prunekit next to Torch-Pruning at equal MACs, measured in one run.

For each model (torchvision resnet50, mobilenet_v2, convnext_tiny, vit_b_16 at 224x224 and CIFAR
resnet56 at 32x32; random weights, seed 0), float32, 1 thread:

    tp          Torch-Pruning at its best setting: MagnitudePruner (L2, local), pruning_ratio=--tp-ratio,
                round_to=8, classifier ignored; for ViT its own recipe (num_heads per attention,
                class token and position embedding as unwrapped parameters, hidden_dim updated after)
    pk_default  prune_(model, MagnitudeConfig(macs_fraction=f)), f = the MACs fraction tp reached
                (prunekit's count), every other setting at its default (probe on, no rounding)
    pk_auto     the same with round_to="auto" (the multiple this CPU rewards, measured)
    pk_latency  prune_(model, MagnitudeConfig(latency_fraction=t, round_to="auto", latency={batch})):
                allocation by importance per ms saved, checked by a real measurement; t = the latency
                fraction tp reached at that batch (a short interleaved measurement first), so this arm
                is compared with Torch-Pruning at equal latency: its MACs reduction should not exceed
                its speed-up by much (speed-up / MACs reduction)

The four pruned models and the original are timed interleaved (`compare_latency`, round-robin,
rotating order) at each batch; the speed-up is original median / pruned median, with the
p10-p90 spread. Prune wall time: `prune_` (default call) and Torch-Pruning's step, each timed once
per model from a fresh copy (--prune-repeats for more). For the conv models (not vit_b_16) the
original, default-pruned and Torch-Pruning models are also timed in channels-last
(`cost.memory_format.choose_memory_format`).

The machine is shared: run one model per process, in the background, on one core; results are
written to benchmarks/results/latency_vs_tp.json after every model and batch (a rerun skips
what is there), with the load average. `--markdown-only` rewrites docs/latency.md.

    nohup taskset -c 1 python benchmarks/latency_vs_tp.py --models resnet56 > local/lat.log 2>&1 &
    python benchmarks/latency_vs_tp.py --markdown-only
GPU (bf16, batch 1 and 256, CUDA graphs, plus a 63- vs 64-channel conv): add --device cuda;
results go to latency_vs_tp_cuda.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from prune_speed import _tp_version, classifier_of  # noqa: E402  (also installs the torchvision trick)

import torch_pruning as tp  # noqa: E402
import torchvision.models as tvm  # noqa: E402

from prunekit.core.environment import environment  # noqa: E402
from prunekit.cost.latency import LatencyConfig, compare_latency  # noqa: E402
from prunekit.cost.macs import count_cost  # noqa: E402
from prunekit.cost.memory_format import choose_memory_format  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.models.resnet_cifar import create_resnet_cifar  # noqa: E402

MODELS = ["resnet56", "resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16"]
CHANNELS_LAST_MODELS = ("resnet50", "resnet56", "mobilenet_v2", "convnext_tiny")  # the conv models


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet56":
        return create_resnet_cifar(56).eval(), torch.randn(1, 3, 32, 32)
    return tvm.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> None:
    """Torch-Pruning 1.6 at its best: round_to=8; ViT with its own recipe."""
    imp = tp.importance.MagnitudeImportance(p=2)
    kw: dict[str, Any] = {}
    vit = isinstance(model, tvm.VisionTransformer)
    if vit:
        kw["num_heads"] = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        kw["unwrapped_parameters"] = [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, round_to=8,
                                  ignored_layers=[classifier_of(model)], **kw)
    pruner.step()
    if vit:
        model.hidden_dim = model.conv_proj.out_channels


def _timed(fn, template: nn.Module) -> tuple[nn.Module, float, Any]:
    model = copy.deepcopy(template)  # outside the timed region
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(model)
    return model, time.perf_counter() - t0, out


def prune_arms(name: str, args) -> tuple[dict[str, nn.Module], dict[str, Any], torch.Tensor]:
    template, x = build(name)
    macs0 = count_cost(template, x).macs
    info: dict[str, Any] = {"macs": macs0, "params": sum(p.numel() for p in template.parameters()), "arms": {}}
    models = {"original": template}
    tp_times, pk_times = [], []
    for _ in range(args.prune_repeats):  # interleaved: TP step, then prunekit's default call
        tp_model, t_tp, _ = _timed(lambda m: tp_prune(m, x, args.tp_ratio), template)
        tp_times.append(t_tp)
        frac = count_cost(tp_model, x).macs / macs0
        pk_model, t_pk, pk_res = _timed(lambda m: prune_(m, MagnitudeConfig(macs_fraction=frac), x), template)
        pk_times.append(t_pk)
    models["tp"], models["pk_default"] = tp_model, pk_model
    info["prune_seconds"] = {"tp_step": tp_times, "pk_default": pk_times}
    info["macs_fraction_target"] = frac
    info["default_round_to"] = MagnitudeConfig.__dataclass_fields__["round_to"].default  # what "default" meant
    info["measured"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": environment(ROOT).get("git_commit"),
                        "load_average": list(os.getloadavg())}
    arms = {"pk_auto": MagnitudeConfig(macs_fraction=frac, round_to="auto",
                                       latency={"device": args.device, "dtype": args.dtype})}
    for arm, cfg in arms.items():
        models[arm], secs, res = _timed(lambda m: prune_(m, cfg, x), template)
        info["arms"][arm] = {"prune_seconds": secs, "round_to": res.metrics.get("round_to", {}).get("multiple")}
    info["arms"]["pk_default"] = {"notes": pk_res.metrics.get("notes", []),
                                  "multiple": pk_res.metrics.get("rounding", {}).get("multiple")}
    return models, info, x


def latency_arm(template: nn.Module, x: torch.Tensor, frac: float, batch: int, args) -> tuple[nn.Module, dict]:
    lat = {"device": args.device, "batch_size": batch, "dtype": args.dtype, "repeats": args.lut_repeats, "warmup": 2}
    if args.device == "cuda":
        lat["cuda_graph"] = True
    cfg = MagnitudeConfig(latency_fraction=frac, round_to="auto", latency=lat, latency_tolerance=0.05)
    model, secs, res = _timed(lambda m: prune_(m, cfg, x), template)
    rep = res.metrics["latency"]
    return model, {"prune_seconds": secs, "measured_fraction_in_prune": rep["measured_fraction"],
                   "attempts": rep["attempts"], "round_to": res.metrics["round_to"]["multiple"],
                   "estimate": rep["estimate"], "macs": count_cost(model, x).macs}


def time_arms(models: dict[str, nn.Module], x: torch.Tensor, batch: int, args, quick: bool = False) -> dict[str, Any]:
    repeats = args.repeats if batch == 1 else args.repeats_big
    cfg = LatencyConfig(device=args.device, dtype=args.dtype, batch_size=batch, threads=args.threads,
                        warmup=3, repeats=max(3, repeats // 3) if quick else repeats,
                        cuda_graph=args.device == "cuda")
    cmp = compare_latency(models, tuple(x.shape[1:]), cfg)
    out = {}
    for k, r in cmp.results.items():
        out[k] = {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms, "n": r.n,
                  "speedup": cmp.results["original"].median_ms / r.median_ms}
    return {"settings": cfg.to_dict(), "device_name": cmp.results["original"].device_name, "arms": out}


def run_model(name: str, args, done: dict) -> dict[str, Any]:
    row = done.get(name, {})
    if "error" in row or "batches" not in row:  # a failed or foreign row starts again
        row = {"model": name, "batches": {}}
    if "prune" not in row:
        models, info, x = prune_arms(name, args)
        row["prune"] = info
    else:
        models, _, x = prune_arms(name, args)  # rebuilt: pruned models are not saved
    frac = row["prune"]["macs_fraction_target"]
    macs0 = row["prune"]["macs"]
    row["macs_fraction"] = {k: count_cost(m, x).macs / macs0 for k, m in models.items()}
    for batch in args.batches:
        if str(batch) in row["batches"]:
            continue
        arms = dict(models)
        if args.no_latency_arm:
            entry = time_arms(arms, x, batch, args)
            entry["load_average"] = list(os.getloadavg())
            row["batches"][str(batch)] = entry
            done[name] = row
            _write(args, done)
            continue
        tp_frac = time_arms({"original": models["original"], "tp": models["tp"]}, x, batch, args, quick=True)
        tp_frac = 1.0 / tp_frac["arms"]["tp"]["speedup"]
        arms["pk_latency"], lat_info = latency_arm(models["original"], x, tp_frac, batch, args)
        lat_info["target"] = tp_frac
        entry = time_arms(arms, x, batch, args)
        entry["pk_latency"] = lat_info
        entry["pk_latency"]["macs_fraction"] = lat_info["macs"] / macs0
        if name in CHANNELS_LAST_MODELS and args.device == "cpu":
            entry["memory_format"] = {k: choose_memory_format(arms[k], tuple(x.shape[1:]), LatencyConfig(
                batch_size=batch, threads=args.threads, warmup=2, repeats=max(5, args.repeats_big)))
                for k in ("original", "pk_default", "tp")}
        entry["load_average"] = list(os.getloadavg())
        row["batches"][str(batch)] = entry
        done[name] = row
        _write(args, done)
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in entry["arms"].items()),
              flush=True)
    return row


def misalignment(args) -> dict[str, Any]:
    """A 3x3 conv at 56x56 with 63 against 64 channels (and 127/128), the cost of odd widths."""
    out = {}
    for b in args.batches:
        cfg = LatencyConfig(device=args.device, dtype=args.dtype, batch_size=b, threads=args.threads, warmup=5,
                            repeats=args.repeats, cuda_graph=args.device == "cuda")
        for a, c in ((63, 64), (127, 128)):
            ms = {}
            for w in (a, c):
                conv = nn.Conv2d(w, w, 3, padding=1)
                ms[w] = compare_latency({str(w): conv}, (w, 56, 56), cfg).results[str(w)].median_ms
            out[f"{a}_vs_{c}_batch{b}"] = {"ms": ms, "slowdown": ms[a] / ms[c]}
    return out


def _results_path(args) -> Path:
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    return ROOT / "benchmarks" / "results" / f"latency_vs_tp{suffix}.json"


def _write(args, done: dict) -> None:
    path = _results_path(args)
    data = json.loads(path.read_text()) if path.exists() else {}
    first = {"environment": environment(ROOT), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for k, v in first.items():  # the first run's; rows measured later carry their own (prune.measured)
        data.setdefault(k, v)
    data.update({"torch": torch.__version__, "torch_pruning": _tp_version(), "threads": args.threads,
                 "dtype": args.dtype, "device": args.device, "tp_ratio": args.tp_ratio})
    data.setdefault("rows", {}).update(done)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batches", nargs="*", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats at batch 1")
    ap.add_argument("--repeats-big", type=int, default=8, help="timed repeats at larger batches")
    ap.add_argument("--lut-repeats", type=int, default=5, help="repeats per latency-table point")
    ap.add_argument("--prune-repeats", type=int, default=1)
    ap.add_argument("--tp-ratio", type=float, default=0.3, help="Torch-Pruning's channel ratio (~half the MACs)")
    ap.add_argument("--no-latency-arm", action="store_true", help="skip the latency-target call (its tables "
                    "take the longest to build)")
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--redo", action="store_true", help="measure the named models again (their rows are replaced)")
    args = ap.parse_args(argv)
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.batches = args.batches or ([1, 256] if args.device == "cuda" else [1, 16])
    if args.markdown_only:
        from latency_report import write_markdown
        write_markdown(ROOT)
        return
    torch.set_num_threads(args.threads)
    path = _results_path(args)
    stored = json.loads(path.read_text()) if path.exists() else {}
    done = stored.get("rows", {})
    if args.redo:
        for name in args.models:
            done.pop(name, None)
    kept = [n for n in done if n != "misalignment"]
    changed = [k for k in ("tp_ratio", "threads") if kept and k in stored and stored[k] != getattr(args, k)]
    if changed:  # the file states one tp_ratio and thread count for all of its rows
        raise SystemExit(f"{path} holds rows measured with {', '.join(f'{k}={stored[k]}' for k in changed)}: "
                         "rerun with those settings, or --redo every model")
    print("load average", os.getloadavg(), flush=True)
    if args.device == "cuda":
        done["misalignment"] = {"model": "conv3x3@56", "result": misalignment(args)}
        _write(args, done)
    for name in args.models:
        try:
            run_model(name, args, done)
        except Exception as err:  # one model failing must not lose the others
            done.setdefault(name, {"model": name})["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            _write(args, done)
            print(f"{name} failed: {err}", flush=True)


if __name__ == "__main__":
    main()
