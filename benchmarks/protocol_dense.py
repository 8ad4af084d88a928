"""Train the protocol's dense CIFAR-10 model once (prunekit.protocol), on CPU or CUDA, resumably.

Writes <out>.safetensors (the weights every compare recipe of the protocol starts from) and
<out>.json: test and val accuracy, sha256 of the weights, device, wall time, epochs, per-epoch
history, whether the 85% goal was met, and the environment. A killed run resumes from its last
finished epoch (checkpoint folder <out>_ckpt/); on CPU the result equals an uninterrupted run.
Exit status 0 when the goal is met, 3 when the model trained but stayed below it.

    python benchmarks/protocol_dense.py --device cuda                     # H200: about 2-3 minutes
    python benchmarks/protocol_dense.py --device cpu --threads 2          # 2 idle cores: about 40 minutes (estimate)
    python benchmarks/protocol_dense.py --device cpu --epochs 1 --limit-train 512 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.compare import sha256_file  # noqa: E402
from prunekit.core.environment import environment  # noqa: E402
from prunekit.data import load_data  # noqa: E402
from prunekit.engine import evaluate, train  # noqa: E402
from prunekit.models import create_model  # noqa: E402
from prunekit.protocol import PROTOCOL  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=str(REPO / PROTOCOL.data_root), help="CIFAR-10 image folder or tarball")
    p.add_argument("--out", default=str(REPO / Path(PROTOCOL.dense_path).with_suffix("")),
                   help="output path without suffix (.safetensors and .json are added)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--epochs", type=int, default=None, help=f"override the protocol's {PROTOCOL.dense_epochs}")
    p.add_argument("--limit-train", type=int, default=None, help="smoke runs only: first N training images")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (not the protocol: float32)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_cfg = PROTOCOL.data_config(device="cuda" if device.type == "cuda" else "cpu", root=args.data)
    if args.limit_train:
        data_cfg = data_cfg.replace(limit_train=args.limit_train)
    cfg = PROTOCOL.dense_train.replace(**({"epochs": args.epochs} if args.epochs else {}), bf16=args.bf16)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = load_data(data_cfg)
    load_s = time.perf_counter() - t0
    torch.manual_seed(PROTOCOL.data_seed)
    model = create_model(PROTOCOL.model, bundle.num_classes)
    t1 = time.perf_counter()
    run = train(model, bundle.train, bundle.val, cfg, ckpt_dir=str(out) + "_ckpt", resume=True, device=device,
                log_path=str(out) + ".jsonl", progress=False)
    train_s = time.perf_counter() - t1
    from safetensors.torch import save_model
    weights = out.with_suffix(".safetensors")
    model.to(memory_format=torch.contiguous_format)
    save_model(model.cpu(), str(weights))
    model.to(device)
    test, val = evaluate(model, bundle.test), evaluate(model, bundle.val)
    record = {"benchmark": "protocol_dense", "protocol": PROTOCOL.model, "weights": str(weights),
              "sha256": sha256_file(weights), "test_acc": test["acc"], "val_acc": val["acc"],
              "goal_test_acc": PROTOCOL.target_dense_acc, "goal_met": test["acc"] >= PROTOCOL.target_dense_acc,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "train_s_this_call": train_s, "data_load_s": load_s,
              "resumed_from_epoch": run.start_epoch, "train": cfg.to_dict(), "data": data_cfg.to_dict(),
              "history": run.history, "environment": environment(REPO)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"dense {PROTOCOL.model}: test acc {test['acc']:.4f}, val acc {val['acc']:.4f}, "
          f"{train_s:.0f} s on {device}; wrote {weights} (sha256 {record['sha256'][:16]})")
    return 0 if record["goal_met"] else 3


if __name__ == "__main__":
    sys.exit(main())
