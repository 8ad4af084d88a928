"""Channel gates: binary samples with straight-through gradients, switched-off channels, eval gates."""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.layers.gates import GateSet


def test_gates_sample_binary_with_straight_through_gradients():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 3))
    x = torch.randn(4000, 1, 5, 5)
    gates = GateSet.from_graph(model, build_graph(model, x[:2]), initial_logit=0.0)
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]))
    gates.attach(model)
    model.train()
    model(x).sum().backward()
    g = gates.samples[0]
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(g.detach().mean(0), torch.sigmoid(gates.logits[0].detach()), atol=0.03)
    assert gates.logits[0].grad is not None and bool((gates.logits[0].grad != 0).all())
    gates.active(0)[5] = False  # switched off: never open, even with the largest logit
    model(x[:64])
    assert float(gates.samples[0].detach()[:, 5].abs().sum()) == 0.0
    model.eval()
    assert gates.hard_open()[0].tolist() == [False, False, True, True, True, False]
    gates.detach()
