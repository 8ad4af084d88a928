"""A frozen BatchNorm inside a training model stays frozen through every internal eval pass."""
import torch
from torch import nn

from prunekit.engine.evaluate import evaluate
from prunekit.importance.context import ScoreContext
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.pai import SNIPConfig
from prunekit.surgery.verify import run_model


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    m.train()
    m[1].eval()  # frozen by the user
    return m


def _modes(m, names=None):
    """name -> training of the model's modules (of `names` only: masks add parametrization modules)."""
    return {n: x.training for n, x in m.named_modules() if names is None or n in names}


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def test_every_internal_eval_pass_gives_each_module_its_own_mode_back():
    m = _net()
    want = _modes(m)
    run_model(m, torch.randn(1, 3, 8, 8))
    assert _modes(m) == want
    evaluate(m, _batches())
    assert _modes(m) == want
    ctx = ScoreContext(m, batches=_batches())
    ctx.gradients(), ctx.output_stats(), ctx.hessian_vector_product({"0.weight": torch.ones(8, 3, 3, 3)})
    assert _modes(m) == want
    prune_(m, MagnitudeConfig(channel_ratio=0.25, criterion="taylor"), torch.randn(1, 3, 8, 8), batches=_batches())
    assert _modes(m) == want
    prune_(m, SNIPConfig(sparsity=0.5), torch.randn(1, 3, 8, 8), batches=_batches())
    assert _modes(m, want) == want and not m[1].training


def test_scoring_with_gradients_leaves_the_callers_grad_in_place():
    m = _net()
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.5)
    ScoreContext(m, batches=_batches()).gradients()
    assert all(p.grad is not None and bool((p.grad == 0.5).all()) for p in m.parameters())


def test_modes_come_back_through_each_modules_own_train():
    """A module whose train()/eval() does work (fusing branches for inference, say) is put back
    through it, not by setting its flag."""
    from prunekit.testing.toy_models import FusesInEval

    m = nn.Sequential(FusesInEval(), nn.BatchNorm2d(3)).train()
    run_model(m, torch.randn(1, 3, 4, 4))
    assert m.training and m[0].training and not m[0].fused


def test_a_shared_tensor_with_another_first_size_is_not_resized_to_the_batch():
    from prunekit.cost.latency_model import per_sample_inputs
    x, mask = torch.randn(2, 5), torch.ones(7, 7)
    got = per_sample_inputs((x, mask), 4)
    assert got[0].shape == (4, 5) and got[1] is mask
