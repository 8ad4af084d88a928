"""SLR / ADMM: update rules against hand-computed numbers, hook, hard pruning, BN recalibration."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import CheckpointError, ConfigError, PruningError
from prunekit.methods.slr import (
    ProjectionSpec,
    SLRConfig,
    SLRHook,
    admm_update,
    alpha,
    check_w_step,
    hard_prune_,
    init_state,
    lagrangian,
    norms_after,
    penalty,
    recalibrate_bn,
    resolve_targets,
    slr_update,
)
from prunekit.surgery.masks import get_mask, remove_masks

RHO, S0, M, R = 0.1, 0.01, 300, 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SPEC = ProjectionSpec("irregular", {"w": 0.5})  # 2 entries, keep the larger one


def _vec(*xs):
    return {"w": torch.tensor(xs, dtype=torch.float64)}


def _close(d, *xs, tol=1e-9):
    return torch.allclose(d["w"], torch.tensor(xs, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------- pure rules


def test_alpha_matches_the_derived_table():
    # the SLR authors' step-size rule (M=300, r=0.1) gives α^k = 0.99667 (k=1), 0.99682 (k=2), 0.99792 (k=10), 0.99939 (k=100).
    got = [round(alpha(k, M, R), 5) for k in (1, 2, 10, 100)]
    assert got == [0.99667, 0.99682, 0.99792, 0.99939]
    assert alpha(1, M, R) == pytest.approx(1 - 1 / 300)  # k^(1-1/k^r) = 1 at k = 1


def test_penalty_value_and_gradient():
    W = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    Z = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0]])}
    U = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([[1.0]])}
    p = penalty(W, Z, U, 0.2)
    # ρ/2 (||[0.5, 1]||² + ||4||²) = 0.1 * (0.25 + 1 + 16)
    assert p.item() == pytest.approx(1.725)
    p.backward()
    assert torch.allclose(W["a"].grad, torch.tensor([0.1, 0.2]))  # ρ (W - Z + U)
    assert torch.allclose(W["b"].grad, torch.tensor([[0.8]]))


def test_lagrangian_equals_the_multiplier_form():
    W, Z, U = _vec(2.0, -1.0), _vec(2.0, 0.0), _vec(0.3, 0.4)
    # f + tr(Λᵀ(W - Z)) + ρ/2 ||W - Z||², Λ = ρU: 1.5 + 0.1*0.4*(-1) + 0.05*1
    assert lagrangian(1.5, W, Z, U, RHO) == pytest.approx(1.5 - 0.04 + 0.05)


# ------------------------------------------------------------ SLR two-step hand example
#
# One layer W = (w1, w2), irregular sparsity 0.5, ρ = 0.1, s⁰ = 0.01, M = 300, r = 0.1.
# Start W⁰ = (3, 1): Z⁰ = (3, 0), U⁰ = 0, W_prev = W⁰, Z_prev = Z⁰, k = 1.
#
# Update 1 at W¹ = (2.5, 0.8), f = 1.0:
#   check 1 forced (k = 1); α1 = 1 - 1/300 = 0.99666667
#   ||W_prev - Z_prev|| = ||(0, 1)|| = 1;  ||W¹ - Z⁰|| = ||(-0.5, 0.8)|| = √0.89 = 0.94339811
#   s = 0.99666667 * 0.01 * 1 / 0.94339811 = 0.0105646455
#   U = (s/ρ)(W¹ - Z⁰) = 0.105646455 * (-0.5, 0.8) = (-0.0528232277, 0.0845171643);  k = 2
#   Z¹ = Π(W¹ + U) = Π(2.4471767723, 0.8845171643) = (2.4471767723, 0)
#   check 2: ||W¹ - Z¹ + U||² = 0.7823707 < ||W¹ - Z⁰ + U||² = 1.0879 -> accepted
#   α2 = 1 - 1/(300 * 2^(1 - 1/2^0.1)) = 0.9968178572
#   s = 0.9968178572 * 0.0105646455 * 0.94339811 / ||(0.0528232277, 0.8)|| (= 0.8017420367)
#     = 0.0123917056
#   U += (s/ρ)(W¹ - Z¹) = (-0.0462775288, 0.1836508093);  k = 3
#
# Update 2 at W² = (2.45, 0.3), f = 0.9:
#   check 1: L(0.9, W², Z¹, U) = 0.9099969 < L(1.0, W¹, Z¹, U) = 1.0465871 -> accepted
#   α3 = 0.9970267028; s = α3 * 0.0123917056 * 0.8017420367 / ||W² - Z¹|| (= 0.3000132841)
#     = 0.0330165772;  U = (-0.0453453957, 0.2827005409);  k = 4
#   Z² = Π(W² + U) = (2.4046546043, 0)
#   check 2 accepted; α4 = 0.9972142482; s = α4 * s * 0.3000132841 / 0.3034076547 = 0.0325562575
#   U = (-0.0305826319, 0.3803693133);  k = 5


def test_slr_two_updates_match_hand_computation():
    state = init_state(_vec(3.0, 1.0), SPEC, S0)
    assert _close(state.Z, 3.0, 0.0) and _close(state.U, 0.0, 0.0) and state.k == 1

    info = slr_update(state, _vec(2.5, 0.8), 1.0, RHO, M, R)
    assert (info["accepted_w"], info["accepted_z"], state.k) == (1, 1, 3)
    assert state.s == pytest.approx(0.012391705630, rel=1e-9)
    assert _close(state.U, -0.046277528808, 0.183650809341)
    assert _close(state.Z, 2.447176772313, 0.0)

    info = slr_update(state, _vec(2.45, 0.3), 0.9, RHO, M, R)
    assert (info["accepted_w"], info["accepted_z"], state.k) == (1, 1, 5)
    assert info["alpha"] == pytest.approx(0.997026702846, rel=1e-10)
    assert state.s == pytest.approx(0.032556257488, rel=1e-9)
    assert _close(state.U, -0.030582631890, 0.380369313336)
    assert _close(state.Z, 2.404654604341, 0.0)
    assert _close(state.W_prev, 2.45, 0.3) and state.f_prev == 0.9


def test_rejected_check_keeps_the_multiplier():
    state = init_state(_vec(3.0, 1.0), SPEC, S0)
    slr_update(state, _vec(2.5, 0.8), 1.0, RHO, M, R)
    slr_update(state, _vec(2.45, 0.3), 0.9, RHO, M, R)
    U_before, s_before = dict(state.U), state.s
    W3 = _vec(2.6, 0.9)
    # The loss jumped from 0.9 to 2.0: L(W³) = 2.0760 > L(W_prev) = 0.9159, so check 1 fails.
    assert not check_w_step(2.0, 0.9, W3, state.W_prev, state.Z_prev, state.U, RHO)
    info = slr_update(state, W3, 2.0, RHO, M, R)
    assert info["accepted_w"] == 0
    # Λ was not moved by step 1: Z³ = Π(W³ + U²) uses the old U, then check 2 (same W on both
    # sides) passes with α5 = 0.9973759639 and s = α5 * 0.0325562575 * 0.3034076547 / 0.9005194597.
    assert _close(state.Z, 2.6 + float(U_before["w"][0]), 0.0)
    assert state.s == pytest.approx(0.010940238850, rel=1e-9)
    expected_u = U_before["w"] + (state.s / RHO) * (W3["w"] - state.Z["w"])
    assert torch.allclose(state.U["w"], expected_u) and state.k == 6
    assert _close(state.U, -0.027236818914, 0.478831462984) and s_before != state.s


def test_reference_mode_both_checks_rejected_leave_multiplier_step_and_k():
    # clone_previous=False: f is compared with the previous update's f; a loss rise that beats
    # the penalty change rejects both checks, so U, s and k stay, while Z is still replaced.
    live = torch.tensor([3.0, 1.0], dtype=torch.float64)
    state = init_state({"w": live}, SPEC, S0, clone_previous=False)
    live.copy_(torch.tensor([2.5, 0.8], dtype=torch.float64))
    slr_update(state, {"w": live}, 1.0, RHO, M, R)
    U, s, k = state.U["w"].clone(), state.s, state.k
    live.copy_(torch.tensor([2.4, 0.7], dtype=torch.float64))
    info = slr_update(state, {"w": live}, 5.0, RHO, M, R)
    assert (info["accepted_w"], info["accepted_z"]) == (0, 0)
    assert torch.equal(state.U["w"], U) and state.s == s and state.k == k
    assert _close(state.Z, 2.4 + float(U[0]), 0.0)


def test_clone_previous_false_aliases_the_live_weights():
    live = torch.tensor([3.0, 1.0], dtype=torch.float64)
    clean = init_state({"w": live}, SPEC, S0, clone_previous=True)
    ref = init_state({"w": live}, SPEC, S0, clone_previous=False)
    live.add_(1.0)  # an optimizer step, in place
    assert _close(ref.W_prev, 4.0, 2.0)  # the reference's W_prev ≡ W
    assert _close(clean.W_prev, 3.0, 1.0)
    # Aliased, ||W_prev - Z_prev|| = ||W - Z_prev||: the step-1 ratio is 1, s only decays by α.
    slr_update(ref, {"w": live}, 1.0, RHO, M, R)
    assert ref.history[0]["s"] != S0 and ref.W_prev["w"].data_ptr() == live.data_ptr()


def test_admm_update_matches_hand_computation():
    state = init_state(_vec(3.0, 1.0), SPEC, S0)
    admm_update(state, _vec(2.5, 0.8))  # Z = Π(2.5, 0.8) = (2.5, 0); U = (0, 0.8)
    assert _close(state.Z, 2.5, 0.0) and _close(state.U, 0.0, 0.8)
    admm_update(state, _vec(2.4, 0.5))  # Π(2.4, 1.3) = (2.4, 0); U = (0, 0.8 + 0.5)
    assert _close(state.Z, 2.4, 0.0) and _close(state.U, 0.0, 1.3)


# ------------------------------------------------------------------------------ config


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="needs sparsity"):
        SLRConfig()
    with pytest.raises(ConfigError, match="set sparsity to null"):
        SLRConfig(sparsity_type="nm", sparsity=0.5)
    with pytest.raises(ConfigError, match="not allowed"):
        SLRConfig(sparsity_type="blocks", sparsity=0.5)
    with pytest.raises(ConfigError, match="not both"):
        SLRConfig(sparsity={"a": 0.5}, layers=["a"])
    with pytest.raises(ConfigError, match="global"):
        SLRConfig(sparsity_type="filter", sparsity=0.5, scope="global")
    with pytest.raises(ConfigError, match="out of range"):
        SLRConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="apply only to sparsity_type='nm'"):  # would be ignored silently
        SLRConfig(sparsity=0.5, n=1, m=8)
    assert SLRConfig(sparsity_type="nm", n=1, m=8).m == 8
    cfg = SLRConfig(sparsity_type="nm", optimization="admm", admm_every=2)
    assert SLRConfig.from_dict(cfg.to_dict()) == cfg
    # SLR's step-size schedule and bookkeeping are not read by ADMM: refused, not silently ignored
    for name, value in (("initial_s", 0.1), ("M", 100), ("r", 0.5), ("clone_previous", False)):
        with pytest.raises(ConfigError, match=f"^{name}=.* has no effect with optimization='admm'"):
            SLRConfig(sparsity=0.5, optimization="admm", **{name: value})
        assert getattr(SLRConfig(sparsity=0.5, **{name: value}), name) == value


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def test_layer_selection():
    net = _cnn()
    assert list(resolve_targets(net, SLRConfig(sparsity=0.5))) == ["3.weight", "6.weight"]
    assert list(resolve_targets(net, SLRConfig(sparsity_type="pattern"))) == ["3.weight"]  # 3x3 only
    targets = resolve_targets(net, SLRConfig(sparsity={"[36]": 0.5, "6": 0.25}))
    assert targets == {"3.weight": 0.5, "6.weight": 0.25}
    assert resolve_targets(net, SLRConfig(sparsity=0.5, layers=["9"])) == {"9.weight": 0.5}
    with pytest.raises(ConfigError, match="matches no module"):
        resolve_targets(net, SLRConfig(sparsity=0.5, layers=["conv9"]))
    with pytest.raises(ConfigError, match="no floating-point weight"):
        resolve_targets(net, SLRConfig(sparsity=0.5, layers=["2"]))
    assert resolve_targets(net, SLRConfig(sparsity_type="nm", layers=["9"])) == {"9.weight": None}
    with pytest.raises(ConfigError, match="cannot be applied"):  # 6 inputs: no runs of 4
        resolve_targets(nn.Sequential(nn.Linear(6, 2)), SLRConfig(sparsity_type="nm", layers=["0"]))


# ---------------------------------------------------------------------- hook, by hand


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _run_epochs(net, hook, batches, epochs, lr=0.05):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    records = []
    for epoch in range(epochs):
        total = 0.0
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            ce = F.cross_entropy(net(x), y)
            (ce + hook.extra_loss(net, step)).backward()
            opt.step()
            total += ce.item()
        metrics = {"train_loss": total / len(batches)}
        hook.on_epoch_end(net, epoch, metrics)
        records.append(metrics)
    return records


def test_hook_penalty_gradient_and_epoch_metrics():
    net = _cnn()
    hook = SLRHook(net, SLRConfig(sparsity=0.5, admm_every=2))
    W = hook.weights()
    loss = hook.extra_loss(net, 0)
    loss.backward()
    expected = RHO * (W["3.weight"].detach() - hook.state.Z["3.weight"] + hook.state.U["3.weight"])
    assert torch.allclose(net[3].weight.grad, expected)
    records = _run_epochs(net, hook, _batches(), 4)
    assert "slr/s" not in records[0] and "slr/s" in records[1]  # updates every 2nd epoch
    assert {"slr/accepted_w", "slr/accepted_z", "slr/w_z_rel", "slr/w_proj_rel", "slr/penalty"} <= set(records[3])
    assert [h["epoch"] for h in hook.state.history] == [1, 3]
    with pytest.raises(ConfigError, match="train_loss"):
        SLRHook(net, SLRConfig(sparsity=0.5)).on_epoch_end(net, 0, {})


def test_reference_mode_keeps_aliasing_the_weights_after_the_model_moves():
    """slr_prune_ makes the hook before train() moves the model to its device, and a move gives
    every parameter new storage (param.data = moved copy). With clone_previous=False, W_prev must
    still be the live weights at the first update, so the run is the one without the move; it
    was the stale pre-move tensor (on a GPU run: a CPU tensor next to Z on the GPU)."""
    runs = []
    for move in (False, True):
        net = _cnn()
        hook = SLRHook(net, SLRConfig(sparsity=0.5, clone_previous=False))
        if move:
            with torch.no_grad():
                for p in net.parameters():
                    p.data = p.data.clone()  # what Module.to(device) does to each parameter
        _run_epochs(net, hook, _batches(), 2)
        assert hook.state.W_prev["3.weight"].data_ptr() == net[3].weight.data_ptr()
        runs.append(hook.state.history)
    assert runs[1] == runs[0]


def test_hook_uses_check_batches_for_the_loss():
    net = _cnn()
    batches = _batches(2, seed=1)
    hook = SLRHook(net, SLRConfig(sparsity=0.5), check_batches=batches)
    net.eval()
    with torch.no_grad():
        expected = sum(F.cross_entropy(net(x), y).item() * len(y) for x, y in batches) / 32
    net.train()
    assert hook.task_loss(net, {}) == pytest.approx(expected)
    assert net.training


def test_hook_state_dict_round_trip():
    net = _cnn()
    hook = SLRHook(net, SLRConfig(sparsity=0.5))
    _run_epochs(net, hook, _batches(), 2)
    twin = SLRHook(copy.deepcopy(net), SLRConfig(sparsity=0.5))
    twin.load_state_dict(hook.state_dict())
    for d in ("Z", "U", "W_prev", "Z_prev"):
        assert all(torch.equal(getattr(twin.state, d)[n], getattr(hook.state, d)[n]) for n in hook.targets)
    assert (twin.state.s, twin.state.k, twin.epochs_seen) == (hook.state.s, hook.state.k, 2)
    other = SLRHook(_cnn(), SLRConfig(sparsity=0.5, layers=["3"]))
    with pytest.raises(CheckpointError, match="does not match"):
        other.load_state_dict(hook.state_dict())


# ------------------------------------------------------------- hard prune and friends


def test_hard_prune_is_exact_and_survives_masked_retraining():
    net = _cnn()
    masks = hard_prune_(net, SLRConfig(sparsity=0.7))
    for name in ("3", "6"):
        w = getattr(net, name).weight
        assert int((w == 0).sum()) == round(0.7 * w.numel())
        assert torch.equal(get_mask(getattr(net, name), "weight"), masks[f"{name}.weight"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # fresh optimizer
    for x, y in _batches():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    remove_masks(net)
    assert int((net[3].weight == 0).sum()) >= round(0.7 * 72 * 8)
    assert torch.all(net[3].weight[~masks["3.weight"]] == 0)


def test_hard_prune_filter_closes_conv_bias_and_following_bn():
    net = _cnn()
    x = torch.randn(2, 1, 6, 6)
    assert norms_after(net, x) == {"0": "1", "3": "4"}
    cfg = SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["3"])
    plain = copy.deepcopy(net)
    hard_prune_(plain, cfg)
    assert get_mask(plain[4], "weight") is None  # weights only, as the reference does
    masks = hard_prune_(net, cfg, example_inputs=x)
    dead = ~masks["3.weight"].reshape(8, -1).any(dim=1)
    assert int(dead.sum()) == 4
    for key in ("3.bias", "4.weight", "4.bias"):
        assert torch.equal(masks[key], ~dead)
    net.eval()
    with torch.no_grad():
        h = net[:5](torch.randn(4, 1, 6, 6))  # after conv 3 and its BN
    assert torch.all(h[:, dead] == 0)


def test_hard_prune_errors_leave_the_model_untouched():
    net = _cnn()
    before = copy.deepcopy(net.state_dict())
    state = SLRHook(_cnn(), SLRConfig(sparsity=0.5)).state
    state.spec.sparsities["9.weight"] = 0.99  # keeps nothing of 24 weights
    with pytest.raises(PruningError, match="keeps none"):
        hard_prune_(net, state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ConfigError):
        hard_prune_(net, {"3.weight": 0.5})


def test_recalibrate_bn_gives_the_average_of_batch_statistics():
    net = _cnn()
    batches = _batches(3, seed=2)
    with torch.no_grad():  # oracle: per-batch mean and unbiased variance of BN 1's input, averaged
        feats = [net[0](x) for x, _ in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    net.eval()
    assert recalibrate_bn(net, batches) == 3
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, atol=1e-5)
    assert not net.training and net[1].momentum == 0.1
    assert recalibrate_bn(net, batches, n=1) == 1
    with pytest.raises(ConfigError, match="at least one batch"):
        recalibrate_bn(net, [])


def test_recalibrate_bn_failing_midway_leaves_the_statistics_as_they_were():
    """A batch the model cannot take (2 channels for a 1-channel conv) after a good one: the
    error propagates and the BN statistics are the caller's again, not reset and half-averaged."""
    net = _cnn()
    net.train()
    with torch.no_grad():
        for x, _ in _batches(2, seed=3):
            net(x * 2 + 1)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = [_batches(1, seed=4)[0], (torch.randn(4, 2, 6, 6), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(RuntimeError):
        recalibrate_bn(net, bad)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and net[1].momentum == 0.1


def test_shrink_removes_closed_filters():
    pytest.importorskip("prunekit.surgery.plan")
    from prunekit.methods.slr import shrink_

    net = _cnn()
    x = torch.randn(2, 1, 6, 6)
    hard_prune_(net, SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["3"]), example_inputs=x)
    net.eval()
    with torch.no_grad():
        expected = net(x)
    shrink_(net, x)
    assert net[3].out_channels == 4 and net[6].in_channels == 4
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm", "group_norm"])
def test_shrink_keeps_channels_whose_norm_without_affine_still_outputs_a_constant(norm):
    from prunekit.methods.slr import shrink_

    torch.manual_seed(0)
    layer = {"batch_norm": lambda: nn.BatchNorm2d(6, affine=False),
             "instance_norm": lambda: nn.InstanceNorm2d(6, track_running_stats=True),
             "group_norm": lambda: nn.GroupNorm(3, 6, affine=False)}[norm]()
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), layer, nn.ReLU(),
                        nn.Conv2d(6, 3, 1)).eval()
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean.uniform_(-1.0, -0.5)  # a zero filter's channel reads -mean / std > 0, past the ReLU
    x = torch.randn(2, 1, 6, 6)
    hard_prune_(net, SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["2"]), example_inputs=x)
    with torch.no_grad():
        expected = net(x)
    shrink_(net, x)
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-5)


