"""docs/latency.md from benchmarks/results/latency_vs_tp.json and, when present, its GPU twin
latency_vs_tp_cuda.json (both written by latency_vs_tp.py).

    python benchmarks/latency_vs_tp.py --markdown-only
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ARMS = ("pk_default", "pk_auto", "pk_latency", "tp")


def _speed(entry: dict, arm: str, digits: int = 1) -> str:
    a = entry["arms"].get(arm)
    if not a:
        return "-"
    return f"{a['speedup']:.2f}x ({a['p10_ms']:.{digits}f}-{a['p90_ms']:.{digits}f} ms, n={a['n']})"


def _rows(data: dict) -> tuple[list[str], dict[str, list[float]]]:
    lines, goals = [], {"default_vs_tp": [], "latency_ratio": [], "prune_time": [], "auto_vs_tp": [],
                        "unrounded_vs_tp": [], "unrounded_prune_time": []}
    for name, row in data.get("rows", {}).items():
        if name == "misalignment":
            continue
        if "error" in row and not row.get("batches"):
            lines.append(f"| {name} | | | | | | | | failed: {row['error'][:80]} |")
            continue
        mf = row.get("macs_fraction", {})
        prune = row["prune"]["prune_seconds"]
        t_pk, t_tp = statistics.median(prune["pk_default"]), statistics.median(prune["tp_step"])
        rounded = row["prune"].get("default_round_to")  # absent: measured while the default was unrounded
        mark = f" (x{rounded})" if rounded else " (unrounded)"
        goals["prune_time" if rounded else "unrounded_prune_time"].append(t_pk / t_tp)
        for batch, e in row["batches"].items():
            arms = e["arms"]
            lat = e.get("pk_latency") or {"macs_fraction": float("nan"), "attempts": []}
            lat_ratio = arms.get("pk_latency", {}).get("speedup", float("nan")) * lat["macs_fraction"]
            d_vs_tp = arms["pk_default"]["speedup"] / arms["tp"]["speedup"]
            a_vs_tp = arms["pk_auto"]["speedup"] / arms["tp"]["speedup"]
            goals["default_vs_tp" if rounded else "unrounded_vs_tp"].append(d_vs_tp)
            goals["auto_vs_tp"].append(a_vs_tp)
            if lat_ratio == lat_ratio:  # not NaN
                goals["latency_ratio"].append(lat_ratio)
            lines.append(
                f"| {name} | {batch} | {mf.get('tp', 0):.3f} / {mf.get('pk_default', 0):.3f} / "
                f"{mf.get('pk_auto', 0):.3f} / {lat['macs_fraction']:.3f} | {_speed(e, 'pk_default')}{mark} | "
                f"{_speed(e, 'pk_auto')} (x{row['prune']['arms']['pk_auto'].get('round_to')}) | "
                f"{_speed(e, 'pk_latency')}; /MACs red. {lat_ratio:.2f}; {len(lat['attempts'])} try | "
                f"{_speed(e, 'tp')} | {d_vs_tp:.2f} / {a_vs_tp:.2f} | {t_pk:.2f} s / {t_tp:.2f} s |")
    return lines, goals


def _formats(data: dict) -> list[str]:
    out = []
    for name, row in data.get("rows", {}).items():
        for batch, e in (row.get("batches") or {}).items():
            for arm, rec in (e.get("memory_format") or {}).items():
                out.append(f"| {name} | {batch} | {arm} | {rec['contiguous_ms']:.2f} | {rec['channels_last_ms']:.2f} "
                           f"| {rec['choice']} |")
    return out


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} over {len(values)}" if values else "no data"


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    loads = [e.get("load_average") for r in data.get("rows", {}).values() for e in (r.get("batches") or {}).values()]
    when = [f"{n} {r['prune']['measured']['date'][:16]} at {str(r['prune']['measured']['git_commit'])[:10]}"
            for n, r in data.get("rows", {}).items() if (r.get("prune") or {}).get("measured")]
    body, goals = _rows(data)
    lines = [
        "# Latency of pruned models: prunekit and Torch-Pruning at equal MACs", "",
        f"Measured by `benchmarks/latency_vs_tp.py` (one model per process, pinned to one core, 1 torch "
        f"thread, float32, random weights, seed 0) on {data.get('date')}: CPU {env.get('cpu_model')}, torch "
        f"{data.get('torch')}, torch-pruning {data.get('torch_pruning')}, prunekit commit "
        f"{str(env.get('git_commit'))[:10]}. The machine has 2 cores and is shared: 1-minute load average at each "
        f"row {', '.join(f'{l[0]:.1f}' for l in loads if l)} (above about 2 every absolute time is inflated and "
        "noisy); the arms of a row are timed interleaved (round-robin, rotating order) so that the load hits "
        "them alike, and the spread (p10-p90) is given."
        + (f" Rows measured again later: {'; '.join(when)}." if when else ""), "",
        "Settings. **Torch-Pruning** 1.6.0 at its best: `MetaPruner(importance=MagnitudeImportance(p=2), "
        f"pruning_ratio={data.get('tp_ratio')}, round_to=8, ignored_layers=[classifier])`, for vit_b_16 its own "
        "recipe (`num_heads` of every attention, class token and position embedding unwrapped, `hidden_dim` "
        "updated). **prunekit default**: `prune_(model, MagnitudeConfig(macs_fraction=f), x)` with f = the "
        "MACs fraction Torch-Pruning reached (prunekit's count), everything else default (probe on); "
        "rows marked (x8) or (x16) ran with the rounded default of their commit (the default is now `round_to=16`; the multiple each row used after any fallback is in the JSON), rows marked (unrounded) before it, when the "
        "default was `round_to=None`. **auto**: the same with `round_to=\"auto\"`. **latency**: `MagnitudeConfig("
        "latency_fraction=t, round_to=\"auto\", latency={batch_size: b, repeats: 5})` with t = the latency "
        "fraction Torch-Pruning reached at that batch (a short interleaved measurement first): equal latency, "
        "so speed-up / MACs reduction says how little of the MACs it needed to remove. Speed-up = original median / pruned median at that batch.", "",
        "| model | batch | MACs fraction TP / default / auto / latency | prunekit default | prunekit auto | "
        "prunekit latency target | Torch-Pruning | default / TP, auto / TP | prune_ / TP step wall time |",
        "|---|---|---|---|---|---|---|---|---|", *body, "",
        "## Goals", "",
        f"- prunekit default (rounded rows) speed-up / Torch-Pruning's at equal MACs, median over model x batch: "
        f"{_median(goals['default_vs_tp'])} (goal >= 1.15); the unrounded default of the older rows: "
        f"{_median(goals['unrounded_vs_tp'])}; with round_to=\"auto\": {_median(goals['auto_vs_tp'])}.",
        f"- latency-target call, speed-up / MACs reduction: {_median(goals['latency_ratio'])} (goal >= 0.8).",
        f"- default `prune_` wall time / Torch-Pruning step: {_median(goals['prune_time'])} (goal <= 1.0); "
        f"unrounded default of the older rows: {_median(goals['unrounded_prune_time'])}.", "",
        "## Memory format", "",
        "Both formats timed on the same model (two interleaved rounds, median), 1 thread; `choice` is what "
        "`memory_format=\"auto\"` would keep.", "",
        "| model | batch | model | contiguous ms | channels-last ms | choice |", "|---|---|---|---|---|---|",
        *_formats(data), ""]
    return "\n".join(lines)


def markdown_gpu(data: dict) -> str:
    """The GPU table: bf16, CUDA graphs, the default and round_to="auto" calls next to Torch-Pruning."""
    env = data.get("environment", {})
    rows, ratios = [], {"default": [], "auto": []}
    for name, row in data.get("rows", {}).items():
        if name == "misalignment" or not row.get("batches"):
            continue
        mf = row.get("macs_fraction", {})
        for batch, e in row["batches"].items():
            arms = e["arms"]
            tp = arms["tp"]["speedup"]
            ratios["default"].append(arms["pk_default"]["speedup"] / tp)
            ratios["auto"].append(arms["pk_auto"]["speedup"] / tp)
            rounded = row.get("prune", {}).get("default_round_to")
            rows.append(f"| {name} | {batch} | {mf.get('tp', 0):.3f} / {mf.get('pk_default', 0):.3f} / "
                        f"{mf.get('pk_auto', 0):.3f} | {arms['original']['median_ms']:.3f} | {_speed(e, 'pk_default', 2)}"
                        f"{f' (x{rounded})' if rounded else ' (unrounded)'} | "
                        f"{_speed(e, 'pk_auto', 2)} (x{row['prune']['arms']['pk_auto'].get('round_to')}) | {_speed(e, 'tp', 2)} | "
                        f"{ratios['default'][-1]:.2f} / {ratios['auto'][-1]:.2f} |")
    mis = (data.get("rows", {}).get("misalignment") or {}).get("result", {})
    mis_rows = [f"| {k.replace('_batch', ', batch ').replace('_vs_', ' vs ')} | "
                + " / ".join(f"{v:.4f}" for v in r["ms"].values()) + f" | {r['slowdown']:.2f}x |" for k, r in mis.items()]
    cuda = env.get("cuda") or {}
    return "\n".join([
        "## GPU: bfloat16 with CUDA graphs", "",
        f"Measured by `benchmarks/latency_vs_tp.py --device cuda --no-latency-arm --repeats 50 --repeats-big 20` on "
        f"{data.get('date')}: {cuda.get('device_name')} (CUDA {cuda.get('cuda_version')}), torch {data.get('torch')}, "
        f"torch-pruning {data.get('torch_pruning')}, prunekit commit {str(env.get('git_commit'))[:10]}; one process on "
        "a quiet GPU, pruning on the host CPU, every model timed in bfloat16 with its forward captured in a CUDA "
        "graph, interleaved (round-robin, rotating order), median and p10-p90 of the replays. Same arms and "
        "MACs matching as the CPU table (the default column marked as there); `round_to=\"auto\"` measured its multiple on the GPU. The "
        "latency-target arm was left out (time).", "",
        "| model | batch | MACs fraction TP / default / auto | original ms | prunekit default | prunekit auto | "
        "Torch-Pruning | default / TP, auto / TP |", "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Median over model x batch: default / TP {_median(ratios['default'])}; auto / TP {_median(ratios['auto'])}.", "",
        "A 3x3 convolution at 56x56, bfloat16, CUDA graph (median ms):", "",
        "| widths | ms | slowdown of the odd width |", "|---|---|---|", *mis_rows, ""])


BEGIN, END = "<!-- measured: written by benchmarks/latency_vs_tp.py -->", "<!-- end of measured part -->"
GPU_BEGIN, GPU_END = "<!-- measured on GPU: written by benchmarks/latency_vs_tp.py -->", "<!-- end of GPU part -->"


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_markdown(root: Path) -> None:
    """Replace the measured blocks of docs/latency.md (the hand-written sections around them stay)."""
    results = root / "benchmarks" / "results"
    path = root / "docs" / "latency.md"
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    text = _replace_block(text, BEGIN, END, markdown(json.loads((results / "latency_vs_tp.json").read_text())))
    if (results / "latency_vs_tp_cuda.json").exists():
        gpu = json.loads((results / "latency_vs_tp_cuda.json").read_text())
        text = _replace_block(text, GPU_BEGIN, GPU_END, markdown_gpu(gpu))
    path.write_text(text)
