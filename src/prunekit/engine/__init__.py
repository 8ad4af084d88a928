"""Training engine: a plain loop with hooks, evaluation, exact resume, DDP and JSONL metrics.

>>> import torch
>>> from torch import nn
>>> from prunekit.engine import TrainConfig, train
>>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
>>> train(nn.Linear(3, 2), data, data, TrainConfig(epochs=1), progress=False).final_metrics["epoch"]
0
"""
from .checkpoint import (CHECKPOINT_NAME, capture_rng_state, checkpoint_path, load_checkpoint,
                         restore_rng_state, save_checkpoint, seed_everything)
from .distributed import DistContext, launch_local, shard_batch
from .evaluate import evaluate
from .hooks import Hook, TrainState, split_parameters
from .logging import MetricsLog, epoch_records, read_jsonl
from .train import (TIMING_KEYS, TrainConfig, TrainResult, build_optimizer, build_scheduler,
                    lr_factor, train)

__all__ = [
    "CHECKPOINT_NAME", "DistContext", "Hook", "MetricsLog", "TIMING_KEYS", "TrainConfig",
    "TrainResult", "TrainState", "build_optimizer", "build_scheduler", "capture_rng_state", "checkpoint_path",
    "epoch_records", "evaluate", "launch_local", "load_checkpoint", "lr_factor", "read_jsonl",
    "restore_rng_state", "save_checkpoint", "seed_everything", "shard_batch", "split_parameters", "train",
]
