"""Latency measurement: statistics, model left untouched, interleaved comparison, timer sanity."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.core.environment import cpu_model
from prunekit.core.errors import ConfigError, PrunekitError
from prunekit.cost.latency import LatencyConfig, LatencyResult, compare_latency, measure_latency

FAST = LatencyConfig(warmup=1, repeats=5, threads=1)  # one thread: see test_wider_mlp_measures_slower


def _mlp(width: int, features: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, features))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net.train()
    net[3].eval()  # a frozen block inside a model in train mode: flags differ per module
    # Non-trivial running stats so an accidental train-mode forward would visibly change them.
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    return state, flags


def _assert_same(model: nn.Module, snapshot) -> None:
    state, flags = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype, key
        assert torch.equal(now[key], value), key
    assert [m.training for m in model.modules()] == flags
    assert model[0].weight.is_contiguous()  # memory format not switched to channels_last


def test_from_times_statistics_match_hand_values():
    r = LatencyResult.from_times([5.0, 1.0, 4.0, 2.0, 3.0], device="cpu", device_name="x", dtype="float32",
                                 batch=1, torch_version="t", settings={})
    assert (r.median_ms, r.mean_ms, r.min_ms, r.max_ms, r.n) == (3.0, 3.0, 1.0, 5.0, 5)
    assert r.std_ms == pytest.approx(math.sqrt(2.5))  # sample std of 1..5
    # Linear-interpolated percentiles of 1..5: rank 0.4 -> 1.4, rank 3.6 -> 4.6.
    assert r.p10_ms == pytest.approx(1.4) and r.p90_ms == pytest.approx(4.6)
    assert r.times_ms == [5.0, 1.0, 4.0, 2.0, 3.0]
    assert LatencyResult.from_dict(r.to_dict()) == r


def test_result_fields_are_consistent():
    cfg = LatencyConfig(warmup=2, repeats=7, batch_size=3)
    r = measure_latency(_mlp(64, 32), (32,), cfg)
    assert r.n == 7 and len(r.times_ms) == 7
    assert r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms <= r.max_ms
    assert r.min_ms <= r.mean_ms <= r.max_ms and r.min_ms > 0 and r.std_ms >= 0
    assert r.median_ms == pytest.approx(float(np.median(r.times_ms)))
    assert (r.batch, r.dtype, r.device, r.torch_version) == (3, "float32", "cpu", torch.__version__)
    assert r.device_name == cpu_model()
    assert r.settings["repeats"] == 7 and r.settings["input_shapes"] == [[3, 32]]
    assert r.settings["input"] == "shape" and r.settings["device_resolved"] == "cpu"


@pytest.mark.parametrize("cfg, copied", [
    (LatencyConfig(warmup=1, repeats=3, threads=1), False),
    (LatencyConfig(warmup=1, repeats=3, threads=1, dtype="bfloat16", channels_last=True), True),
])
def test_model_left_unchanged(cfg, copied):
    net = _convnet()
    before = _snapshot(net)
    r = measure_latency(net, (3, 8, 8), cfg)
    _assert_same(net, before)
    assert r.settings["timed_copy"] is copied and r.dtype == cfg.dtype


def test_model_restored_when_forward_fails():
    net = _convnet()
    before = _snapshot(net)
    with pytest.raises(PrunekitError, match="failed on inputs of shape"):
        measure_latency(net, (5, 8, 8), FAST)  # 5 channels, the first conv wants 3
    _assert_same(net, before)



def test_a_module_whose_train_does_work_is_given_its_mode_back_through_it():
    """A module that fuses its branches in eval() (as reparametrised blocks do) is unfused again
    through its own train(), not left fused under a training flag."""
    from prunekit.testing.toy_models import FusesInEval

    net = nn.Sequential(FusesInEval(), nn.ReLU()).train()
    measure_latency(net, (3, 4, 4), FAST)
    assert net.training and net[0].training and not net[0].fused


def test_example_tensor_and_multiple_inputs():
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    x = torch.randn(4, 6)
    x_before = x.clone()
    r = measure_latency(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 2)), x, FAST)
    assert r.batch == 4 and r.settings["input"] == "example"
    assert torch.equal(x, x_before)  # the in-place ReLU worked on a copy of the example
    r2 = measure_latency(Add(), (torch.randn(2, 3), torch.randn(2, 3)), FAST)
    assert r2.batch == 2 and r2.settings["input_shapes"] == [[2, 3], [2, 3]]


def test_integer_inputs_keep_their_dtype_under_bfloat16():
    emb = nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3]])
    r = measure_latency(emb, ids, LatencyConfig(warmup=1, repeats=2, threads=1, dtype="bfloat16"))
    assert r.n == 2 and emb.weight.dtype == torch.float32


def test_threads_setting_is_used_and_restored():
    previous = torch.get_num_threads()
    r = measure_latency(nn.Linear(8, 8), (8,), LatencyConfig(warmup=1, repeats=2, threads=1))
    assert r.settings["threads_used"] == 1
    assert torch.get_num_threads() == previous


def test_compare_latency_ratios_relative_to_first():
    models = {"a": nn.Linear(16, 16), "b": nn.Linear(16, 4), "c": nn.Identity()}
    cmp = compare_latency(models, (16,), FAST)
    assert cmp.reference == "a" and list(cmp.results) == ["a", "b", "c"]
    assert cmp.ratios["a"] == 1.0
    for name in "bc":
        expected = cmp.results[name].median_ms / cmp.results["a"].median_ms
        assert cmp.ratios[name] == pytest.approx(expected)
        assert cmp.speedups[name] == pytest.approx(1.0 / expected)
        assert cmp.results[name].n == 5
    assert cmp.results["b"].settings["interleaved_with"] == ["a", "c"]
    assert cmp.to_dict()["ratios"] == cmp.ratios


def test_same_module_twice_is_restored():
    net = _convnet()
    before = _snapshot(net)
    compare_latency({"x": net, "y": net}, (3, 8, 8), LatencyConfig(warmup=1, repeats=2, threads=1))
    _assert_same(net, before)


def test_wider_mlp_measures_slower():
    # 8x the hidden width is 8x the multiply-adds (~134M vs ~17M per call at batch 32); the
    # assertion only asks for 2x, so it checks the timer rather than a performance claim.
    # One thread keeps a busy neighbour process from stalling multi-threaded regions.
    torch.manual_seed(0)
    cfg = LatencyConfig(warmup=2, repeats=9, batch_size=32, threads=1)
    cmp = compare_latency({"small": _mlp(512), "wide": _mlp(4096)}, (512,), cfg)
    assert cmp.ratios["wide"] > 2.0
    single_small = measure_latency(_mlp(512), (512,), cfg)
    single_wide = measure_latency(_mlp(4096), (512,), cfg)
    assert single_wide.median_ms > single_small.median_ms


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"),
    ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"threads": 0}, "threads"),
    ({"channels_last": "yes"}, "channels_last"),
    ({"cuda_graph": True}, "cuda_graph"),
    ({"device": "cuda", "cuda_graph": True, "compile": True}, "only one"),
    ({"device": "cuda", "cuda_graph": True, "warmup": 0}, "warmup"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LatencyConfig(**kwargs)


def test_config_round_trip():
    cfg = LatencyConfig(device="auto", dtype="float16", batch_size=8, warmup=3, repeats=11, threads=2)
    assert LatencyConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", [(), (3, 0, 4), ("3", 4), [torch.randn(2), 3], 7])
def test_bad_inputs_raise(bad):
    with pytest.raises(ConfigError, match="inputs="):
        measure_latency(nn.Identity(), bad, FAST)


def test_bad_models_raise():
    with pytest.raises(ConfigError, match="non-empty"):
        compare_latency({}, (3,), FAST)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        compare_latency({"f": lambda x: x}, (3,), FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="cuda"):
        measure_latency(nn.Linear(2, 2), (2,), LatencyConfig(device="cuda", warmup=1, repeats=1))
    r = measure_latency(nn.Linear(2, 2), (2,), LatencyConfig(device="auto", warmup=1, repeats=1))
    assert r.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [{}, {"cuda_graph": True}, {"dtype": "bfloat16", "channels_last": True}])
def test_cuda_paths(extra):
    net = _convnet()
    before = _snapshot(net)
    r = measure_latency(net, (3, 16, 16), LatencyConfig(device="cuda", warmup=3, repeats=5, **extra))
    assert r.device == "cuda" and r.n == 5 and r.min_ms <= r.median_ms <= r.max_ms
    assert r.device_name == torch.cuda.get_device_name()
    _assert_same(net, before)


@pytest.mark.slow
def test_compile_path_on_cpu():
    net = _mlp(32, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = measure_latency(net, (16,), LatencyConfig(warmup=2, repeats=3, compile=True))
    assert r.n == 3 and r.settings["compile"] is True
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_memory_formats_are_what_they_say_for_a_model_that_arrives_channels_last(monkeypatch):
    """choose_memory_format's contiguous arm times a contiguous copy, and "contiguous" converts."""
    import prunekit.cost.latency as latency_mod
    from prunekit.cost.memory_format import apply_memory_format_, choose_memory_format

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(memory_format=torch.channels_last)
    seen = {}
    real = latency_mod._Runner.__init__

    def spy(self, name, m, inputs, cfg, device):
        real(self, name, m, inputs, cfg, device)
        w = self.module[0].weight
        seen.setdefault(name, set()).add("channels_last" if not w.is_contiguous() else "contiguous")
    monkeypatch.setattr(latency_mod._Runner, "__init__", spy)
    choose_memory_format(model, (3, 16, 16), LatencyConfig(warmup=1, repeats=2, threads=1))
    assert seen == {"contiguous": {"contiguous"}, "channels_last": {"channels_last"}}
    assert not model[0].weight.is_contiguous()  # the caller's model is untouched by the timing
    record = apply_memory_format_(model, torch.randn(1, 3, 16, 16), "contiguous")
    assert record["choice"] == "contiguous" and model[0].weight.is_contiguous()


