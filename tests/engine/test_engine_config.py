"""TrainConfig validation and the learning-rate schedules against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from prunekit.core.errors import ConfigError
from prunekit.engine import TrainConfig, build_optimizer, build_scheduler, lr_factor, train
from prunekit.engine.logging import read_jsonl

from engine_testkit import TinyLoader, blobs, mlp


def test_defaults_and_round_trip():
    cfg = TrainConfig(epochs=3, optimizer="adamw", lr=1e-3, schedule="onecycle", warmup_epochs=1,
                      label_smoothing=0.1, grad_clip=5.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["version"] == 1


@pytest.mark.parametrize("changes", [
    dict(label_smoothing=0.1), dict(label_smoothing=0.0), dict(schedule="onecycle"),
    dict(schedule="onecycle", warmup_epochs=0.5), dict(schedule="constant", warmup_epochs=2),
    dict(optimizer="adamw", momentum=0.0), dict(nesterov=True), dict(grad_clip=1.0),
    dict(log_every=0), dict(lr=3), dict(warmup_epochs=1),
])
def test_valid_configs(changes):
    cfg = TrainConfig(epochs=2, **changes)
    for key, value in changes.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize("changes, fragment", [
    (dict(epochs=0), "epochs"), (dict(epochs=1.5), "epochs"), (dict(epochs=True), "epochs"),
    (dict(optimizer="adam"), "optimizer"), (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"),
    (dict(lr="0.1"), "lr"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(schedule="step"), "schedule"),
    (dict(warmup_epochs=-1), "warmup_epochs"), (dict(warmup_epochs=2), "warmup_epochs"),
    (dict(warmup_epochs=3, schedule="constant"), "warmup_epochs"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(bf16="yes"), "bf16"), (dict(channels_last=1), "channels_last"), (dict(compile=None), "compile"),
    (dict(seed=-1), "seed"), (dict(grad_clip=0.0), "grad_clip"), (dict(log_every=-5), "log_every"),
    (dict(nesterov=True, momentum=0.0), "nesterov"), (dict(nesterov=True, optimizer="adamw"), "nesterov"),
])
def test_invalid_configs_raise(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**{"epochs": 2, **changes})


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"epochs": 2, "learning_rate": 0.1})


def test_cosine_with_warmup_factors():
    cfg = TrainConfig(epochs=3, schedule="cosine", warmup_epochs=1)
    # 2 steps/epoch -> warm-up steps 0, 1 ramp (1/2, 2/2); then cosine over 4 steps.
    got = [lr_factor(cfg, s, 2) for s in range(6)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert got == pytest.approx(want, abs=1e-12)


def test_constant_and_onecycle_factors():
    const = TrainConfig(epochs=2, schedule="constant", warmup_epochs=0.5)
    assert [lr_factor(const, s, 4) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])
    one = TrainConfig(epochs=2, schedule="onecycle", warmup_epochs=0.5)  # 8 steps, rise 2
    got = [lr_factor(one, s, 4) for s in range(8)]
    low, end = 1 / 25, 1 / 25 / 1e4
    rise = [1 + (low - 1) * (1 + math.cos(math.pi * k / 2)) / 2 for k in range(2)]
    fall = [end + (1 - end) * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert got == pytest.approx(rise + fall, abs=1e-12)
    assert got[0] == pytest.approx(low) and got[2] == pytest.approx(1.0)


def test_scheduler_drives_optimizer_lr_in_training(tmp_path):
    x, y = blobs(40)
    cfg = TrainConfig(epochs=2, lr=0.2, schedule="onecycle", log_every=1, weight_decay=0.0)
    log = tmp_path / "m.jsonl"
    train(mlp(), TinyLoader(x, y, 10), None, cfg, log_path=log, progress=False)
    steps = [r for r in read_jsonl(log) if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(8))
    assert [r["lr"] for r in steps] == pytest.approx([0.2 * lr_factor(cfg, s, 4) for s in range(8)])


def test_build_optimizer_settings():
    model = mlp()
    sgd = build_optimizer(model, TrainConfig(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (0.8, True, 1e-4)
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    sched = build_scheduler(sgd, TrainConfig(epochs=1, lr=0.05, warmup_epochs=0.5), steps_per_epoch=4)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    sgd.step()  # no gradients yet: a no-op that keeps the optimizer-then-scheduler order
    sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05)


def test_frozen_model_is_refused():
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def test_train_argument_errors():
    x, y = blobs(8)
    with pytest.raises(ConfigError, match="TrainConfig"):
        train(mlp(), TinyLoader(x, y, 4), None, {"epochs": 1}, progress=False)
    with pytest.raises(ConfigError, match="no batches"):
        train(mlp(), [], None, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="len"):
        train(mlp(), iter([(x, y)]), None, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="ckpt_dir"):
        train(mlp(), TinyLoader(x, y, 4), None, TrainConfig(epochs=1), resume=True, progress=False)
    with pytest.raises(ConfigError, match="Hook"):
        train(mlp(), TinyLoader(x, y, 4), None, TrainConfig(epochs=1), hooks=[object()], progress=False)


def test_a_device_this_machine_lacks_is_one_config_error():
    # was torch's AssertionError ("not compiled with CUDA") or RuntimeError (a misspelt name)
    x, y = blobs(8)
    missing = [f"cuda:{torch.cuda.device_count()}"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in missing + ["gpu"]:
        with pytest.raises(ConfigError, match=f"device={device!r}"):
            train(mlp(), TinyLoader(x, y, 4), None, TrainConfig(epochs=1), device=device, progress=False)


def test_an_empty_validation_loader_is_refused_before_the_model_trains():
    x, y = blobs(8)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="val_loader has no batches"):
        train(model, TinyLoader(x, y, 4), [], TrainConfig(epochs=1), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    unsized = (batch for batch in [(x, y)])  # no len(): evaluated as it comes
    assert train(mlp(), TinyLoader(x, y, 4), unsized, TrainConfig(epochs=1), progress=False).final_metrics["val_n"] == 8
