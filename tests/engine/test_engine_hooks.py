"""Hooks that methods live in: the loop's state, parameter groups, owned parameters, exact resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.engine import CHECKPOINT_NAME, Hook, TrainConfig, TrainState, load_checkpoint, train

from engine_testkit import TinyLoader, blobs, mlp, without_timings


class Scaled(nn.Module):
    """mlp(x) * scale: `scale` is a parameter of the model that a hook may own."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = mlp(seed=seed)
        self.scale = nn.Parameter(torch.tensor([1.0, 1.5, 0.5]))

    def forward(self, x):
        return self.net(x) * self.scale


class Spy(Hook):
    """Records what the loop shows at each point of a step, and checks it against the batch."""

    def __init__(self, lam: float = 0.01):
        self.lam, self.state, self.binds, self.seen = lam, None, 0, []

    def bind(self, state):
        self.state, self.binds = state, self.binds + 1

    def before_step(self, model, step):
        s = self.state
        assert s.loss is None and s.step == step and s.epoch == step // s.steps_per_epoch
        self.seen.append(("before", step, s.batch[0].clone(), s.batch[1].clone()))

    def extra_loss(self, model, step):
        return self.lam * model[0].weight.pow(2).sum()

    def after_backward(self, model, step):
        x, y = self.state.batch
        with torch.no_grad():
            want = F.cross_entropy(model(x), y) + self.lam * model[0].weight.pow(2).sum()
        self.seen.append(("loss", step, float(self.state.loss.detach()), float(want)))


def test_hook_sees_batch_loss_optimizer_and_state():
    x, y = blobs(20)
    loader = TinyLoader(x, y, 10)
    model, spy = mlp(), Spy()
    train(model, loader, None, TrainConfig(epochs=2, lr=0.05), hooks=[spy], progress=False)
    state = spy.state
    assert spy.binds == 1 and isinstance(state, TrainState)
    assert state.model is model and state.steps_per_epoch == 2 and state.cfg.epochs == 2
    assert [id(p) for p in state.optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert state.scheduler.optimizer is state.optimizer and state.device == torch.device("cpu")
    befores = [s for s in spy.seen if s[0] == "before"]
    assert [s[1] for s in befores] == [0, 1, 2, 3]
    for (_, step, bx, by) in befores:  # the batch the step trains on, in loader order
        i = (step % 2) * 10
        assert torch.equal(bx, x[i:i + 10]) and torch.equal(by, y[i:i + 10])
    losses = [s for s in spy.seen if s[0] == "loss"]
    assert len(losses) == 4
    for (_, _, got, want) in losses:
        # `want` is computed after backward but before the step: same weights, same loss.
        assert got == pytest.approx(want, rel=1e-6)


class OwnScale(Hook):
    """Owns `scale`: the main optimizer must never touch it, whatever its gradient or decay."""

    def owned_parameters(self, model):
        return [model.scale]


def test_owned_parameters_are_out_of_the_main_optimizer():
    x, y = blobs(24)
    model = Scaled()
    before = model.scale.detach().clone()
    cfg = TrainConfig(epochs=2, lr=0.1, weight_decay=0.5)
    res_state = {}

    class Grab(OwnScale):
        def bind(self, state):
            res_state["opt"] = state.optimizer

    train(model, TinyLoader(x, y, 8), None, cfg, hooks=[Grab()], progress=False)
    assert torch.equal(model.scale.detach(), before)  # no decay, no momentum, no step
    opt = res_state["opt"]
    assert all(p is not model.scale for g in opt.param_groups for p in g["params"])
    assert not any(p is model.scale for p in opt.state)
    # The oracle that the test can fail: without the hook, decay and gradients move it.
    other = Scaled()
    train(other, TinyLoader(x, y, 8), None, cfg, progress=False)
    assert not torch.equal(other.scale.detach(), before)


class Recorder(Hook):
    def __init__(self):
        self.grads = None

    def after_backward(self, model, step):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters()}