def test_a_model_already_in_the_asked_format_is_left_as_it_is():
    """No conversion pass (no model.to) when every 4-D tensor already has the layout; one tensor in
    the other layout converts the model."""
    from prunekit.cost.memory_format import apply_memory_format_

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
    calls, real_to = [], model.to
    model.to = lambda *a, **k: calls.append(k) or real_to(*a, **k)
    apply_memory_format_(model, torch.randn(1, 3, 16, 16), "contiguous")
    assert calls == []
    model[2].weight.data = model[2].weight.data.to(memory_format=torch.channels_last)
    apply_memory_format_(model, torch.randn(1, 3, 16, 16), "contiguous")
    assert len(calls) == 1 and model[2].weight.is_contiguous()
    apply_memory_format_(model, torch.randn(1, 3, 16, 16), "channels_last")
    assert len(calls) == 2
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in (model[0], model[2]))
    apply_memory_format_(model, torch.randn(1, 3, 16, 16), "channels_last")
    assert len(calls) == 2


def test_the_memory_format_timings_are_the_median_of_the_rounds(monkeypatch):
    """Two interleaved rounds per format, reported as their median (the larger of the two was kept)."""
    import prunekit.cost.memory_format as mf

    rounds = iter([10.0, 7.0, 14.0, 9.0])  # contiguous, channels-last, contiguous, channels-last

    class _Timed:
        def __init__(self, name):
            self.results = {name: type("R", (), {"median_ms": next(rounds)})()}
    monkeypatch.setattr(mf, "compare_latency", lambda models, inputs, cfg: _Timed(next(iter(models))))
    record = mf.choose_memory_format(nn.Conv2d(3, 8, 3), (3, 8, 8), LatencyConfig(threads=1))
    assert (record["contiguous_ms"], record["channels_last_ms"]) == (12.0, 8.0)
    assert record["choice"] == "channels_last"


