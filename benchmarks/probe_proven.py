"""Probing only the groups the rules cannot vouch for gives the same verdict as probing all.

For every torchvision classifier (random initialisation, seed 0, 1x3x224x224, 299 for
Inception; float32, CPU, 1 thread): trace, then probe every prunable group
(`probe_groups(..., everything=True)`, the old default) and only the unproven ones
(`everything=False`, what `prune_` does now). Each model adds one JSON line: prunable groups,
unproven groups, the groups each probe rejects, whether they agree, and both probe times.

    python benchmarks/probe_proven.py benchmarks/results/probe_proven.jsonl        # all 80 models
    python benchmarks/probe_proven.py out.jsonl vit_b_16 swin_t                    # some models
Rerunning with the same file skips the models already in it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT.parent / "shared" / "tools"))
import torchvision_cpu  # noqa: E402,F401  (declares the operators a CUDA torchvision wheel lacks on CPU torch)
import torchvision.models as M  # noqa: E402

from prunekit.graph import build_graph  # noqa: E402
from prunekit.surgery.verify import probe_groups  # noqa: E402


def one(name: str) -> dict:
    torch.manual_seed(0)
    model = M.get_model(name).eval()
    size = 299 if "inception" in name else 224
    x = torch.randn(1, 3, size, size)
    graph = build_graph(model, x)
    groups = graph.prunable_groups()
    t = time.perf_counter()
    bad_all = probe_groups(model, x, graph, everything=True)
    t_all = time.perf_counter() - t
    t = time.perf_counter()
    bad_some = probe_groups(model, x, graph, everything=False)
    t_some = time.perf_counter() - t
    return dict(model=name, groups=len(groups), unproven=sum(not g.proven for g in groups),
                bad_all=sorted(bad_all), bad_some=sorted(bad_some), same=set(bad_all) == set(bad_some),
                t_all=t_all, t_some=t_some)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(argv[0])
    done = {json.loads(line)["model"] for line in out.read_text().splitlines()} if out.exists() else set()
    for name in argv[1:] or M.list_models(module=M):
        if name in done:
            continue
        try:
            rec = one(name)
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            rec = dict(model=name, error=f"{type(err).__name__}: {str(err)[:200]}")
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(rec, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