def test_registered_pipeline_shrinks_filter_sparsity():
    pytest.importorskip("prunekit.engine.train")
    from prunekit.engine.train import TrainConfig
    from prunekit.methods import METHODS, prune_

    assert "slr" in METHODS.list()
    net = _cnn()
    data = _batches(2, seed=3)
    cfg = SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["3"], epochs=2, retrain_epochs=1,
                    recalibrate_bn=True, recalibrate_batches=2)
    result = prune_(net, cfg, data[0][0], train_loader=data, val_loader=data,
                    train_config=TrainConfig(epochs=1, lr=0.01, log_every=0))
    assert net[3].out_channels == 4 and net[4].num_features == 4 and net[6].in_channels == 4
    assert result.cost_after.macs < result.cost_before.macs
    assert result.plan.meta["method"] == "slr"
    assert {"hard_pruned", "hard_pruned_bn", "retrained", "sparsity"} <= set(result.metrics)
    assert "slr/w_z_rel" in result.metrics["slr_history"][-1]
    assert not any(True for _ in net.modules() if hasattr(_, "parametrizations"))


# ----------------------------------------------------------------- SLR vs ADMM (digits)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _epoch_batches(x, y, seed, bs):
    p = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[p[i : i + bs]], y[p[i : i + bs]]) for i in range(0, len(p), bs)]


