"""latency_fraction: the measured latency of the pruned model lands near the target."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.cost.latency import LatencyConfig, compare_latency
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig


def _net():
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                         nn.Conv2d(96, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def test_latency_target_met_on_cpu():
    # loose tolerance: the machine running the tests is shared and loaded
    torch.manual_seed(0)
    model, x = _net(), torch.randn(1, 3, 24, 24)
    original = copy.deepcopy(model)
    cfg = MagnitudeConfig(latency_fraction=0.5, latency_tolerance=0.1, latency={"repeats": 15}, probe=False)
    r = prune_(model, cfg, x)
    rep = r.metrics["latency"]
    assert rep["target"] == 0.5 and 1 <= len(rep["attempts"]) <= 3
    assert rep["settings"]["threads"] == 1 and rep["estimate"]["batch"] == 1
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [64, 96, 64]
    checks = sorted(compare_latency({"full": original, "pruned": model}, (3, 24, 24),
                                    LatencyConfig(threads=1, warmup=3, repeats=30)).ratios["pruned"] for _ in range(3))
    if abs(checks[1] - 0.5) > 0.2:  # a load spike: time once more, longer, before judging
        checks = [compare_latency({"full": original, "pruned": model}, (3, 24, 24),
                                  LatencyConfig(threads=1, warmup=5, repeats=90)).ratios["pruned"]] * 3
    assert abs(checks[1] - 0.5) <= 0.2, (checks, rep["attempts"])  # the median of three: one reading can be far off
    assert r.metrics["memory_format"]["choice"] == "contiguous"


def test_latency_config_is_validated():
    with pytest.raises(ConfigError, match="unknown field"):
        MagnitudeConfig(latency_fraction=0.5, latency={"batch": 4})
    with pytest.raises(ConfigError, match="steps=1"):
        MagnitudeConfig(latency_fraction=0.5, steps=2)
    with pytest.raises(ConfigError, match="exactly one target"):
        MagnitudeConfig(latency_fraction=0.5, macs_fraction=0.5)


def test_memory_format_auto_records_both_timings():
    model, x = _net(), torch.randn(1, 3, 16, 16)
    r = prune_(model, MagnitudeConfig(channel_ratio=0.25, memory_format="auto", latency={"repeats": 5}), x)
    fmt = r.metrics["memory_format"]
    assert fmt["choice"] in ("contiguous", "channels_last") and fmt["contiguous_ms"] > 0 and fmt["channels_last_ms"] > 0
    cl = model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert cl == (fmt["choice"] == "channels_last")
    assert model(x).shape == (1, 10)


def test_one_outlier_measurement_does_not_undo_the_pruning(monkeypatch):
    # The first timing reads 0.24 (a load burst on a shared machine) where the estimate says
    # about 0.6; later timings agree with the estimate. Before, the correction jumped to a goal
    # of 0.999 and the attempt kept was almost the unpruned model.
    import prunekit.importance.latency_target as lt

    real, calls = lt._measured_fraction, []

    def flaky(*args, **kwargs):
        calls.append(1)
        return 0.24 if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(lt, "_measured_fraction", flaky)
    torch.manual_seed(0)
    model, x = _net(), torch.randn(1, 3, 24, 24)
    r = prune_(model, MagnitudeConfig(latency_fraction=0.6, latency_tolerance=0.1, latency={"repeats": 15},
                                      probe=False), x)
    first = r.metrics["latency"]["attempts"][0]
    assert first["readings"][0] == 0.24 and len(first["readings"]) == 3  # looked twice more
    assert all(a["goal"] <= 0.6 * 1.25 + 1e-9 for a in r.metrics["latency"]["attempts"])  # bounded steps
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(widths) < 0.9 * (64 + 96 + 64)  # still pruned


def test_a_model_without_tabled_layers_says_so():
    """Conv1d layers have no latency tables: the target cannot be aimed at, and the call says
    why instead of returning the unpruned model with a note about timing noise."""
    model = nn.Sequential(nn.Conv1d(4, 64, 3), nn.ReLU(), nn.Conv1d(64, 64, 3), nn.ReLU(), nn.Conv1d(64, 4, 1))
    before = [p.shape for p in model.parameters()]
    with pytest.raises(ConfigError, match="latency tables cover"):
        prune_(model, MagnitudeConfig(latency_fraction=0.5, latency={"repeats": 3, "warmup": 1}),
               torch.randn(1, 4, 32))
    assert [p.shape for p in model.parameters()] == before


@pytest.mark.parametrize("cfg", [MagnitudeConfig(latency_fraction=0.6, latency={"repeats": 2}),
                                 MagnitudeConfig(channel_ratio=0.5, round_to="auto"),
                                 MagnitudeConfig(channel_ratio=0.5, memory_format="auto")],
                         ids=["latency_fraction", "round_to_auto", "memory_format_auto"])
def test_example_inputs_a_plan_cannot_record_fail_before_any_timing(cfg):
    """A dict of inputs failed with a bare TypeError inside the latency timing; it is the plan's
    one error before any work, and the model is unchanged."""
    from prunekit.core.errors import PruningError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="positional tensor inputs only, got dict"):
        prune_(model, cfg, {"input": torch.randn(1, 3, 16, 16)})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class _Video(nn.Module):
    """A Conv3d (5-D weight) before a Conv2d (4-D weight)."""

    def __init__(self):
        super().__init__()
        self.c3, self.c2, self.fc = nn.Conv3d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.c2(self.c3(x).mean(2)).mean((2, 3)))


@pytest.mark.parametrize("how", ["channels_last", "auto"])
def test_channels_last_converts_the_4d_tensors_of_a_model_with_3d_convs(how):
    """torch refuses channels-last on a 5-D tensor: the call failed with a bare RuntimeError after
    the model was already pruned. The 4-D tensors take the format, the 5-D ones stay contiguous."""
    torch.manual_seed(0)
    model, x = _Video(), torch.randn(1, 3, 4, 8, 8)
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5, memory_format=how, latency={"repeats": 2, "warmup": 1}), x)
    choice = r.metrics["memory_format"]["choice"]
    assert model.c2.weight.is_contiguous(memory_format=torch.channels_last) == (choice == "channels_last")
    assert model.c3.weight.is_contiguous() and model(x).shape == (1, 4)


def test_a_latency_target_of_one_keeps_the_whole_model(monkeypatch):
    """Nothing removed is the model itself (fraction 1.0): a noisy reading of it against itself
    (1.3 here) sent the goal down and the attempt kept was a pruned model."""
    import prunekit.importance.latency_target as lt

    real = lt._measured_fraction
    monkeypatch.setattr(lt, "_measured_fraction", lambda model, trial, *a: 1.3 if all(
        p.shape == q.shape for p, q in zip(model.parameters(), trial.parameters())) else real(model, trial, *a))
    torch.manual_seed(0)
    model, x = _net(), torch.randn(1, 3, 16, 16)
    before = [p.shape for p in model.parameters()]
    r = prune_(model, MagnitudeConfig(latency_fraction=1.0, latency={"repeats": 2, "warmup": 1}, probe=False), x)
    assert [p.shape for p in model.parameters()] == before
    rep = r.metrics["latency"]
    assert rep["measured_fraction"] == 1.0 and len(rep["attempts"]) == 1 and "note" not in rep


def test_a_latency_target_timed_channels_last_needs_a_channels_last_model():
    """The target measured channels-last while memory_format="contiguous" handed back a contiguous
    model, whose latency nobody measured."""
    with pytest.raises(ConfigError, match="memory_format='channels_last'"):
        MagnitudeConfig(latency_fraction=0.5, latency={"channels_last": True})
    with pytest.raises(ConfigError, match="memory_format='channels_last'"):
        MagnitudeConfig(channel_ratio=0.5, round_to="auto", latency={"channels_last": True})
    for ok in (dict(memory_format="channels_last"), dict(memory_format="auto")):
        MagnitudeConfig(latency_fraction=0.5, latency={"channels_last": True}, **ok)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("timed", [dict(channel_ratio=0.5, memory_format="auto"), dict(latency_fraction=0.7),
                                   dict(channel_ratio=0.5, round_to="auto")])
def test_a_timing_that_runs_out_of_memory_is_one_message_and_leaves_the_model_unpruned(monkeypatch, verify, timed):
    """Every timing prune_ does (memory_format='auto' on the pruned copy, latency_fraction, and
    round_to='auto') runs before the caller's model changes: an allocation failure there is one
    ConfigError naming latency.batch_size, and the model keeps its widths and values."""
    import prunekit.cost.latency as latency_mod
    from prunekit.surgery.prepared import prepare_pruning

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(latency_mod, "_interleaved_times", no_memory)
    torch.manual_seed(0)
    model, x = _net(), torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = MagnitudeConfig(**timed)
    with pytest.raises(ConfigError, match=r"ran out of memory .*latency\.batch_size.*left unchanged"):
        if verify:
            prune_(model, cfg, x)
        else:
            prepare_pruning(model, x).prune_(model, cfg, verify=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_an_error_while_timing_that_is_not_memory_passes_through(monkeypatch):
    import prunekit.cost.latency as latency_mod

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(latency_mod, "_interleaved_times", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        prune_(_net(), MagnitudeConfig(channel_ratio=0.5, memory_format="auto"), torch.randn(1, 3, 16, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_timing_on_a_missing_device_is_refused_before_anything_changes():
    model, x = _net(), torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="device='cuda' was asked for"):
        prune_(model, MagnitudeConfig(macs_fraction=0.5, memory_format="auto", latency={"device": "cuda"}), x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _exact_readings(monkeypatch):
    """Timing replaced by the estimate itself: the allocation logic, free of machine noise."""
    import prunekit.importance.latency_target as lt
    monkeypatch.setattr(lt, "_readings", lambda model, graph, removal, estimated, *a: [estimated])


def test_a_multiple_too_coarse_for_a_mild_latency_target_is_halved(monkeypatch):
    """ResNet-20's 16-wide stream moves in halves at round_to=16: the same allocation came back
    on every attempt, timed again each time, and the miss was blamed on noise."""
    from prunekit.models import create_model

    _exact_readings(monkeypatch)
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()
    r = prune_(model, MagnitudeConfig(latency_fraction=0.97, latency={"repeats": 3, "warmup": 1}),
               torch.randn(1, 3, 32, 32))
    rep = r.metrics["latency"]
    removals = [a["estimated_fraction"] for a in rep["attempts"]]
    assert len(set(removals)) == len(removals)  # no allocation timed twice
    assert rep["round_to"] < 16 and any("round_to=16 could not get nearer" in n for n in r.metrics["notes"])
    assert abs(rep["measured_fraction"] - 0.97) <= 0.05, rep["attempts"]
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % rep["round_to"] == 0 for w in widths)


def test_a_latency_target_beyond_max_ratio_says_so(monkeypatch):
    from prunekit.models import create_model

    _exact_readings(monkeypatch)
    model = create_model("resnet20", 10).eval()
    r = prune_(model, MagnitudeConfig(latency_fraction=0.3, max_ratio=0.3, latency={"repeats": 3, "warmup": 1}),
               torch.randn(1, 3, 32, 32))
    assert "every group at max_ratio=0.3 (raise max_ratio)" in r.metrics["latency"]["note"]


def test_a_latency_target_out_of_reach_at_the_multiple_lowers_it_before_blaming_max_ratio(monkeypatch):
    """ResNet-20 at latency_fraction=0.05: multiples of 16 stop at widths 8/16 (a narrow group keeps
    one multiple), so the multiple is lowered (to 2) before timing; with round_slack=None the
    multiple is kept and the note names it, not max_ratio (raising max_ratio would change nothing)."""
    from prunekit.models import create_model

    _exact_readings(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    lowered = create_model("resnet20", 10).eval()
    r = prune_(lowered, MagnitudeConfig(latency_fraction=0.05, latency={"repeats": 3, "warmup": 1}), x)
    assert r.metrics["latency"]["round_to"] == 2 and len(r.metrics["latency"]["attempts"]) == 1
    assert min(m.out_channels for m in lowered.modules() if isinstance(m, nn.Conv2d)) == 2
    assert "max_ratio=0.9" in r.metrics["latency"]["note"]  # at multiples of 2 the cap is what binds
    kept = create_model("resnet20", 10).eval()
    r = prune_(kept, MagnitudeConfig(latency_fraction=0.05, round_slack=None, latency={"repeats": 3, "warmup": 1}), x)
    note = r.metrics["latency"]["note"]
    assert r.metrics["latency"]["round_to"] == 16 and "multiples of 16, as round_slack=None keeps them" in note
    assert "max_ratio" not in note


def test_round_slack_none_keeps_the_multiple_of_a_latency_target(monkeypatch):
    from prunekit.models import create_model

    _exact_readings(monkeypatch)
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()
    r = prune_(model, MagnitudeConfig(latency_fraction=0.97, round_slack=None, latency={"repeats": 3, "warmup": 1}),
               torch.randn(1, 3, 32, 32))
    assert r.metrics["latency"]["round_to"] == 16
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_the_multiple_is_kept_when_max_ratio_is_what_stops_the_target(monkeypatch):
    """ResNet-20 at 0.05 with max_ratio=0.5: multiples of 2 estimate no nearer than 8, so 8 stays
    and the note names max_ratio (the multiple fell to 2 and the note blamed round_to=8)."""
    from prunekit.models import create_model

    _exact_readings(monkeypatch)
    torch.manual_seed(0)
    r = prune_(create_model("resnet20", 10).eval(), MagnitudeConfig(latency_fraction=0.05, round_to=8, max_ratio=0.5,
                                                                     latency={"repeats": 3, "warmup": 1}),
               torch.randn(1, 3, 32, 32))
    rep = r.metrics["latency"]
    assert rep["round_to"] == 8 and "max_ratio=0.5" in rep["note"] and "round_to_note" not in rep
