"""Training throughput: prunekit's `train` next to a plain PyTorch loop, in one run.

CIFAR-10 ResNet-56 (prunekit.models) on the image-folder tarball (prunekit.data). Both sides
train a fresh model with the same seed, optimizer (SGD, momentum 0.9, Nesterov, weight decay
5e-4), per-step cosine schedule and batch size, without augmentation and without evaluation,
so the numbers compare the training step and its data path:

    prunekit   prunekit.engine.train over prunekit.data's DeviceLoader (batches made on device)
    plain      a textbook loop over torch.utils.data.DataLoader(TensorDataset) of the same
               normalised images, kept on the CPU (pinned on CUDA) and copied per batch
    cuda_graph (--cuda-graph, CUDA only) the plain loop's whole step -- forward, backward and a
               fused SGD step with a tensor learning rate -- captured once in a CUDA graph and
               replayed with each batch copied into static input buffers

Images/s and seconds per epoch count the training loop only (device synchronised before the
clock is read); epoch 0 includes warm-up (cuDNN autotuning, torch.compile), so with more than
one epoch the steady-state mean over later epochs is reported too. Results (with device, dtype,
batch size, epochs, torch version and the environment) go to benchmarks/results/*.json.

CPU smoke setting (a few minutes on 2 cores):
    python benchmarks/train_throughput.py --device cpu --limit-train 512 --epochs 1 --batch-size 128
GPU:
    python benchmarks/train_throughput.py --epochs 3 --bf16 --channels-last --cuda-graph

The --cuda-graph path could not be run where this script was written (no GPU there); it is
guarded to CUDA devices and follows the documented whole-network capture recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from prunekit.core.environment import environment  # noqa: E402
from prunekit.engine import TrainConfig, lr_factor, seed_everything, train  # noqa: E402
from prunekit.engine.evaluate import autocast_context  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 image folder or tarball")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N train images")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile on the prunekit side")
    p.add_argument("--engine-default-layout", action="store_true",
                   help="prunekit side: TrainConfig's default channels_last (None: NHWC on CPU); the plain "
                        "loop keeps --channels-last (default: off), so the ratio is engine default vs plain loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda-graph", action="store_true", help="also time a CUDA-graph-captured step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/<auto>.json)")
    return p.parse_args(argv)


def load_tensors(args: argparse.Namespace, device: torch.device):
    """prunekit's train loader plus the same normalised images as CPU tensors for the plain loop."""
    from prunekit.data import DataConfig, load_data
    bundle = load_data(DataConfig(name="imagefolder", root=args.data, batch_size=args.batch_size,
                                  augment=False, limit_train=args.limit_train, seed=args.seed,
                                  device=str(device)))
    # One pass over the (unaugmented) train loader yields exactly the images it trains on.
    xs, ys = zip(*[(x.cpu(), y.cpu()) for x, y in bundle.train])
    return bundle, torch.cat(xs), torch.cat(ys)


def make_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    from prunekit.models import create_model
    seed_everything(args.seed)
    model = create_model(args.model, num_classes=num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(epoch_times: list[float], images_per_epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    later = epoch_times[1:]
    out = {
        "epoch_s": epoch_times,
        "images_per_epoch": images_per_epoch,
        "images_per_s": [images_per_epoch / t for t in epoch_times],
        "steady_epoch_s": statistics.mean(later) if later else None,
        "steady_images_per_s": images_per_epoch / statistics.mean(later) if later else None,
    }
    out.update(extra)
    return out


def train_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, optimizer="sgd", lr=args.lr, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, schedule="cosine", bf16=args.bf16,
                       channels_last=None if args.engine_default_layout else args.channels_last,
                       compile=args.compile, seed=args.seed, log_every=0)


def run_prunekit(args, bundle, device: torch.device) -> dict[str, Any]:
    model = make_model(args, bundle.num_classes, device)
    result = train(model, bundle.train, None, train_cfg(args), device=device)
    times = [h["train_time_s"] for h in result.history]
    return summarise(times, result.history[0]["train_n"],
                     {"final_train_loss": result.history[-1]["train_loss"], "loader": "prunekit DeviceLoader",
                      "compile": args.compile, "notes": result.notes})


def run_plain(args, x: torch.Tensor, y: torch.Tensor, num_classes: int, device: torch.device) -> dict[str, Any]:
    model = make_model(args, num_classes, device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size,
                                         shuffle=True, drop_last=False, pin_memory=cuda)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg, steps = train_cfg(args), len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, steps))
    times, loss = [], torch.zeros(())
    for _ in range(args.epochs):
        model.train()
        sync(device)
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with autocast_context(device, args.bf16):
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return summarise(times, len(y), {"final_batch_loss": loss.item(), "loader": "torch DataLoader"})


