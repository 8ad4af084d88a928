"""export_model and `prunekit export`: masks baked, caller's model untouched, the artifact checked
against the model (and a wrong one refused), nothing left behind by a failed export."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.export import ExportError, export_model
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.pai import RandomInitConfig
from prunekit.surgery.masks import masked_modules

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript or onnxruntime not installed (pip install 'prunekit[export]')")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


class _CountsCalls(nn.Module):
    """Its output depends on how often it was called: a tracer freezes the count."""

    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(4, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


@pytest.mark.parametrize("suffix", [".ts", ".pt2"])
def test_a_masked_pruned_model_exports_with_its_zeros_and_the_caller_keeps_its_masks(tmp_path, suffix):
    net, x = _net(), torch.randn(2, 3, 8, 8)
    prune_(net, RandomInitConfig(sparsity=0.5), x)
    masked = len(list(masked_modules(net)))
    r = export_model(net, x, tmp_path / f"m{suffix}")
    assert masked > 0 and len(list(masked_modules(net))) == masked  # the caller's model still masked
    assert r.checked_batches == [2, 3] and r.max_abs_diff <= 1e-5 and r.dynamic_batch
    assert (tmp_path / f"m{suffix}").stat().st_size == r.bytes
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]  # no staging folder left


def test_the_torchscript_file_holds_the_baked_zeros(tmp_path):
    net, x = _net(), torch.randn(2, 3, 8, 8)
    prune_(net, RandomInitConfig(sparsity=0.5), x)
    export_model(net, x, tmp_path / "m.ts")
    weights = {k: v for k, v in torch.jit.load(str(tmp_path / "m.ts")).state_dict().items() if k.endswith("weight")}
    conv = weights["0.weight"]
    assert conv.numel() == 8 * 3 * 9 and 0 < int((conv == 0).sum()) < conv.numel()


@needs_onnx
def test_a_channel_pruned_model_exports_to_onnx_and_runs_at_any_batch(tmp_path):
    import onnxruntime

    net, x = _net(), torch.randn(1, 3, 8, 8)
    prune_(net, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    r = export_model(net, x, tmp_path / "m.onnx")
    assert r.format == "onnx" and r.checked_batches == [1, 3] and r.max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xb = torch.randn(5, 3, 8, 8)
    out = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
    np.testing.assert_allclose(out, net(xb).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_an_export_that_computes_another_function_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="computes another function"):
        export_model(_CountsCalls(), torch.randn(2, 4), tmp_path / "m.ts")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_size_frozen_by_the_trace_is_named(tmp_path):
    class FreezesBatch(nn.Module):
        def forward(self, x):
            return x.sum(1) * torch.ones(int(x.shape[0]))  # int(): the trace keeps the example's batch

    with pytest.raises(ExportError, match="batch 3.*static"):
        export_model(FreezesBatch(), torch.randn(2, 4), tmp_path / "m.ts")
    r = export_model(FreezesBatch(), torch.randn(2, 4), tmp_path / "m.ts", dynamic_batch=False)
    assert r.checked_batches == [2]


@pytest.mark.parametrize("path, fmt, match", [("m.bin", None, "cannot tell the format"),
                                              ("m.ts", "tflite", "format='tflite' is not known")])
def test_unknown_formats_are_one_config_error(tmp_path, path, fmt, match):
    with pytest.raises(ConfigError, match=match):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / path, format=fmt)


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "m.ts").write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists"):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts")
    assert (tmp_path / "m.ts").read_bytes() == b"keep me"
    export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts", overwrite=True)
    assert (tmp_path / "m.ts").read_bytes() != b"keep me"


@pytest.mark.parametrize("inputs, match", [(torch.tensor(1.0), "no batch"), ({"x": torch.randn(1, 3)}, "tensor or a tuple"),
                                           (torch.full((1, 3, 8, 8), float("nan")), "NaN")])
def test_bad_example_inputs_are_one_config_error(tmp_path, inputs, match):
    with pytest.raises(ConfigError, match=match):
        export_model(_net(), inputs, tmp_path / "m.ts")


def test_nan_weights_are_refused_before_exporting(tmp_path):
    net = _net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"0\.weight holds NaN"):
        export_model(net, torch.randn(1, 3, 8, 8), tmp_path / "m.ts")


def test_missing_onnx_packages_are_named_with_the_extra(tmp_path, monkeypatch):
    import prunekit.export as export

    monkeypatch.setattr(export, "_absent", lambda name: name == "onnxruntime")
    with pytest.raises(ConfigError, match=r"needs onnxruntime.*prunekit\[export\]"):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