# Two small setups, both run with identical rules: A = 64-64-10 MLP, batch 100; B = 64-128-64-10
# MLP, batch 64. Both prune the first two Linear weights to 90%, from the same dense start
# (8 epochs), with the same data order, lr 0.05, ρ 0.1, 12 epochs, one Z/U update per epoch.
SETUPS = {"A": ((64, 64, 10), 100), "B": ((64, 128, 64, 10), 64)}
EPOCHS = 12


def _mlp(widths):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def digits_runs(request):
    """Per arm: ||W - Z||/||W|| after each update, and hard-pruned test accuracy."""
    widths, bs = SETUPS[request.param]
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    dense = _mlp(widths)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    for e in range(8):
        for x, y in _epoch_batches(xtr, ytr, 100 + e, bs):
            opt.zero_grad()
            F.cross_entropy(dense(x), y).backward()
            opt.step()
    acc = lambda m: float((m(xte).argmax(1) == yte).float().mean())  # noqa: E731
    runs = {"setup": request.param, "dense_acc": acc(dense)}
    for name, opt_name, clone in (("slr", "slr", True), ("slr_ref", "slr", False), ("admm", "admm", True)):
        net = copy.deepcopy(dense)
        cfg = SLRConfig(optimization=opt_name, sparsity=0.9, layers=["0", "2"], clone_previous=clone)
        hook = SLRHook(net, cfg, check_batches=[(xtr[:500], ytr[:500])])
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        residual, first_gap = [], None
        for e in range(EPOCHS):
            for x, y in _epoch_batches(xtr, ytr, 200 + e, bs):
                opt.zero_grad()
                (F.cross_entropy(net(x), y) + hook.extra_loss(net, 0)).backward()
                opt.step()
            metrics = {}
            hook.on_epoch_end(net, e, metrics)
            residual.append(metrics["slr/w_z_rel"])
            first_gap = metrics["slr/w_proj_rel"] if first_gap is None else first_gap
        last_gap = metrics["slr/w_proj_rel"]
        hard_prune_(net, hook)
        with torch.no_grad():
            runs[name] = {"residual": residual, "gaps": (first_gap, last_gap), "hard_acc": acc(net)}
    return runs