def test_a_channels_last_input_is_timed_contiguous_unless_channels_last(monkeypatch):
    """A channels-last example tensor made the contiguous arm run channels-last kernels (a
    convolution follows its input's layout), so both arms of memory_format="auto" timed the same."""
    import prunekit.cost.latency as latency_mod

    seen, real = [], latency_mod._Runner.__init__

    def spy(self, name, m, inputs, cfg, device):
        real(self, name, m, inputs, cfg, device)
        seen.append((cfg.channels_last, self.inputs[0].is_contiguous(),
                     self.inputs[0].is_contiguous(memory_format=torch.channels_last)))
    monkeypatch.setattr(latency_mod._Runner, "__init__", spy)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for channels_last in (False, True):
        measure_latency(nn.Conv2d(3, 8, 3), (x,), LatencyConfig(warmup=1, repeats=1, channels_last=channels_last))
    assert seen == [(False, True, False), (True, False, True)]


def test_channels_last_timing_of_a_model_with_3d_convs():
    """torch refuses channels-last on a 5-D tensor: the timed copy converts the 4-D ones only."""
    model = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Flatten(1, 2), nn.Conv2d(8 * 2, 4, 3))
    r = measure_latency(model, (3, 4, 8, 8), LatencyConfig(warmup=1, repeats=1, channels_last=True))
    assert r.n == 1 and r.settings["timed_copy"]


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, scale, x):
        return self.fc(x) * scale


