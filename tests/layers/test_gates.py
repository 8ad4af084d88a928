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


def test_straight_through_gradient_equals_the_hand_derivative_at_a_temperature():
    """gate = hard + soft - soft.detach(): d loss / d theta = sum over the batch of upstream *
    soft (1 - soft) / T, with soft = sigmoid((theta + log u - log(1 - u)) / T) from the same noise."""
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 3))
    gates = GateSet.from_graph(model, build_graph(model, torch.randn(2, 1, 5, 5)), initial_logit=0.0, temperature=0.5)
    theta = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    with torch.no_grad():
        gates.logits[0].copy_(theta)
    upstream = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    gate = gates.sample(0, 16)
    (gate * upstream).sum().backward()
    torch.manual_seed(7)  # the same uniform noise, written out
    u = torch.rand(16, 6).clamp(1e-6, 1 - 1e-6).double()
    soft = torch.sigmoid((theta.double() + u.log() - (1 - u).log()) / 0.5)
    torch.testing.assert_close(gate.detach().double(), (soft > 0.5).double())
    expected = (upstream.double() * soft * (1 - soft) / 0.5).sum(0)
    torch.testing.assert_close(gates.logits[0].grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_gates_act_on_a_consumer_called_with_its_input_by_keyword():
    """`self.b(input=h)` passes nothing positionally: the gate hook read args[0] and raised
    IndexError. The gated output equals the model with the closed channels' producer rows zeroed."""

    class KeywordNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(input=torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = KeywordNet(), torch.randn(3, 4)
    gates = GateSet.from_graph(model, build_graph(model, x))
    assert gates.names == ["a"]
    mask = torch.tensor([True, False, True, True, False, True])
    gates.attach(model)
    try:
        model(x).sum().backward()  # sampled gates (training mode) reach the logits
        assert gates.samples[0].shape == (3, 6) and gates.logits[0].grad is not None
        model.eval()
        gates.freeze([mask])
        gated = model(x)
    finally:
        gates.detach()
    zeroed = KeywordNet()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        zeroed.a.weight[~mask] = 0
        zeroed.a.bias[~mask] = 0
    torch.testing.assert_close(gated, zeroed(x), atol=0, rtol=0)


def test_a_consumer_whose_weight_is_read_outside_its_own_forward_is_not_gated():
    """`F.conv2d(x, self.c2.weight, ...)` in the parent's forward never calls c2's forward, so a
    gate hooked on c2 never acts: Gator trained every epoch with that group ungated and then
    failed in the conversion ("the converted model differs from the gated one"). The group is
    skipped, with the reader named; a group read through its consumer's own forward is gated."""
    import torch.nn.functional as F

    from prunekit.layers.gates import gateable

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = F.relu(F.conv2d(F.relu(self.c1(x)), self.c2.weight, self.c2.bias, padding=1))
            return self.fc(x.mean((2, 3)))

    model, x = Functional(), torch.randn(2, 3, 6, 6)
    groups, skipped = gateable(model, build_graph(model, x))
    assert [g.name for g in groups] == ["c2"]
    assert "c1" in skipped and "c2.weight" in skipped["c1"] and "outside its own forward" in skipped["c1"]