def _late_residual(run):
    """Mean ||W - Z||/||W|| over the second half of the updates (single epochs oscillate)."""
    r = run["residual"]
    return sum(r[len(r) // 2 :]) / (len(r) - len(r) // 2)


def test_slr_and_admm_both_close_the_constraint_gap(digits_runs):
    for name in ("slr", "slr_ref", "admm"):
        first, last = digits_runs[name]["gaps"]
        assert last < 0.35 * first, name  # ||W - Π(W)||/||W|| shrinks under the penalty
        assert digits_runs[name]["hard_acc"] >= digits_runs["dense_acc"] - 0.05, name


def test_reference_slr_reaches_smaller_residual_than_admm(digits_runs):
    assert _late_residual(digits_runs["slr_ref"]) < _late_residual(digits_runs["admm"])


def test_clean_slr_reaches_smaller_residual_than_admm(digits_runs, request):
    if digits_runs["setup"] == "B":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "Measured, not tuned (seeds 0-2 agree): with cloned W_prev the two norm ratios of an "
            "update telescope, s ~ 1/||W - Z||, the multiplier steps stay large and ||W - Z||/||W|| "
            "plateaus near 0.068, above ADMM's 0.031 on setup B (on A it is 0.09 vs ADMM's 0.155).")))
    assert _late_residual(digits_runs["slr"]) < _late_residual(digits_runs["admm"])


