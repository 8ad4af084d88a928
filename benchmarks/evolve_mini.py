"""Mini evolution: population 14, >= 5 generations, fitness jobs through the process pool, on the
default tasks (digits CNN + ResNet-20 on a 5,000-image CIFAR-10 subset); then the best functions
and the 7 seeds are re-evaluated with fresh seeds. Resumable: rerunning continues from the last
finished generation in the run directory. Writes <run>/report.md and a summary JSON.

    # 2 idle CPU cores: about an hour (measure with --generations 1 first)
    python benchmarks/evolve_mini.py --workers 2
    # GPU
    python benchmarks/evolve_mini.py --device cuda --workers 4
    # smoke (one core, a few minutes): digits only, population 4, 1 generation
    python benchmarks/evolve_mini.py --smoke --workers 1 --run-dir local/evolve_mini_smoke
Then test the best function on the transfer task:
    python benchmarks/evolve_transfer.py --extra-arm "evolved:samples=512:$(cat <run>/best.txt)"
(512: the images every transfer arm scores on, whatever calib_samples the search used)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunekit.core.environment import environment  # noqa: E402
from prunekit.engine.train import TrainConfig  # noqa: E402
from prunekit.evolve import EvolveConfig, cifar_task, digits_task, run_search  # noqa: E402
from prunekit.evolve.report import comparison_set, reevaluate, write_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(REPO / "local/evolve_mini"))
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--population", type=int, default=14)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--executor", default="process", choices=("process", "ray", "serial"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=str(REPO / "../shared/data/cifar10-jpg.tar.gz"))
    p.add_argument("--reeval-seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/evolve_mini.json"))
    args = p.parse_args(argv)
    if args.smoke:
        tasks = [digits_task(dense_train=TrainConfig(epochs=3, lr=0.05, log_every=0), calib_samples=128)]
        cfg = EvolveConfig(tasks=tasks, population=4, parents=2, generations=1, reeval_top=1, reeval_seeds=1,
                           executor=args.executor, workers=args.workers, device=args.device)
        reeval_seeds = 1
    else:
        tasks = [digits_task(), cifar_task(data={**cifar_task().data, "root": args.data})]
        cfg = EvolveConfig(tasks=tasks, population=args.population, generations=args.generations,
                           executor=args.executor, workers=args.workers, device=args.device)
        reeval_seeds = args.reeval_seeds
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    state = run_search(cfg, run_dir, resume=(run_dir / "checkpoints").exists(), progress=False, echo=print)
    search_s = time.perf_counter() - t0
    rows = reevaluate(cfg, run_dir, comparison_set(state, 3), reeval_seeds, progress=False)
    report = write_run(run_dir, cfg, state, rows)
    summary = {"config": cfg.to_dict(), "history": state.history, "best": state.hall_of_fame[0],
               "reevaluation": rows, "search_seconds_this_call": round(search_s, 1),
               "total_seconds_this_call": round(time.perf_counter() - t0, 1), "loadavg_end": os.getloadavg(),
               "run_dir": str(run_dir), "environment": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