def capture_step(model: nn.Module, opt: torch.optim.Optimizer, static_x: torch.Tensor,
                 static_y: torch.Tensor, bf16: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture forward + backward + optimizer step on static buffers; returns (graph, static loss)."""
    def autocast():
        # The autocast weight-cast cache must be off while capturing (its tensors would be
        # freed after capture and replayed as dangling memory).
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)

    # Warm-up on a side stream: cuDNN picks its algorithms, and the optimizer creates its
    # momentum buffers, so that the captured step is the steady-state one.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(static_x), static_y)
            loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Grads set to None: backward inside the capture allocates them from the graph's pool and
    # every replay overwrites them, instead of accumulating into stale buffers.
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with autocast():
            static_loss = F.cross_entropy(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    return graph, static_loss


def run_cuda_graph(args, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        raise SystemExit("--cuda-graph needs a CUDA device; drop the flag on CPU")
    model = make_model(args, num_classes, device)
    model.train()
    x_dev, y_dev = x.to(device), y.to(device)
    b = args.batch_size
    steps = len(y_dev) // b  # a graph has static shapes: the partial last batch is skipped
    if steps == 0:
        raise SystemExit(f"--cuda-graph needs at least one full batch of {b} images")
    # A learning rate held in a device tensor is read by the fused SGD kernel at replay time,
    # so the schedule can change it between replays without recapturing.
    lr = torch.tensor(args.lr, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    static_x = torch.empty((b, *x_dev.shape[1:]), device=device).contiguous(memory_format=fmt)
    static_y = torch.empty(b, dtype=torch.long, device=device)
    static_x.copy_(x_dev[:b])
    static_y.copy_(y_dev[:b])
    graph, static_loss = capture_step(model, opt, static_x, static_y, args.bf16)
    cfg, times, step = train_cfg(args), [], 0
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for _ in range(args.epochs):
        order = torch.randperm(len(y_dev), device=device, generator=gen)
        sync(device)
        t0 = time.perf_counter()
        for k in range(steps):
            idx = order[k * b:(k + 1) * b]
            static_x.copy_(x_dev.index_select(0, idx))  # copy_ keeps static_x's memory format
            torch.index_select(y_dev, 0, idx, out=static_y)
            lr.fill_(args.lr * lr_factor(cfg, step, steps))
            graph.replay()
            step += 1
        sync(device)
        times.append(time.perf_counter() - t0)
    return summarise(times, steps * b, {"final_batch_loss": static_loss.item(), "loader": "device tensors",
                                        "optimizer": "SGD fused, tensor lr"})


def warm_up(args, num_classes: int, x: torch.Tensor, device: torch.device) -> None:
    """A few untimed steps so that whichever side runs first does not pay CUDA/cuDNN start-up."""
    model = make_model(args, num_classes, device)
    xb = x[: min(len(x), args.batch_size)].to(device)
    if args.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    yb = torch.zeros(len(xb), dtype=torch.long, device=device)
    for _ in range(2):
        with autocast_context(device, args.bf16):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
    sync(device)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs a CUDA device; drop the flag on CPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle, x, y = load_tensors(args, device)
    load_s = time.perf_counter() - t0
    warm_up(args, bundle.num_classes, x, device)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "prunekit": lambda: run_prunekit(args, bundle, device),
        "plain": lambda: run_plain(args, x, y, bundle.num_classes, device),
    }
    if args.cuda_graph:
        runs["cuda_graph"] = lambda: run_cuda_graph(args, x, y, bundle.num_classes, device)
    results = {}
    for name, run in runs.items():
        results[name] = run()
        r = results[name]
        print(f"{name:>10}: {r['images_per_s'][-1]:9.1f} img/s, {r['epoch_s'][-1]:8.2f} s/epoch (last epoch)")
    cuda = device.type == "cuda"
    record = {
        "benchmark": "train_throughput", "model": args.model, "dataset": "cifar10 (image folder)",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "dtype": "bf16 autocast" if args.bf16 and cuda else "float32",
        "batch_size": args.batch_size, "epochs": args.epochs, "limit_train": args.limit_train,
        "train_images": len(y), "channels_last": args.channels_last,
        "engine_default_layout": args.engine_default_layout, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(), "torch": torch.__version__,
        "data_load_s": load_s,
        # A loaded shared machine makes timings noisy: keep the load next to the numbers.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results, "environment": environment(REPO), "args": vars(args),
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    default_name = f"train_throughput_{args.model}_{device.type}_{stamp}.json"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