# ---------------------------------------------------------------------------- recipes


def test_recipes_fill_their_configs_and_differ_only_in_optimization():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from prunekit.data import DataConfig
    from prunekit.engine.train import TrainConfig

    root = Path(__file__).resolve().parents[2] / "recipes"
    recipes = {k: yaml.safe_load((root / f"resnet56_cifar10_{k}.yaml").read_text()) for k in ("slr", "admm")}
    for name, recipe in recipes.items():
        cfg = SLRConfig.from_dict(recipe["method"]["config"])
        assert recipe["method"]["name"] == "slr" and cfg.optimization == name
        TrainConfig.from_dict(recipe["train"])
        DataConfig.from_dict(recipe["data"])
    slr, admm = (dict(r["method"]["config"]) for r in (recipes["slr"], recipes["admm"]))
    assert {k for k in slr if slr[k] != admm[k]} == {"optimization"}
    assert {k: v for k, v in recipes["slr"].items() if k != "method"} == {
        k: v for k, v in recipes["admm"].items() if k != "method"}


class _TiedHead(nn.Module):
    """A Linear head that shares its weight with the token embedding (as GPT-2 does)."""

    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.body(self.emb(x))).mean(1))


def test_a_layer_tied_to_a_weight_it_does_not_prune_is_refused_before_training():
    net = _TiedHead()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=r"head\.weight is one tensor with emb\.weight.*`layers` list without head"):
        resolve_targets(net, SLRConfig(sparsity=0.5, layers=["body", "head"]))
    assert list(resolve_targets(net, SLRConfig(sparsity=0.5, layers=["body"]))) == ["body.weight"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert net.head.weight is net.emb.weight


class _UpNet(nn.Module):
    """A transposed conv, stored (in, out, kh, kw), between a conv and a BatchNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3)
        self.up = nn.ConvTranspose2d(8, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 2))

    def forward(self, x):
        return self.head(self.bn(self.up(self.stem(x))))


def test_a_transposed_conv_loses_whole_output_filters_closed_through_bias_and_bn():
    from prunekit.methods.slr import shrink_

    net, x = _UpNet(), torch.randn(2, 1, 6, 6)
    masks = hard_prune_(net, SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["up"]), example_inputs=x)
    dead = ~masks["up.weight"].transpose(0, 1).reshape(8, -1).any(dim=1)  # output channels: dim 1
    assert int(dead.sum()) == 4 and bool(masks["up.weight"].reshape(8, -1).any(dim=1).all())
    for key in ("up.bias", "bn.weight", "bn.bias"):
        assert torch.equal(masks[key], ~dead)
    net.eval()
    with torch.no_grad():
        assert torch.all(net.bn(net.up(net.stem(x)))[:, dead] == 0)
        expected = net(x)
    shrink_(net, x)
    assert net.up.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, n_per_run", [("nm", 2), ("channel", None)])
def test_a_transposed_conv_is_pruned_along_its_inputs(kind, n_per_run):
    net = _UpNet()
    sparsity = None if kind == "nm" else 0.5
    mask = hard_prune_(net, SLRConfig(sparsity_type=kind, sparsity=sparsity, layers=["up"]))["up.weight"]
    by_input = mask.movedim(0, -1)  # (out, kh, kw, in): the inputs a transposed conv sums over
    if kind == "nm":
        assert bool((by_input.reshape(-1, 4).sum(dim=1) == n_per_run).all())
    else:
        alive_inputs = mask.reshape(8, -1).any(dim=1)
        assert int(alive_inputs.sum()) == 4 and bool((mask.reshape(8, -1).all(dim=1) == alive_inputs).all())


def test_a_grouped_transposed_conv_loses_whole_output_filters():
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ConvTranspose2d(8, 6, 3, groups=2), nn.BatchNorm2d(6))
    x = torch.randn(2, 1, 6, 6)
    masks = hard_prune_(net, SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["1"]), example_inputs=x)
    net.eval()
    with torch.no_grad():
        out = net(x)
    dead = (out == 0).all(dim=3).all(dim=2).all(dim=0)  # output channels that are exactly zero
    assert int(dead.sum()) == 3 and torch.equal(masks["1.bias"], ~dead)
    assert int((~masks["1.weight"]).sum()) == 3 * 4 * 9  # each output filter holds in / groups = 4 kernels


def test_a_layer_masked_by_an_earlier_method_keeps_what_that_mask_removed():
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    net = _cnn()
    apply_mask(net[3], "weight", unstructured_mask(net[3].weight, 0.8))  # e.g. SNIP before SLR
    hidden = ~get_mask(net[3], "weight")
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=r"3\.weight.*bring back 173 of the 461 weights.*only grow.*bake_masks_"):
        SLRHook(net, SLRConfig(sparsity=0.5, layers=["3"]))
    with pytest.raises(PruningError, match="only grow"):
        hard_prune_(net, SLRHook(_cnn(), SLRConfig(sparsity=0.5, layers=["3"])).state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    masks = hard_prune_(net, SLRConfig(sparsity=0.9, layers=["3"]))
    assert int((~masks["3.weight"]).sum()) == 518 and bool((~masks["3.weight"])[hidden].all())


def test_filter_sparsity_on_a_layer_whose_filters_are_model_outputs_is_refused():
    """Filter sparsity on a classifier zeroed 7 of its 10 class rows, which the channel removal
    after it cannot take out (they are the outputs), so fine-tuning grew them back: a ConfigError
    before training now. A conv whose filters can be removed passes."""
    from prunekit.models import create_model
    model, x = create_model("small_cnn", 10), torch.randn(1, 1, 8, 8)
    with pytest.raises(ConfigError, match="filter sparsity on 'fc': its filters are channels the model must keep"):
        SLRConfig(sparsity_type="filter", sparsity=0.7, layers=["fc"]).check_model(model, x)
    SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["conv2"]).check_model(model, x)
    SLRConfig(sparsity_type="irregular", sparsity=0.7, layers=["fc"]).check_model(model, x)

    class Glu(nn.Module):  # the conv's 16 filters are two halves of one 8-channel group
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, 1)
            return self.b(p * torch.sigmoid(q))
    SLRConfig(sparsity_type="filter", sparsity=0.5, layers=["a"]).check_model(Glu(), torch.randn(1, 3, 6, 6))


def test_nm_sparsity_skips_depthwise_convs_by_default_and_names_a_listed_one():
    """A depthwise conv has one input per group, which no run of m divides: the default layers
    included them, and the error named a shape, not the layer."""
    from prunekit.methods.slr.config import resolve_targets
    from prunekit.models import create_model

    model = create_model("mobilenetv2_cifar", num_classes=10)
    targets = resolve_targets(model, SLRConfig(sparsity_type="nm"))
    depthwise = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert targets and depthwise and not depthwise & set(targets)
    with pytest.raises(ConfigError, match=r"layer\(s\) features.1.block.0.0 take their inputs per group in runs not "
                                          r"divisible by m=4"):
        resolve_targets(model, SLRConfig(sparsity_type="nm", layers=["features.1.block.0.0", "features.1.block.1"]))
