"""A real 2-process DistributedDataParallel run on CPU (gloo) against a single-process oracle."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from prunekit.engine import (CHECKPOINT_NAME, DistContext, TrainConfig, epoch_records, launch_local,
                             load_checkpoint, shard_batch, train)

from engine_testkit import L2Penalty, TinyLoader, blobs, mlp, without_timings

# 105 samples in global batches of 24: the last batch has 9 rows, split 5/4 over two ranks, so
# the test also checks that unequal shards are weighted by their size.
N_TRAIN, GLOBAL_BATCH = 105, 24
CFG = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", log_every=2)


def _run(out_dir: str) -> dict:
    x, y = blobs(N_TRAIN)
    xv, yv = blobs(31, seed=7)
    model = mlp()
    # shuffle="epoch": every rank draws the same order of global batches.
    result = train(model, TinyLoader(x, y, GLOBAL_BATCH, shuffle="epoch"), TinyLoader(xv, yv, 8), CFG,
                   hooks=[L2Penalty(model[0], 0.01)], ckpt_dir=Path(out_dir) / "ckpt",
                   log_path=Path(out_dir) / "metrics.jsonl", device="cpu", progress=False)
    return {"state": model.state_dict(), "history": result.history}


def _ddp_worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = _run(out_dir)
    rank = int(os.environ["RANK"])
    torch.save(out["state"], Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"history{rank}.json").write_text(json.dumps(out["history"]))
    # train created the process group, so it must also have destroyed it.
    assert not dist.is_initialized()


def test_two_process_gloo_matches_single_process(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single = _run(str(single_dir))
    launch_local(_ddp_worker, 2, str(ddp_dir))

    states = [torch.load(ddp_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, ref in single["state"].items():
        torch.testing.assert_close(states[0][name], ref, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(states[1][name], states[0][name], rtol=0, atol=0, msg=name)
    histories = [json.loads((ddp_dir / f"history{r}.json").read_text()) for r in range(2)]
    assert without_timings(histories[0]) == without_timings(histories[1])  # metrics all-reduced
    for got, want in zip(histories[0], single["history"]):
        assert got["train_n"] == want["train_n"] == N_TRAIN and got["val_n"] == want["val_n"] == 31
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key

    # Only rank 0 wrote: one epoch record per epoch, step records not doubled, one checkpoint.
    records = epoch_records(ddp_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    lines = (ddp_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((single_dir / "metrics.jsonl").read_text().splitlines())
    ckpt = load_checkpoint(ddp_dir / "ckpt" / CHECKPOINT_NAME)
    for name, v in ckpt["model"].items():
        assert torch.equal(v, states[0][name])
    assert sorted(p.name for p in (ddp_dir / "ckpt").iterdir()) == [CHECKPOINT_NAME]


def test_shard_batch_takes_strided_rows():
    t = torch.arange(9)
    assert shard_batch(t, DistContext(rank=0, world_size=2)).tolist() == [0, 2, 4, 6, 8]
    assert shard_batch(t, DistContext(rank=1, world_size=2)).tolist() == [1, 3, 5, 7]
    assert shard_batch(t, DistContext()).tolist() == list(range(9))


def test_parameters_a_run_owned_are_synchronised_by_the_next_run(tmp_path):
    """DDP reads its ignore list from the model when it wraps it: one run's owned parameters must
    not stay ignored (unaveraged, so the ranks drift apart) in a later run that does not own them."""
    from prunekit.engine.distributed import wrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = mlp()
        model._ddp_params_and_buffers_to_ignore = ["0.bias"]  # the caller's own choice is kept
        ctx, cpu = DistContext(rank=0, world_size=2), torch.device("cpu")
        owned = wrap_model(model, ctx, cpu, ignore=["2.weight"])
        assert owned.parameters_to_ignore == {"0.bias", "2.weight"}
        assert model._ddp_params_and_buffers_to_ignore == ["0.bias"]
        del model._ddp_params_and_buffers_to_ignore
        later = wrap_model(model, ctx, cpu)
        assert later.parameters_to_ignore == set()
        assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    finally:
        dist.destroy_process_group()


def _single_sample_shard_worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    x, y = blobs(19)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    try:  # the last global batch of 3 rows leaves rank 1 one of them
        train(model, TinyLoader(x, y, 8), None, TrainConfig(epochs=1), device="cpu", progress=False)
        outcome = "finished"
    except Exception as err:  # noqa: BLE001 (the other rank sees its peer leave)
        outcome = f"{type(err).__name__}: {err}"
    (Path(out_dir) / f"rank{os.environ['RANK']}.txt").write_text(outcome)


def test_a_shard_of_one_sample_that_batch_norm_cannot_train_on_is_one_config_error(tmp_path):
    # the check looked at the global batch (3 rows): rank 1 raised BatchNorm's bare ValueError
    launch_local(_single_sample_shard_worker, 2, str(tmp_path))
    outcome = (tmp_path / "rank1.txt").read_text()
    assert outcome.startswith("ConfigError: training batch 2 leaves a single sample to rank 1"), outcome
    assert "drop_last" in outcome


def _bad_label_eval_worker(out_dir: str, batch_size: int, bad_at: int) -> None:
    from prunekit.engine import evaluate
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'store'}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    try:
        x, y = blobs(9)
        y[bad_at] = 3  # the model gives 3 classes; that batch leaves rank 1 no sample
        torch.manual_seed(0)
        try:
            evaluate(mlp(), TinyLoader(x, y, batch_size), device="cpu")
            outcome = "finished"
        except Exception as err:  # noqa: BLE001
            outcome = f"{type(err).__name__}: {err}"
        (Path(out_dir) / f"rank{os.environ['RANK']}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("batch_size, bad_at, batch", [(4, 8, 2), (1, 0, 0)], ids=["last-batch", "first-batch"])
def test_a_label_outside_the_classes_under_ddp_is_one_config_error_on_every_rank(tmp_path, batch_size, bad_at, batch):
    """The rank holding the label failed in cross-entropy while the other went on (under NCCL: a
    hang). Now the refusal is summed with the results, so every rank raises a ConfigError, the
    rank whose share of that batch was empty (and which had seen no output yet) included."""
    launch_local(_bad_label_eval_worker, 2, str(tmp_path), batch_size, bad_at)
    first = (tmp_path / "rank0.txt").read_text()
    where = f"evaluation batch {batch}" if batch else "evaluation"
    assert first.startswith(f"ConfigError: {where} labels run from"), first
    other = (tmp_path / "rank1.txt").read_text()
    assert other.startswith("ConfigError: evaluation labels outside the model's classes on another rank"), other
