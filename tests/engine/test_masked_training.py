"""Weight masks through every training path: plain CPU training with momentum and weight decay,
resume after a crash (into a freshly built model), two-process gloo DDP, and save -> load.

The oracle for "kept" is exact: every masked entry of the effective weight is 0.0 after
training, and the unmasked entries did train.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.engine import CHECKPOINT_NAME, TrainConfig, launch_local, load_checkpoint, train
from prunekit.surgery.masks import apply_mask, get_mask, masked_modules, unstructured_mask
from prunekit.surgery.persist import load_pruned, save_pruned
from prunekit.surgery.plan import empty_plan

from engine_testkit import CountingHook, TinyLoader, blobs, mlp, without_timings

STEPS = 4  # 48 samples in batches of 12


def _data():
    x, y = blobs(48)
    xv, yv = blobs(24, seed=5)
    return TinyLoader(x, y, 12, shuffle="global"), TinyLoader(xv, yv, 12)


def _masked_mlp(seed: int = 0) -> nn.Module:
    model = mlp(seed=seed)
    for layer in (model[0], model[2]):
        apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.6))
    return model


def _assert_masked_zero(model: nn.Module) -> None:
    entries = masked_modules(model)
    assert len(entries) == 2
    for name, module, pname in entries:
        w = getattr(module, pname)
        assert bool((w[~get_mask(module, pname).expand_as(w)] == 0).all()), name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_entries_stay_zero_under_momentum_and_weight_decay(optimizer):
    train_loader, val_loader = _data()
    model = _masked_mlp()
    start = {n: getattr(m, p).detach().clone() for n, m, p in masked_modules(model)}
    # hidden originals start non-zero under the mask: decay and momentum act on them, not on the weight
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(1.0)
    cfg = TrainConfig(epochs=3, lr=0.1, optimizer=optimizer, momentum=0.9, weight_decay=0.05, log_every=0)
    train(model, train_loader, val_loader, cfg, progress=False)
    _assert_masked_zero(model)
    for name, module, pname in masked_modules(model):
        kept = get_mask(module, pname).expand_as(start[name])
        assert not torch.equal(getattr(module, pname)[kept], start[name][kept]), name  # kept weights trained


def test_resume_after_crash_restores_masks_into_a_fresh_model(tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.05, momentum=0.9, weight_decay=5e-4, log_every=0)
    train_loader, val_loader = _data()
    ref_model = _masked_mlp()
    ref = train(ref_model, train_loader, val_loader, cfg, hooks=[CountingHook()], progress=False)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):  # killed at the first step of epoch 3
        train(_masked_mlp(), train_loader, val_loader, cfg, hooks=[CountingHook(crash_at=2 * STEPS)],
              ckpt_dir=ckpt, progress=False)
    assert load_checkpoint(ckpt / CHECKPOINT_NAME)["epoch"] == 1  # two epochs were saved

    fresh = mlp(seed=123)  # a new process builds the plain model; the checkpoint brings the masks
    res = train(fresh, train_loader, val_loader, cfg, hooks=[CountingHook()], ckpt_dir=ckpt,
                progress=False, resume=True)
    assert res.start_epoch == 2
    _assert_masked_zero(fresh)
    assert fresh.state_dict().keys() == ref_model.state_dict().keys()
    for (name, a), b in zip(fresh.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert without_timings(res.history) == without_timings(ref.history)


N_TRAIN, GLOBAL_BATCH = 60, 12
DDP_CFG = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, log_every=0)


def _ddp_run(pruned_file: str) -> nn.Module:
    model = load_pruned(mlp(seed=7), pruned_file)  # masks come from the file
    x, y = blobs(N_TRAIN)
    train(model, TinyLoader(x, y, GLOBAL_BATCH, shuffle="epoch"), None, DDP_CFG, device="cpu", progress=False)
    return model


def _ddp_worker(pruned_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    model = _ddp_run(pruned_file)
    rank = int(os.environ["RANK"])
    save_pruned(model, empty_plan(torch.zeros(1, 6)), Path(out_dir) / f"rank{rank}.safetensors")


def test_masks_survive_two_process_gloo_ddp(tmp_path):
    pruned_file = save_pruned(_masked_mlp(), empty_plan(torch.zeros(1, 6)), tmp_path / "start.safetensors")
    single = _ddp_run(str(pruned_file))
    launch_local(_ddp_worker, 2, str(pruned_file), str(tmp_path))
    ranks = [load_pruned(mlp(seed=1), tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for model in ranks + [single]:
        _assert_masked_zero(model)
    for (name, a), b, c in zip(ranks[0].state_dict().items(), ranks[1].state_dict().values(),
                               single.state_dict().values()):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5, msg=name)


class _BiasGroupHook(CountingHook):
    """Puts the biases in a group of their own, listed last layer first (not the model's order)."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [model[2].bias, model[0].bias], "weight_decay": 0.0}]


def _resume_equals_uninterrupted(tmp_path, cfg: TrainConfig, model, hook) -> None:
    """Train `model()` with `hook()` to the end; crash another run after the first epoch; resume it
    into a freshly built, unmasked model: the masks come back and it ends where the first did."""
    train_loader, val_loader = _data()
    ref_model = model()
    ref = train(ref_model, train_loader, val_loader, cfg, hooks=[hook()], progress=False)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model(), train_loader, val_loader, cfg, hooks=[hook(crash_at=STEPS + 1)], ckpt_dir=ckpt, progress=False)
    fresh = mlp(seed=123)
    res = train(fresh, train_loader, val_loader, cfg, hooks=[hook()], ckpt_dir=ckpt, progress=False, resume=True)
    assert res.start_epoch == 1
    _assert_masked_zero(fresh)
    for (name, a), b in zip(fresh.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert without_timings(res.history) == without_timings(ref.history)


def test_resume_into_a_fresh_model_keeps_a_hook_groups_order(tmp_path):
    # the hook's group keeps its own order (the momentum of 2.bias, 3 entries, used to land on
    # 0.bias, 16 entries)
    cfg = TrainConfig(epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4, log_every=0)
    _resume_equals_uninterrupted(tmp_path, cfg, _masked_mlp, _BiasGroupHook)


class _MaskAfterFirstEpoch(CountingHook):
    """Masks both weights at the end of epoch 0, as gradual pruning does during a run."""

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> None:
        if epoch == 0:
            for layer in (model[0], model[2]):
                apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.6))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_a_hook_masked_weights_during_the_run_equals_the_uninterrupted_run(tmp_path, optimizer):
    # the run's optimizer holds each weight before its bias; the rebuilt, masked model lists the bias first
    cfg = TrainConfig(epochs=3, lr=0.05, optimizer=optimizer, momentum=0.9, weight_decay=5e-4, log_every=0)
    _resume_equals_uninterrupted(tmp_path, cfg, mlp, _MaskAfterFirstEpoch)
