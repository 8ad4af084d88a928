"""The training loop against reference PyTorch computations: hooks, losses, logging, evaluation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.engine import Hook, TrainConfig, epoch_records, evaluate, train
from prunekit.engine.logging import read_jsonl

from engine_testkit import GradRecorder, L2Penalty, TinyLoader, blobs, mlp

PLAIN_SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant")


def _one_batch(n=12, seed=0):
    x, y = blobs(n, seed=seed)
    return TinyLoader(x, y, batch_size=n)


def test_step_matches_reference_sgd_update():
    loader = _one_batch()
    model = mlp()
    ref = copy.deepcopy(model)
    train(model, loader, None, TrainConfig(epochs=1, lr=0.3, **PLAIN_SGD), progress=False)
    # Reference: one SGD step on the mean cross-entropy of the batch.
    x, y = loader.x, loader.y
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.3 * p.grad
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_label_smoothing_and_grad_clip_match_reference():
    loader = _one_batch()
    model = mlp()
    ref = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, lr=0.5, label_smoothing=0.2, grad_clip=0.05, **PLAIN_SGD)
    train(model, loader, None, cfg, progress=False)
    F.cross_entropy(ref(loader.x), loader.y, label_smoothing=0.2).backward()
    grads = [p.grad for p in ref.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 0.05  # the clip is active, so the test checks it
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= 0.5 * g * (0.05 / norm)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_extra_loss_adds_its_analytic_gradient():
    loader = _one_batch()
    base = mlp()
    plain, penalised = copy.deepcopy(base), copy.deepcopy(base)
    rec_plain, rec_pen = GradRecorder(), GradRecorder()
    cfg = TrainConfig(epochs=1, lr=0.1, **PLAIN_SGD)
    train(plain, loader, None, cfg, hooks=[rec_plain], progress=False)
    lam = 0.7
    train(penalised, loader, None, cfg, hooks=[L2Penalty(penalised[0], lam), rec_pen], progress=False)
    # d/dW (lam/2 ||W||^2) = lam * W, evaluated at the initial weights; other grads unchanged.
    diff = rec_pen.grads[0]["0.weight"] - rec_plain.grads[0]["0.weight"]
    torch.testing.assert_close(diff, lam * base[0].weight.detach(), rtol=0, atol=1e-6)
    for name in ("0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(rec_pen.grads[0][name], rec_plain.grads[0][name], rtol=0, atol=0)


def test_none_extra_loss_changes_nothing():
    loader = _one_batch()
    a, b = mlp(), mlp()
    cfg = TrainConfig(epochs=2, lr=0.1)
    train(a, loader, None, cfg, progress=False)
    train(b, loader, None, cfg, hooks=[Hook()], progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


class PerWeightPenalty(Hook):
    def extra_loss(self, model, step):
        return next(model.parameters()).pow(2).sum(dim=1)  # one term per output unit: not summed


def test_an_extra_loss_that_is_not_a_scalar_is_one_config_error_naming_the_hook():
    # was torch's "grad can be implicitly created only for scalar outputs", naming no hook
    from prunekit.core.errors import ConfigError

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"hooks\[1\] \(PerWeightPenalty\)\.extra_loss.*shape \(\d+,\).*scalar"):
        train(model, _one_batch(), None, TrainConfig(epochs=1), hooks=[Hook(), PerWeightPenalty()], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class OrderHook(Hook):
    def __init__(self, model):
        self.model, self.calls = model, []
        self.seen_grad_in_extra = []

    def extra_loss(self, model, step):
        assert model is self.model
        self.seen_grad_in_extra.append(any(p.grad is not None for p in model.parameters()))
        self.calls.append(("extra_loss", step))
        return None

    def after_backward(self, model, step):
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append(("after_backward", step))

    def on_step_end(self, model, step):
        self.calls.append(("on_step_end", step))

    def on_epoch_end(self, model, epoch, metrics):
        assert {"train_loss", "val_acc", "lr"} <= set(metrics)
        self.calls.append(("on_epoch_end", epoch))


def test_hook_call_order_and_step_numbers():
    x, y = blobs(20)
    loader = TinyLoader(x, y, batch_size=10, shuffle="epoch")
    model = mlp()
    hook = OrderHook(model)
    train(model, loader, loader, TrainConfig(epochs=2), hooks=[hook], progress=False)
    want = []
    for epoch in range(2):
        for step in (2 * epoch, 2 * epoch + 1):
            want += [("extra_loss", step), ("after_backward", step), ("on_step_end", step)]
        want.append(("on_epoch_end", epoch))
    assert hook.calls == want
    assert hook.seen_grad_in_extra == [False] * 4  # gradients are cleared before each forward
    assert loader.epochs_seen == [0, 1]


class FreezeFirstLayer(Hook):
    def after_backward(self, model, step):
        for p in model[0].parameters():
            p.grad.zero_()


def test_after_backward_zeroing_grads_freezes_weights():
    x, y = blobs(30)
    model = mlp()
    before = copy.deepcopy(model)
    cfg = TrainConfig(epochs=2, lr=0.2, momentum=0.9, weight_decay=0.0)
    train(model, TinyLoader(x, y, 10), None, cfg, hooks=[FreezeFirstLayer()], progress=False)
    assert torch.equal(model[0].weight, before[0].weight) and torch.equal(model[0].bias, before[0].bias)
    assert not torch.equal(model[2].weight, before[2].weight)


class AddMetric(Hook):
    def on_epoch_end(self, model, epoch, metrics):
        metrics["sparsity"] = 0.25 * epoch
        metrics["w_norm"] = model[0].weight.norm()  # a tensor: logged as a number


def test_on_epoch_end_metrics_land_in_jsonl_and_history(tmp_path):
    x, y = blobs(60)
    xv, yv = blobs(30, seed=1)
    model = mlp()
    log = tmp_path / "run" / "metrics.jsonl"
    cfg = TrainConfig(epochs=3, lr=0.1, log_every=2)
    result = train(model, TinyLoader(x, y, 20), TinyLoader(xv, yv, 16), cfg, hooks=[AddMetric()],
                   log_path=log, progress=False)
    records = epoch_records(log)
    assert [r["sparsity"] for r in records] == [0.0, 0.25, 0.5]
    assert records[-1]["w_norm"] == pytest.approx(model[0].weight.norm().item())
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for rec, hist in zip(records, result.history):
        assert {k: v for k, v in rec.items() if k != "event"} == hist
    # 3 steps per epoch, a step record every 2 steps: steps 1, 3, 5, 7.
    assert [r["step"] for r in read_jsonl(log) if r["event"] == "step"] == [1, 3, 5, 7]
    # The logged validation numbers are those of an independent evaluation of the final model.
    oracle = evaluate(model, TinyLoader(xv, yv, 16))
    assert records[-1]["val_acc"] == pytest.approx(oracle["acc"])
    assert records[-1]["val_loss"] == pytest.approx(oracle["loss"])
    assert records[-1]["val_n"] == 30 and records[-1]["train_n"] == 60


def test_epoch_records_keep_the_epochs_of_each_stage_of_a_run_directory_apart(tmp_path):
    # a run directory's metrics.jsonl holds the dense training and the fine-tuning: epoch 0 of the
    # fine-tuning replaced epoch 0 of the training, which gave a mix of both stages
    from prunekit.engine.logging import MetricsLog

    log = tmp_path / "metrics.jsonl"
    with MetricsLog(log) as m:
        m.write("stage", name="train", epochs=3)
        for e in range(3):
            m.write("epoch", epoch=e, val_acc=0.1 * (e + 1))
        m.write("stage", name="finetune", epochs=2)
        m.write("epoch", epoch=0, val_acc=0.5)
        m.write("stage", name="finetune", epochs=2, resume=True)  # resumed: epoch 0 again, then 1
        m.write("epoch", epoch=0, val_acc=0.55)
        m.write("epoch", epoch=1, val_acc=0.6)
    records = epoch_records(log)
    assert [(r["stage"], r["epoch"], r["val_acc"]) for r in records] == [
        ("train", 0, 0.1), ("train", 1, 0.2), ("train", 2, pytest.approx(0.3)), ("finetune", 0, 0.55),
        ("finetune", 1, 0.6)]
    assert [r["val_acc"] for r in epoch_records(log, stage="finetune")] == [0.55, 0.6]


def test_evaluate_matches_manual_computation():
    x, y = blobs(25)
    model = mlp().train()
    out = evaluate(model, TinyLoader(x, y, 7))
    with torch.no_grad():
        logits = model(x)
    assert out["n"] == 25
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training  # mode restored


def test_evaluate_checks_the_labels_of_the_first_batch_with_samples():
    # an empty first batch took the label check with it: -100 was then counted as a sample
    # scored wrong and given no loss, 42 a raw IndexError
    from prunekit.core.errors import ConfigError

    x, y = blobs(8)
    empty = (x[:0], y[:0])
    for bad in (-100, 42):
        with pytest.raises(ConfigError, match=f"evaluation labels run from {min(bad, 0)}"):
            evaluate(mlp(), [empty, (x, torch.cat([y[:-1], torch.tensor([bad])]))])
    assert evaluate(mlp(), [empty, (x, y)])["n"] == 8


def test_evaluate_uses_eval_mode():
    x, y = blobs(16)
    model = mlp(dropout=0.9)
    a, b = evaluate(model, [(x, y)]), evaluate(model, [(x, y)])
    assert a == b  # dropout off: deterministic


def test_learns_sklearn_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = TrainConfig(epochs=6, lr=0.1, momentum=0.9, weight_decay=1e-4, warmup_epochs=1)
    result = train(model, TinyLoader(x[tr], y[tr], 50, shuffle="epoch"), TinyLoader(x[va], y[va], 200),
                   cfg, progress=False)
    assert result.best_val_acc > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    accs = [h["val_acc"] for h in result.history]
    assert result.best_val_acc == max(accs) and accs[result.best_epoch] == max(accs)


def test_bf16_on_cpu_is_ignored_with_a_note(tmp_path):
    x, y = blobs(20)
    a, b = mlp(), mlp()
    log = tmp_path / "m.jsonl"
    with pytest.warns(UserWarning, match="bf16"):
        res = train(a, TinyLoader(x, y, 10), None, TrainConfig(epochs=1, bf16=True), log_path=log,
                    device="cpu", progress=False)
    train(b, TinyLoader(x, y, 10), None, TrainConfig(epochs=1), device="cpu", progress=False)
    assert any("bf16" in n for n in res.notes)
    assert any(r["event"] == "note" and "bf16" in r["message"] for r in read_jsonl(log))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_channels_last_cnn_matches_default_layout():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))

    def cnn():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    a, b = cnn(), cnn()
    cfg = TrainConfig(epochs=2, lr=0.1, channels_last=False)
    ra = train(a, TinyLoader(x, y, 8), TinyLoader(x, y, 8), cfg, progress=False)
    rb = train(b, TinyLoader(x, y, 8), TinyLoader(x, y, 8), cfg.replace(channels_last=True), progress=False)
    assert a[0].weight.is_contiguous(memory_format=torch.channels_last) is False
    assert b[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert ra.final_metrics["val_loss"] == pytest.approx(rb.final_metrics["val_loss"], rel=1e-4)


def test_cpu_default_trains_channels_last_and_hands_the_model_back_in_its_layout():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    seen = []

    class Spy(Hook):
        def on_step_end(self, model, step):
            seen.append(model[0].weight.is_contiguous(memory_format=torch.channels_last))

    def cnn():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    a, b = cnn(), cnn()
    train(a, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1), hooks=[Spy()], progress=False)
    train(b, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1, channels_last=False), progress=False)
    assert seen and all(seen)  # the default (None) trained in NHWC on the CPU
    assert a[0].weight.is_contiguous()  # ... and gave the model back in the default layout
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)



def test_a_model_given_channels_last_comes_back_channels_last():
    """The CPU default trains in NHWC and hands the model back in the layout it came in: a model the
    caller had made channels-last stays so (it came back contiguous)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)
    train(model, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1), progress=False)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()

