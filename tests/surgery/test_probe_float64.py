"""Probing tells float32 rounding from a rule error: a failing comparison is re-run in float64."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.surgery import verify
from prunekit.surgery.verify import probe_groups


def _chain():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 2, 1)).eval()


def test_an_exact_model_passes_even_when_every_float32_comparison_is_called_a_failure():
    torch.manual_seed(0)
    model, x = _chain(), torch.randn(1, 3, 8, 8)
    # atol < 0 makes every float32 comparison fail, so only the float64 check can clear the groups
    assert probe_groups(model, x, build_graph(model, x), atol=-1.0) == {}


def test_a_rule_error_still_fails_in_float64(monkeypatch):
    """Simulate an inexact rule: the zeroed reference misses the channel that removal deletes."""
    real = verify.zero_channels_

    def off_by_one(model, removal):
        real(model, [(g, [(c + 1) % g.size for c in chans]) for g, chans in removal])

    monkeypatch.setattr(verify, "zero_channels_", off_by_one)
    torch.manual_seed(0)
    model, x = _chain(), torch.randn(1, 3, 8, 8)
    bad = probe_groups(model, x, build_graph(model, x))
    assert bad and all("in float64" in reason for reason in bad.values()), bad


def _timm():
    tools = Path(__file__).resolve().parents[3] / "shared" / "tools"
    if not tools.is_dir() or importlib.util.find_spec("timm") is None:
        return None
    sys.path.insert(0, str(tools))
    import torchvision_cpu  # noqa: F401
    import timm
    return timm


@pytest.mark.parametrize("seed", [15, 0, 1])
def test_visformer_tiny_keeps_every_group_prunable(seed):
    """Seed 15 made float32 probing discard 16 of 19 groups (removal vs zeroing 0.03 at the
    logits, 2e-12 in float64)."""
    timm = _timm()
    if timm is None:
        pytest.skip("timm is not installed (see ../shared/tools/torchvision_cpu.py)")
    torch.manual_seed(seed)
    model = timm.create_model("visformer_tiny").eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, x)
    assert probe_groups(model, x, graph) == {}
    assert len(graph.prunable_groups()) == 19
