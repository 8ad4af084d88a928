"""`prunekit run --method ssc` records its conversion in the plan; `info recipes`. (Every method's
short run and reload: test_cli_methods.py.)"""
import json

import pytest

from prunekit.cli.main import cli
from prunekit.surgery.persist import read_plan


@pytest.mark.parametrize("method,extra", [("ssc", []), ("snip", [])])
def test_run_with_method(runner, tmp_path, method, extra):
    out = tmp_path / method
    result = runner.invoke(cli, ["run", "--method", method, "--out", str(out), "train.epochs=1", "finetune.epochs=1",
                                 "eval.layer_latency=false", "bench.repeats=3", *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((out / "result.json").read_text())
    plan = read_plan(out / "pruned.safetensors")
    assert plan.meta["method"] == method
    if method == "ssc":
        assert summary["cost_after"]["params"] < summary["cost_before"]["params"] / 2
        assert set(plan.meta["replay"]["ssc"]["layers"]) == {"conv2", "conv3"}
    else:  # element masks: dense counts unchanged, masks stored with the weights
        assert plan.meta["masks"]["tensors"]["conv2.weight"]["masked"] > 0


def test_info_lists_recipes(runner, monkeypatch, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "ssc_x.yaml").write_text("# SSC on something\nname: x\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["info", "recipes"])
    assert result.exit_code == 0 and "recipes/ssc_x.yaml" in result.stdout and "SSC on something" in result.stdout
    # the first sentence, across the comment's lines, not its first line cut mid-sentence
    (tmp_path / "recipes" / "two.yaml").write_text("# Gator against the dense model, all at\n"
                                                   "# 50% of the MACs. More detail\n# here.\nname: y\n")
    result = runner.invoke(cli, ["info", "recipes"])
    assert "Gator against the dense model, all at 50% of the MACs.\n" in result.stdout
    assert "More detail" not in result.stdout


def test_info_lists_a_recipe_that_is_not_utf8(runner, monkeypatch, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "latin.yaml").write_bytes("# caf\xe9 recipe\nname: x\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["info", "recipes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "recipes/latin.yaml" in result.stdout and "recipe" in result.stdout


def test_layer_latency_times_ssc_layers():
    import torch

    from prunekit.cli.pipeline import layer_latency
    from prunekit.cost.latency import LatencyConfig
    from prunekit.methods import prune_
    from prunekit.methods.ssc import SSCConfig
    from prunekit.models import create_model

    model, x = create_model("small_cnn", num_classes=10), torch.zeros(1, 1, 8, 8)
    prune_(model, SSCConfig(), x)
    assert set(layer_latency(model, x, LatencyConfig(warmup=1, repeats=2))) == {"conv1", "conv2", "conv3", "fc"}