class NoDecayBiases(Hook):
    def param_groups(self, model):
        return [{"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 0.01}]


def test_param_group_settings_match_a_hand_computed_step():
    x, y = blobs(8)
    model = mlp()
    old = copy.deepcopy(model.state_dict())
    rec = Recorder()
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, weight_decay=0.5, schedule="constant")
    train(model, [(x, y)], None, cfg, hooks=[NoDecayBiases(), rec], progress=False)
    new = model.state_dict()
    for name in ("0.bias", "2.bias"):  # own group: lr 0.01, no decay (first SGD step: buf = grad)
        torch.testing.assert_close(new[name], old[name] - 0.01 * rec.grads[name], rtol=0, atol=1e-7)
    for name in ("0.weight", "2.weight"):
        want = old[name] - 0.1 * (rec.grads[name] + 0.5 * old[name])
        torch.testing.assert_close(new[name], want, rtol=0, atol=1e-7)


def test_claiming_a_parameter_twice_or_an_unknown_setting_is_refused():
    x, y = blobs(8)

    class Both(NoDecayBiases):
        def owned_parameters(self, model):
            return [model[0].bias]

    with pytest.raises(ConfigError, match=r"0\.bias is claimed by both"):
        train(mlp(), [(x, y)], None, TrainConfig(epochs=1), hooks=[Both()], progress=False)

    class Typo(Hook):
        def param_groups(self, model):
            return [{"params": [model[0].bias], "weight_decy": 0.0}]

    with pytest.raises(ConfigError, match="weight_decy"):
        train(mlp(), [(x, y)], None, TrainConfig(epochs=1), hooks=[Typo()], progress=False)


@pytest.mark.parametrize("setting, optimizer, needs", [
    ({"lr": float("nan")}, "sgd", "a finite number >= 0"), ({"lr": -0.1}, "sgd", "a finite number >= 0"),
    ({"weight_decay": "0"}, "sgd", "a finite number >= 0"), ({"nesterov": 1}, "sgd", "true, false or null"),
    ({"betas": (0.9, 1.0)}, "adamw", r"two numbers in \[0, 1\)"), ({"eps": float("inf")}, "adamw", "a finite number"),
])
def test_a_hook_group_setting_of_the_wrong_kind_is_refused_before_training(setting, optimizer, needs):
    x, y = blobs(8)
    key = next(iter(setting))

    class Bad(Hook):
        def param_groups(self, model):
            return [{"params": [model[0].bias], **setting}]

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=f"sets {key}=.*needs {needs}"):
        train(model, [(x, y)], None, TrainConfig(epochs=1, optimizer=optimizer), hooks=[Bad()], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    import numpy as np
    ok = {"lr": torch.tensor(0.01), "weight_decay": np.float32(0.0)}  # tensor and NumPy values, as torch.optim takes them
    if optimizer == "adamw":
        ok["betas"] = np.array([0.9, 0.99])
    else:
        ok.update(momentum=np.int64(0), nesterov=np.bool_(False))

    class Good(Hook):
        def param_groups(self, model):
            return [{"params": [model[0].bias], **ok}]

    train(mlp(), [(x, y)], None, TrainConfig(epochs=1, optimizer=optimizer), hooks=[Good()], progress=False)


class ScaleTuner(Hook):
    """Steps the owned `scale` with its own Adam on a separate batch before every main step
    (the shape of an architecture optimizer); can crash at a given step."""

    def __init__(self, model, val_batches, crash_at=None):
        self.val, self.crash_at, self.state = val_batches, crash_at, None
        self.opt = torch.optim.Adam([model.scale], lr=0.05)

    def owned_parameters(self, model):
        return [model.scale]

    def bind(self, state):
        self.state = state

    def before_step(self, model, step):
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        x, y = self.val[step % len(self.val)]
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        self.opt.step()

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


def test_resume_with_an_owned_optimizer_is_exact(tmp_path):
    x, y = blobs(48)
    xv, yv = blobs(24, seed=5)
    val = [(xv[i:i + 8], yv[i:i + 8]) for i in range(0, 24, 8)]
    cfg = TrainConfig(epochs=3, lr=0.05, optimizer="adamw", log_every=0)

    def loader():
        return TinyLoader(x, y, 12, shuffle="global")

    ref_model = Scaled()
    ref_hook = ScaleTuner(ref_model, val)
    ref = train(ref_model, loader(), loader(), cfg, hooks=[ref_hook], progress=False)

    crashed = Scaled()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, loader(), loader(), cfg, hooks=[ScaleTuner(crashed, val, crash_at=6)],
              ckpt_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 0

    model = Scaled(seed=7)  # a fresh process: different initial weights, fresh Adam
    hook = ScaleTuner(model, val)
    res = train(model, loader(), loader(), cfg, hooks=[hook], ckpt_dir=tmp_path, resume=True, progress=False)
    assert res.start_epoch == 1
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    got, want = hook.opt.state_dict(), ref_hook.opt.state_dict()
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(got["state"][0][key], want["state"][0][key]), key
    assert without_timings(res.history) == without_timings(ref.history)
    assert not torch.equal(model.scale.detach(), Scaled().scale.detach())  # the hook did step it


def test_a_single_parameter_given_where_a_list_belongs_is_taken_as_that_parameter():
    # a tensor was iterated row by row: "can't optimize a non-leaf Tensor", or
    # "Boolean value of Tensor with more than one value is ambiguous"
    x, y = blobs(8)

    class GroupOfOne(Hook):
        def param_groups(self, model):
            return [{"params": model[0].bias, "weight_decay": 0.0}]

    class OwnsOne(Hook):
        def owned_parameters(self, model):
            return model[2].bias

    model = mlp()
    bias = model[2].bias.detach().clone()
    hooks = [GroupOfOne(), OwnsOne()]
    train(model, [(x, y)], None, TrainConfig(epochs=1, lr=0.1, weight_decay=0.1), hooks=hooks, progress=False)
    assert torch.equal(model[2].bias.detach(), bias)  # owned and never stepped by its hook

    class Bias(Hook):
        def owned_parameters(self, model):
            return [model[0].bias]

    with pytest.raises(ConfigError, match=r"0\.bias is claimed by both"):
        train(mlp(), [(x, y)], None, TrainConfig(epochs=1), hooks=[GroupOfOne(), Bias()], progress=False)


@pytest.mark.parametrize("extra", ["0.5", [0.5], {"loss": 0.5}])
def test_an_extra_loss_that_is_not_a_number_is_one_config_error_naming_the_hook(extra):
    x, y = blobs(8)

    class Odd(Hook):
        def extra_loss(self, model, step):
            return extra

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"hooks\[0\] \(Odd\)\.extra_loss returned a .*; return a scalar"):
        train(model, [(x, y)], None, TrainConfig(epochs=1), hooks=[Odd()], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _Outside(Hook):
    """Trains a parameter that lives on the hook, not in the model."""

    def __init__(self, stateful: bool = False):
        self.p = nn.Parameter(torch.zeros(3))
        if stateful:
            self.state_dict = lambda: {"p": self.p.detach().clone()}
            self.load_state_dict = lambda state: self.p.data.copy_(state["p"])

    def param_groups(self, model):
        return [{"params": [self.p], "lr": 0.1}]

    def extra_loss(self, model, step):
        return (self.p - 1).pow(2).sum()


def test_a_parameter_outside_the_model_is_refused_with_a_checkpoint_unless_the_hook_saves_it(tmp_path):
    """A resumed run started it again from zero (uninterrupted 1.44, resumed 0.12) without a word."""
    data = TinyLoader(*blobs(32), 8)
    cfg = TrainConfig(epochs=1, lr=0.05)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"hooks\[0\] \(_Outside\) trains 1 parameter\(s\) outside the model"):
        train(model, data, None, cfg, hooks=[_Outside()], ckpt_dir=tmp_path / "a", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train(mlp(), data, None, cfg, hooks=[_Outside()], progress=False)  # no checkpoint: nothing to lose
    hook = _Outside(stateful=True)
    train(mlp(), data, None, cfg, hooks=[hook], ckpt_dir=tmp_path / "b", progress=False)
    assert float(hook.p.sum()) > 0


def test_a_hook_state_a_checkpoint_cannot_hold_is_refused_before_the_first_epoch(tmp_path):
    """It was refused when the first checkpoint was written, after the model had trained an epoch."""
    class SetState(Hook):
        def state_dict(self):
            return {"seen": {1, 2}}

        def load_state_dict(self, state):
            pass

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"hooks\[0\] \(SetState\).state_dict\(\)\['seen'\] is a set"):
        train(model, TinyLoader(*blobs(32), 8), None, TrainConfig(epochs=1, lr=0.05), hooks=[SetState()],
              ckpt_dir=tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.iterdir())
