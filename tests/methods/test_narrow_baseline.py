"""The narrowed dense baseline of docs/ssc.md: MagnitudeConfig(params_fraction=f, scope="local")
thins every channel group by the same ratio (to within the rounding of one channel) and lands
at or just below the target parameter count."""
import pytest
import torch

from prunekit.cost.macs import count_cost
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.ssc import SSCConfig
from prunekit.models import create_model

X = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("reduction", [4, 8])
def test_narrow_resnet20_to_ssc_params(reduction):
    torch.manual_seed(0)
    ssc = create_model("resnet20", num_classes=10)
    dense = count_cost(ssc, X).params
    target = prune_(ssc, SSCConfig(reduction=reduction), X).cost_after.params
    narrow = create_model("resnet20", num_classes=10)
    widths = {n: m.out_channels for n, m in narrow.named_modules() if isinstance(m, torch.nn.Conv2d)}
    r = prune_(narrow, MagnitudeConfig(params_fraction=target / dense, scope="local", probe=False, round_to=None), X)
    assert 0.9 * target <= r.cost_after.params <= target
    kept = [m.out_channels / widths[n] for n, m in narrow.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(kept) - min(kept) <= 1 / 16 + 1e-9  # one channel of the narrowest (16-wide) layers
