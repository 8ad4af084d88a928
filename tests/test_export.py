"""export_model and `prunekit export`: masks baked, caller's model untouched, the artifact checked
against the model (and a wrong one refused), nothing left behind by a failed export."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

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


@pytest.mark.parametrize("fmt", ["onnx", "exported", "torchscript"])
def test_inputs_the_model_cannot_take_are_one_config_error_in_every_format(tmp_path, fmt):
    """A wrong channel count is said as such (it was an exporter's error advising another format)."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra (prunekit[export]) is not installed")
    path = tmp_path / ("m" + {"onnx": ".onnx", "exported": ".pt2", "torchscript": ".ts"}[fmt])
    with pytest.raises(ConfigError, match=r"cannot run on the example inputs: given a tensor float32 \(1, 1, 8, 8\); "
                                          r"expected .*N, 3, H, W"):
        export_model(_net(), torch.randn(1, 1, 8, 8), path)
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_not_called_wrong_inputs(tmp_path):
    class Hungry(nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        export_model(Hungry(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts")


def test_nan_weights_are_refused_before_exporting(tmp_path):
    net = _net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"0\.weight holds NaN"):
        export_model(net, torch.randn(1, 3, 8, 8), tmp_path / "m.ts")


class _MaskedScores(nn.Module):
    """An additive attention-style mask buffer holding -inf on purpose, as prune_ accepts."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0, float("-inf")]))

    def forward(self, x):
        return torch.softmax(self.fc(x) + self.mask, dim=-1)


@pytest.mark.parametrize("suffix", [".ts", ".pt2"])
def test_a_buffer_holding_minus_inf_on_purpose_exports_as_prune_accepts_it(tmp_path, suffix):
    net, x = _MaskedScores().eval(), torch.randn(2, 4)
    prune_(net, RandomInitConfig(sparsity=0.5), x)  # the methods accept the model: so must export
    r = export_model(net, x, tmp_path / f"m{suffix}")
    assert r.max_abs_diff <= 1e-5


def test_a_buffer_holding_nan_is_refused_before_exporting(tmp_path):
    net = _MaskedScores()
    net.mask[1] = float("nan")
    with pytest.raises(ConfigError, match=r"buffer mask holds NaN"):
        export_model(net, torch.randn(2, 4), tmp_path / "m.ts")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_are_named_with_the_extra(tmp_path, monkeypatch):
    import prunekit.export as export

    monkeypatch.setattr(export, "_absent", lambda name: name == "onnxruntime")
    with pytest.raises(ConfigError, match=r"needs onnxruntime.*prunekit\[export\]"):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")


class _TokensAndScale(nn.Module):
    """Token ids and one float per sample (a temperature): two positional inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, ids, scale):
        return self.fc(self.embed(ids).mean(1)) * scale


@pytest.mark.parametrize("suffix", [".ts", ".pt2"])
def test_a_one_sample_example_with_a_single_float_per_sample_checks_at_another_batch(tmp_path, suffix):
    """The random second batch was scaled by the example's std, which is NaN for one element:
    every output NaN, and a correct export refused as 'computes another function'."""
    example = (torch.randint(0, 10, (1, 5)), torch.rand(1, 1) + 0.5)
    r = export_model(_TokensAndScale(), example, tmp_path / f"m{suffix}")
    assert r.checked_batches == [1, 3] and r.max_abs_diff <= 1e-5


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "features": y * 2}


@pytest.mark.parametrize("suffix", [".ts", ".pt2"])
def test_a_model_returning_a_dict_exports_in_every_format(tmp_path, suffix):
    """torch.jit.trace refuses dict outputs unless strict=False."""
    r = export_model(_DictOutput(), torch.randn(2, 4), tmp_path / f"m{suffix}")
    assert r.checked_batches == [2, 3] and r.max_abs_diff <= 1e-5


@needs_onnx
def test_a_float16_model_is_checked_at_float16_precision(tmp_path):
    """onnxruntime's float16 kernels round differently from torch's by about one float16 step;
    a float32 tolerance (1e-4) refused a correct export as 'computes another function'."""
    torch.manual_seed(1)
    net, x = _net().half(), torch.randn(2, 3, 8, 8).half()
    r = export_model(net, x, tmp_path / "m.onnx")
    assert r.tolerance == 8 * torch.finfo(torch.float16).eps and r.max_abs_diff <= r.tolerance


@needs_onnx
def test_a_bfloat16_model_is_refused_for_an_onnx_check_before_exporting(tmp_path):
    with pytest.raises(ConfigError, match="bfloat16.*check=False"):
        export_model(_net().bfloat16(), torch.randn(2, 3, 8, 8).bfloat16(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_float32_model_keeps_the_float32_tolerance(tmp_path):
    assert export_model(_net(), torch.randn(2, 3, 8, 8), tmp_path / "m.ts").tolerance == 1e-4


@pytest.mark.parametrize("below", ["m.ts", "sub/m.ts"])
def test_a_path_below_a_file_names_the_file(tmp_path, below):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file is a file, not a folder"):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "file" / below)


def test_a_folder_that_cannot_be_written_is_named_not_the_staging_folder(tmp_path, monkeypatch):
    import prunekit.export as export

    def read_only(prefix, dir):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc")

    monkeypatch.setattr(export.tempfile, "TemporaryDirectory", read_only)
    with pytest.raises(ConfigError, match=rf"cannot write in {tmp_path} \(Permission denied\); choose a writable"):
        export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_a_terminated_export_leaves_no_staging_folder(tmp_path):
    """SIGTERM (a timeout, a stopped job) ended the process without unwinding: the hidden staging
    folder and its half-written file stayed beside the target. Run in its own process: the signal
    must not reach the test runner, whose handlers other libraries may have replaced."""
    done = _export_signalled_while_checking(tmp_path / "m.ts", "SIGTERM", wrap=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_export_model_leaves_signal_handlers_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts")
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or os.name != "posix", reason="POSIX signals")
def test_a_killed_export_s_staging_folder_is_removed_by_the_next_export(tmp_path):
    """SIGKILL leaves the staging folder (nothing can clean up); the next export to the same path
    removes it once its process no longer runs, and leaves a live export's folder alone."""
    done = _export_signalled_while_checking(tmp_path / "m.ts", "SIGKILL", wrap=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.ts.")
    from prunekit.export import _owner
    live = tmp_path / f".m.ts.{_owner()}.abcd_123"  # this process's own (running) export
    live.mkdir()
    host = _owner().rsplit("-", 1)[0]
    other = tmp_path / f".m.ts.{host}-4000000.onnx.{_owner()}.abcd_123"  # another target's (live) folder
    other.mkdir()
    export_model(_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.ts")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "m.ts"])


def _export_signalled_while_checking(path, signal_name: str, wrap: bool) -> subprocess.CompletedProcess:
    """Export in a child process that sends itself `signal_name` during the check (the model's
    third call: the first checks the inputs, the second is the trace), inside terminate_as_exit()
    when `wrap`. Its own
    process: the signal must not reach the test runner, whose handlers other libraries may set."""
    body = f"export_model(Signalled(), torch.randn(2, 4), {str(path)!r})"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from torch import nn
        from prunekit.export import export_model, terminate_as_exit

        class Signalled(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.calls = nn.Linear(4, 2), 0

            def forward(self, x):
                self.calls += 1
                if self.calls == 3:
                    os.kill(os.getpid(), signal.{signal_name})
                return self.fc(x)

    """) + (f"with terminate_as_exit():\n    {body}\n" if wrap else body + "\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
