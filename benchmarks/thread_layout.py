"""How to spend a small CPU on training jobs: one job with N threads, or N jobs with one thread each.

Each layout trains the protocol's ResNet-20 (channels-last, batch 256, SGD, random CIFAR-shaped
batches) in separate processes started together, and reports the images/s of every process and
their sum. Layouts are interleaved over `--rounds` rounds. `--neighbour` adds one more
single-thread process doing the same work beside the layout (an editor's test run, say), to show
how each layout copes with a machine it does not have to itself; the neighbour's rate is not
counted.

    python benchmarks/thread_layout.py --rounds 3 --out benchmarks/results/thread_layout_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(threads: int, steps: int, warmup: int) -> None:
    """Child process: train `steps` steps after `warmup`, print images/s."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "src"))
    from prunekit.models.resnet_cifar import ResNetCifar

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ResNetCifar(20).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"images_per_s": steps * 256 / (time.perf_counter() - t0)}))


def run_layout(jobs: list[int], neighbour: bool, steps: int, warmup: int) -> list[float]:
    """Start one process per entry of `jobs` (its thread count) at once; their images/s."""
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--warmup", str(warmup), "--threads"]
    procs = [subprocess.Popen(cmd + [str(t)], stdout=subprocess.PIPE, text=True) for t in jobs]
    extra = subprocess.Popen(cmd + ["1"], stdout=subprocess.DEVNULL) if neighbour else None
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs]
    if extra is not None:
        extra.wait()
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--neighbour", action="store_true", help="also run every layout beside one more busy process")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.threads, args.steps, args.warmup)

    sys.path.insert(0, str(REPO / "src"))
    from prunekit.core.environment import environment

    n = args.cores
    layouts = {f"1 job x {n} threads": [n], f"{n} jobs x 1 thread": [1] * n, "1 job x 1 thread": [1]}
    cases = [(name, jobs, False) for name, jobs in layouts.items()]
    if args.neighbour:
        cases += [(name + " + busy neighbour", jobs, True) for name, jobs in layouts.items()]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    for r in range(args.rounds):
        for name, jobs, neighbour in cases[r % len(cases):] + cases[:r % len(cases)]:  # rotate the order
            load = os.getloadavg()[0]
            rates = run_layout(jobs, neighbour, args.steps, args.warmup)
            rows[name].append({"per_job": [round(v, 1) for v in rates], "total": round(sum(rates), 1), "load_before": load})
    print(f"ResNet-20 channels-last, batch 256, float32, {args.steps} steps after {args.warmup}; images/s, "
          f"median total over {args.rounds} rounds (min-max)")
    for name, recs in rows.items():
        totals = [x["total"] for x in recs]
        print(f"  {name:40s} {statistics.median(totals):7.0f}  ({min(totals):.0f}-{max(totals):.0f})  "
              f"per job {[x['per_job'] for x in recs]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(), "settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