class _Volume(nn.Module):
    """A Conv3d (5-D weight) whose depth-averaged output feeds a Conv2d (4-D weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv3 = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv3(x)).mean(dim=2)
        return self.head(torch.relu(self.conv2(h)).mean(dim=(2, 3)))


@pytest.mark.parametrize("channels_last", [None, True])
def test_channels_last_leaves_5d_tensors_alone_and_trains_as_the_default_layout(channels_last):
    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 3, 6, 6), torch.randint(0, 3, (8,))
    a, b = _Volume(), _Volume()
    cfg = TrainConfig(epochs=2, lr=0.1, channels_last=False)
    train(a, TinyLoader(x, y, 4), TinyLoader(x, y, 4), cfg, progress=False)
    train(b, TinyLoader(x, y, 4), TinyLoader(x, y, 4), cfg.replace(channels_last=channels_last), progress=False)
    assert b.conv3.weight.is_contiguous()
    assert b.conv2.weight.is_contiguous(memory_format=torch.channels_last) is bool(channels_last)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


class BadMetric(Hook):
    def on_epoch_end(self, model, epoch, metrics):
        metrics["model"] = model  # not a number: it could not be logged


def test_unloggable_metric_raises_config_error():
    from prunekit.core.errors import ConfigError
    x, y = blobs(10)
    with pytest.raises(ConfigError, match="cannot be logged"):
        train(mlp(), TinyLoader(x, y, 5), None, TrainConfig(epochs=1), hooks=[BadMetric()], progress=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compile_matches_eager():
    x, y = blobs(40)
    a, b = mlp(), mlp()
    cfg = TrainConfig(epochs=2, lr=0.1)
    ra = train(a, TinyLoader(x, y, 10), TinyLoader(x, y, 20), cfg, progress=False)
    rb = train(b, TinyLoader(x, y, 10), TinyLoader(x, y, 20), cfg.replace(compile=True), progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ra.final_metrics["val_loss"] == pytest.approx(rb.final_metrics["val_loss"], rel=1e-5)


def test_a_diverging_training_stops_at_the_first_non_finite_step_with_finite_weights():
    from prunekit.core.errors import TrainingError

    x, y = blobs(64)
    model = mlp()
    with pytest.raises(TrainingError, match="training diverged at epoch .*lower the learning rate"):
        train(model, TinyLoader(x, y, 16), None, TrainConfig(epochs=3, lr=1e6, schedule="constant"), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the optimizer never stepped into NaN
    train(mlp(), TinyLoader(x, y, 16), None, TrainConfig(epochs=1, lr=0.1, grad_clip=1.0), progress=False)  # no error


def test_a_non_finite_step_leaves_the_running_statistics_of_the_step_before():
    from prunekit.core.errors import TrainingError

    x, y = blobs(32)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    bad = x[16:].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="training diverged at epoch 1, step 2"):
        train(model, [(x[:16], y[:16]), (bad, y[16:])], None, TrainConfig(epochs=1), progress=False)
    assert all(torch.isfinite(b).all() for b in model.buffers())  # the statistics of step 1, not NaN
    assert int(model[1].num_batches_tracked) == 1
    model2 = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(TrainingError, match="step 1"):
        train(model2, [(bad, y[16:])], None, TrainConfig(epochs=1), progress=False)
    fresh = nn.BatchNorm1d(8)
    assert torch.equal(model2[1].running_mean, fresh.running_mean)
    assert torch.equal(model2[1].running_var, fresh.running_var)
    assert int(model2[1].num_batches_tracked) == 0


def test_a_single_sample_batch_that_batch_norm_cannot_train_on_is_one_config_error():
    from prunekit.core.errors import ConfigError

    x, y = blobs(17)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="training batch 1 has a single sample.*drop_last"):
        train(model, TinyLoader(x, y, 16), None, TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize("batch, fragment", [
    ((None, None), "holds \\(NoneType, NoneType\\)"),
    ("x_only", "batch 0 is a Tensor"),
    ("label_42", "labels run from .* to 42 but the model gives 3 classes"),
    ("label_-100", "labels run from -100"),
    ("float_labels", "one integer class label per sample"),
    ("empty", "has no samples"),
    ("wide_inputs", "cannot run the first training batch"),
])
def test_a_batch_the_engine_cannot_use_is_one_config_error_and_leaves_the_running_statistics(batch, fragment):
    from prunekit.core.errors import ConfigError

    x, y = blobs(16)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    stats = model[1].running_mean.clone()
    bad = {"x_only": x, "label_42": (x, torch.full_like(y, 42)), "label_-100": (x, torch.full_like(y, -100)),
           "float_labels": (x, y.float()), "empty": (x[:0], y[:0]), "wide_inputs": (torch.randn(16, 7), y)}.get(batch, batch)
    with pytest.raises(ConfigError, match=fragment):
        train(model, [bad], None, TrainConfig(epochs=1), progress=False)
    assert torch.equal(model[1].running_mean, stats)
    with pytest.raises(ConfigError, match="evaluation labels run from"):
        evaluate(model, [(x, torch.full_like(y, 7))])


def test_integer_labels_of_any_width_train_and_evaluate():
    x, y = blobs(32)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        model = mlp()
        train(model, [(x, y.to(dtype))], None, TrainConfig(epochs=1), progress=False)
        assert evaluate(model, [(x, y.to(dtype))])["n"] == 32


@pytest.mark.parametrize("bad", [7, -100])
def test_labels_outside_the_classes_in_a_later_batch_are_one_config_error_naming_it(bad):
    # only the first batch was checked: 7 was a raw IndexError, -100 trained and scored silently on nothing
    from prunekit.core.errors import ConfigError

    x, y = blobs(24)
    later = (x[16:], torch.cat([y[16:-1], torch.tensor([bad])]))
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), later]
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, lr=0.1, schedule="constant")
    with pytest.raises(ConfigError, match=f"training batch 2 labels run from .* to {max(bad, 2)} but the model gives 3 classes"):
        train(model, batches, None, cfg, progress=False)
    train(ref, batches[:2], None, cfg, progress=False)
    for k, v in ref.state_dict().items():  # the refused step changed neither weights nor running statistics
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ConfigError, match=f"evaluation batch 2 labels run from .* to {max(bad, 2)}"):
        evaluate(model, batches)
