"""Every registered method through the documented `prunekit run --method NAME` command.

For each method (the registry's names plus the recipe aliases such as admm) one short run on
the default digits recipe; the saved pruned.safetensors is loaded into a freshly built model and
its real layer widths and zero counts must equal what result.json reports. SLR/ADMM's masked
weights must hold exactly the asked sparsity after the fine-tune stage, in the model and in the
file itself.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from prunekit.cli.main import cli
from prunekit.cli.recipe import ALIASES, load_recipe
from prunekit.cost.macs import count_cost
from prunekit.layers.ssc import SSCConv2d
from prunekit.methods import METHODS
from prunekit.models import create_model
from prunekit.surgery.mask_io import weight_sparsity
from prunekit.surgery.masks import prune_count
from prunekit.surgery.persist import load_pruned, read_plan

from conftest import make_runner

SHORT = ["train.epochs=1", "finetune.epochs=1", "eval.latency=false"]
# The documented command of each method with its short budget. A new method needs a row here
# (the test below fails until it has one): its --method name and the overrides of a quick run.
METHOD_RUNS = {
    "magnitude": ["method.macs_fraction=0.5"],
    "slr": ["method.sparsity=0.7", "method.epochs=1"],
    "admm": ["method.sparsity=0.7", "method.epochs=1"],
    "gator": ["method.target=0.5", "method.epochs=1"],
    "hydra": ["method.density=0.3", "method.epochs=1"],
    "ssc": ["method.reduction=4"],
    "snip": ["method.sparsity=0.7"],
    "grasp": ["method.sparsity=0.7"],
    "synflow": ["method.sparsity=0.7", "method.iterations=5"],
    "random_init": ["method.sparsity=0.7"],
}
METHOD_NAMES = sorted(set(METHODS.list()) | set(ALIASES))


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory):
    """{method: (run dir, CliResult)}, each run made on first use."""
    threads = torch.get_num_threads()
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name) / "run"
            try:
                result = make_runner().invoke(cli, ["run", "--method", name, "--out", str(out), "-q",
                                                    *SHORT, *METHOD_RUNS[name]])
            finally:
                torch.set_num_threads(threads)
            assert result.exit_code == 0, (name, result.output, result.exception)
            cache[name] = out
        return cache[name]

    return get


def _fresh(run_dir):
    recipe, _ = load_recipe(str(run_dir))
    return create_model(recipe.model.name, recipe.model.num_classes, **recipe.model.kwargs)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_has_a_documented_short_run(name):
    assert name in METHOD_RUNS, (f"method {name!r} has no row in METHOD_RUNS of {__file__}; add its "
                                 "`prunekit run --method` overrides for a short run")


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n in METHOD_RUNS])
def test_saved_model_widths_and_sparsity_equal_result_json(name, method_runs):
    out = method_runs(name)
    res = json.loads((out / "result.json").read_text())
    model = load_pruned(_fresh(out), out / "pruned.safetensors")
    example = torch.zeros(1, 1, 8, 8)
    cost = count_cost(model, example)
    assert cost.macs == res["cost_after"]["macs"] and cost.params == res["cost_after"]["params"]
    for row in res["layers"]:
        assert cost.per_module[row["name"]]["out"] == row["channels_after"], row["name"]
    assert weight_sparsity(model) == res["sparsity"]
    # the zeros, counted here from the reloaded weights: every conv and Linear weight (an SSC layer
    # as the dense conv it stands for), and each masked tensor on its own
    zeros = numel = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SSCConv2d):  # the full conv: out x in x k x k, zero off the support
                n = module.out_channels * module.in_channels * module.kernel_size ** 2
                zeros, numel = zeros + n - int((module.dense_weight() != 0).sum()), numel + n
            elif isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
                zeros, numel = zeros + int((module.weight == 0).sum()), numel + module.weight.numel()
    assert (res["sparsity"]["weights"]["zeros"], res["sparsity"]["weights"]["numel"]) == (zeros, numel)
    for tensor, entry in res["sparsity"]["tensors"].items():
        module, _, attr = tensor.rpartition(".")
        assert entry["zeros"] == int((getattr(model.get_submodule(module), attr) == 0).sum()), tensor
    # the plan inside the file describes exactly the masks the model came back with
    described = read_plan(out / "pruned.safetensors").meta["masks"]["tensors"]
    assert {n: d["masked"] for n, d in described.items()} == {
        n: e["masked"] for n, e in res["sparsity"]["tensors"].items()}


@pytest.mark.parametrize("name", ["slr", "admm"])
def test_documented_slr_command_keeps_exactly_70_percent_zeros_after_finetune(name, method_runs):
    out = method_runs(name)
    res = json.loads((out / "result.json").read_text())
    assert [h["step"] for h in res["history"]] == ["dense", "pruned", "fine-tuned"]
    model = _fresh(out)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][1:]  # all but the stem
    assert targets and sorted(res["sparsity"]["tensors"]) == sorted(f"{t}.weight" for t in targets)
    with safe_open(str(out / "pruned.safetensors"), framework="pt") as f:
        for t in targets:
            w = f.get_tensor(f"{t}.weight")  # the stored weights themselves, not a report
            assert int((w == 0).sum()) == prune_count(w.numel(), 0.7), t
            assert res["sparsity"]["tensors"][f"{t}.weight"]["zeros"] == prune_count(w.numel(), 0.7)


def test_finetune_command_keeps_the_masks_of_a_pruned_run(method_runs, tmp_path):
    out = method_runs("slr")
    tuned = tmp_path / "tuned"
    result = make_runner().invoke(cli, ["finetune", str(out), "--out", str(tuned), "-q", "finetune.epochs=1",
                                        "eval.latency=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    before = load_pruned(_fresh(out), out / "pruned.safetensors")
    after = load_pruned(_fresh(tuned), tuned / "pruned.safetensors")
    changed = False
    for (name, w0), w1 in zip(before.state_dict().items(), after.state_dict().values()):
        if name.endswith(".mask"):
            assert torch.equal(w0, w1), name  # the same masks
        changed |= not torch.equal(w0, w1)
    assert changed  # fine-tuning did train the model
    assert weight_sparsity(after)["masked"] == weight_sparsity(before)["masked"]
    tuned_result = json.loads((tuned / "result.json").read_text())
    assert tuned_result["sparsity"] == weight_sparsity(after)
    # this run did not prune; its report names the method that pruned the weights it loaded
    assert tuned_result["method"] == "none (loaded weights pruned by slr)"
    assert "Method: none (loaded weights pruned by slr)" in (tuned / "report.md").read_text()


def test_eval_and_bench_of_a_masked_run(method_runs):
    out = method_runs("slr")
    res = json.loads((out / "result.json").read_text())
    runner = make_runner()
    result = runner.invoke(cli, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == res["accuracy_after"]  # masks came back with the weights
    result = runner.invoke(cli, ["bench", str(out), "bench.repeats=3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["macs"] == res["cost_after"]["macs"]


def test_the_console_zero_count_names_its_denominator():
    """The prune line's zero count says of how many weights (the report counts masked tensors
    only, the console every conv/linear weight), and that an SSC layer counts as its dense conv."""
    from types import SimpleNamespace

    from prunekit.cli.pipeline import _zeros_note
    from prunekit.methods import prune_
    from prunekit.methods.ssc import SSCConfig
    from prunekit.surgery.masks import apply_mask

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1, bias=False), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    apply_mask(model[0], "weight", torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]).view(4, 2, 1, 1))
    assert _zeros_note(SimpleNamespace(model=model, prune_metrics={})) == (
        "; 4 of the 16 conv/linear weights are zero (25.0%)")
    torch.manual_seed(0)
    ssc = create_model("small_cnn", num_classes=10)
    prune_(ssc, SSCConfig(reduction=4), torch.randn(1, 1, 8, 8))
    assert "SSC layers counted as the dense convs they stand for" in _zeros_note(
        SimpleNamespace(model=ssc, prune_metrics={}))


def test_a_checkpoint_of_a_pruned_models_training_points_to_the_files_that_load(method_runs):
    """last.pt holds weights only: after channel pruning its widths need the plan, which the
    error says, naming the files that do load."""
    out = method_runs("magnitude")
    ckpt = out / "ckpt" / "finetune" / "last.pt"
    assert ckpt.is_file()
    result = make_runner().invoke(cli, ["eval", str(out), "--weights", str(ckpt)])
    assert result.exit_code == 2, result.output
    assert "do not fit this model; a training checkpoint holds weights without a plan" in result.output
    assert "pruned.safetensors instead" in result.output
    assert make_runner().invoke(cli, ["eval", str(out), "--weights", str(out / "pruned.safetensors")]).exit_code == 0
