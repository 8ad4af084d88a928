"""CPU training-step throughput of the protocol candidates, interleaved in one process.

Each candidate (model x memory format x torch.compile) trains on random CIFAR-shaped batches
(the pixel values do not change the arithmetic); rounds of `--steps` SGD steps are interleaved
across candidates `--rounds` times, so a busy neighbour on a shared machine hits every candidate
alike. Reported: median images/s over rounds, with p10/p90, the load average before and after,
and the thread count. torch.compile's first call (the compilation) is outside the clock.

    python benchmarks/protocol_throughput.py --threads 1 --rounds 5 --steps 10 \\
        --out benchmarks/results/protocol_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.core.environment import environment  # noqa: E402
from prunekit.models.resnet_cifar import ResNetCifar  # noqa: E402

CANDIDATES = {  # name -> (depth, channels_last, compile)
    "resnet20": (20, False, False),
    "resnet20_channels_last": (20, True, False),
    "resnet20_compile": (20, False, True),
    "resnet20_channels_last_compile": (20, True, True),
    "resnet14": (14, False, False),
    "resnet56": (56, False, False),
}


def make_step(depth: int, channels_last: bool, compiled: bool, batch: int):
    torch.manual_seed(0)
    model = ResNetCifar(depth)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "protocol_throughput_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    steps, compile_s = {}, {}
    for name in args.candidates:
        depth, cl, comp = CANDIDATES[name]
        steps[name] = make_step(depth, cl, comp, args.batch_size)
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up; for compiled candidates this is where compilation happens
            steps[name]()
        compile_s[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()), flush=True)
    summary = {}
    for name, v in rates.items():
        q = statistics.quantiles(v, n=10) if len(v) > 1 else [v[0]] * 9
        summary[name] = {"median_img_s": statistics.median(v), "p10": q[0], "p90": q[-1], "n": len(v),
                         "warmup_s": compile_s[name]}
    base = summary.get("resnet20", {}).get("median_img_s")
    for name, s in summary.items():
        s["vs_resnet20_plain"] = s["median_img_s"] / base if base else None
    record = {"benchmark": "protocol_throughput", "device": "cpu", "dtype": "float32", "threads": args.threads,
              "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "summary": summary,
              "rates": rates, "torch": torch.__version__, "environment": environment(REPO)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    main()