def test_the_batch_reported_is_the_first_batched_input_when_a_scalar_comes_first():
    cfg = LatencyConfig(warmup=0, repeats=1)
    result = measure_latency(_Scaled(), (torch.tensor(2.0), torch.randn(4, 5)), cfg)
    assert result.batch == 4



def test_unstated_channels_last_times_each_model_in_its_own_layout():
    """channels_last=None: a channels-last model is timed channels-last without a converted copy,
    a contiguous one contiguous; each result states the layout it was timed in. A recipe's bench
    section leaves it unstated unless given, and timed_as_it_runs resolves it from one model."""
    from prunekit.cost.memory_format import bench_config
    from prunekit.cost.memory_format import timed_as_it_runs

    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    nhwc = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).to(memory_format=torch.channels_last)
    cmp = compare_latency({"flat": flat, "nhwc": nhwc}, (3, 8, 8),
                          LatencyConfig(warmup=1, repeats=2, channels_last=None))
    assert cmp.results["flat"].settings["channels_last"] is False
    assert cmp.results["nhwc"].settings["channels_last"] is True
    assert cmp.results["nhwc"].settings["timed_copy"] is False
    assert bench_config({}).channels_last is None and bench_config({"channels_last": False}).channels_last is False
    assert timed_as_it_runs(nhwc, bench_config({})).channels_last is True
    assert timed_as_it_runs(flat, bench_config({})).channels_last is False
    assert timed_as_it_runs(nhwc, bench_config({"channels_last": False})).channels_last is False
    with pytest.raises(ConfigError, match="null"):
        LatencyConfig(channels_last="yes")


def test_compiled_timing_compiles_every_model_past_dynamos_recompile_limit(monkeypatch):
    """Lookup tables time one layer at many widths: after 8 of them dynamo stopped compiling the
    same forward and the rest ran eager, untold. (The eager backend keeps the test free of a C++
    compiler; the recompile limit is dynamo's, the same for every backend.)"""
    import torch._dynamo

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real(model, backend="eager"))
    torch._dynamo.utils.counters.clear()
    cfg = LatencyConfig(compile=True, warmup=1, repeats=1, threads=1)
    for width in range(4, 44, 4):  # 10 widths
        measure_latency(nn.Linear(width, width), (width,), cfg)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10


def test_more_threads_than_cores_is_said(monkeypatch):
    import prunekit.cost.latency as lat

    monkeypatch.setattr(lat, "usable_cores", lambda: 1)
    model = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match=r"timed on 2 torch threads with 1 CPU core\(s\).*at most 1"):
        measure_latency(model, (4,), LatencyConfig(warmup=1, repeats=2, threads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many threads as cores: nothing to say
        measure_latency(model, (4,), LatencyConfig(warmup=1, repeats=2, threads=1))
