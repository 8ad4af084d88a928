"""Time single fitness jobs of the default evolve tasks (to size a search): trains each task's
dense model (digits: the default 15 epochs; the CIFAR subset: 1 epoch, enough for timing), then
runs Eq. 3 with seeds 0 and 1 and seed_l1 with seed 0 as jobs, one torch thread.

    python benchmarks/evolve_job_times.py            # writes benchmarks/results/evolve_job_times.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunekit.core.environment import environment  # noqa: E402
from prunekit.evolve.config import cifar_task, digits_task  # noqa: E402
from prunekit.evolve.fitness import Job, run_job, train_dense  # noqa: E402
from prunekit.importance.evolved.space import EVOLVED, SEEDS  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    cifar = cifar_task(data={**cifar_task().data, "root": str(REPO / "../shared/data/cifar10-jpg.tar.gz")})
    out = {"environment": environment(), "tasks": {}}
    for task, epochs in ((digits_task(), 15), (cifar, 1)):
        task = dataclasses.replace(task, dense_train=task.dense_train.replace(epochs=epochs, log_every=0))
        path = str(REPO / f"local/evolve_job_times_{task.name}.safetensors")
        t0 = time.perf_counter()
        acc = train_dense(task, path)
        dense_s = time.perf_counter() - t0
        tj = json.dumps(task.to_dict(), sort_keys=True)
        jobs = [run_job(Job(EVOLVED["ga_func2"], tj, s, path)) for s in (0, 1)]
        jobs.append(run_job(Job(SEEDS["seed_l1"], tj, 0, path)))
        out["tasks"][task.name] = {"dense_epochs": epochs, "dense_seconds": round(dense_s, 1), "dense_val_acc": acc,
                                   "jobs": jobs, "loadavg": os.getloadavg()}
        print(json.dumps(out["tasks"][task.name]), flush=True)
    (REPO / "benchmarks/results/evolve_job_times.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
