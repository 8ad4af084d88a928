"""`prunekit search` on digits: the run directory holds per-epoch genotypes, alpha plot, network,
result and report, and the saved network reloads from its own JSON genotype."""
import json

import torch
from click.testing import CliRunner

from prunekit.cli.main import cli
from prunekit.layers.sparse import count_nonzeros
from prunekit.methods.prdarts import Genotype, load_network

RECIPE = """
data: {name: digits, val_fraction: 0.1, batch_size: 64, eval_batch_size: 64, limit_train: 128}
search: {channels: 2, layers: 3, steps: 2, multiplier: 2, density: 0.3, pretrain_epochs: 1, score_epochs: 1,
         finetune_epochs: 1, unrolled: false}
evaluate: {channels: 2, layers: 3, auxiliary: false, dense_epochs: 1, score_epochs: 1, finetune_epochs: 1,
           cutout: 2, latency_repeats: 2}
threads: 1
"""


def test_search_command_writes_the_run_directory(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["search", str(recipe), "search.seed=1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("genotype.json", "alphas.jsonl", "alphas.png", "network.safetensors", "result.json", "report.md"):
        assert (out / name).exists(), name
    assert len(list((out / "genotypes").glob("*.json"))) == 3
    result = json.loads((out / "result.json").read_text())
    geno = Genotype.from_json((out / "genotype.json").read_text())
    assert geno.to_dict() == result["genotype"]
    net = load_network(out / "network.safetensors")
    assert count_nonzeros(net)["nonzero"] == result["evaluation"]["cost"]["nonzero"]
    assert net(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert "no speed-up is claimed" in (out / "report.md").read_text()
    # it says where it writes and which phase runs as each starts, not only at the end
    lines = res.output.splitlines()
    assert lines[0] == f"run directory: {out}"
    assert any(l.startswith("searching on cpu: 1 dense + 1 score + 1 finetune epochs") for l in lines)
    assert any(l.startswith("evaluating the searched cell") for l in lines)
    assert lines[-1] == f"report: {out / 'report.md'}"
    quiet = CliRunner().invoke(cli, ["search", str(recipe), "-q", "evaluate.enabled=false", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert [l.split(":")[0] for l in quiet.output.splitlines()] == ["genotype", "report"]


def test_search_command_rejects_unknown_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    res = CliRunner().invoke(cli, ["search", str(recipe), "search.bogus=1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "bogus" in res.output


def test_shipped_search_recipes_load():
    from pathlib import Path

    from prunekit.cli.overrides import load_yaml_file
    from prunekit.methods.prdarts.run import SearchRecipe

    recipes = sorted((Path(__file__).resolve().parents[3] / "recipes").glob("prdarts_*.yaml"))
    assert len(recipes) == 2
    for path in recipes:
        recipe = SearchRecipe.from_dict(load_yaml_file(path))
        assert recipe.data.val_fraction == 0.5 and 0 < recipe.search.density < 1


def test_search_command_refuses_bad_device_threads_and_data_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    for override, needle in [("device=tpu", "device='tpu' must be 'cpu' or 'cuda[:index]'"),
                             ("device=cuda", "CUDA is not available"),
                             ("threads=0", "threads=0 must be an integer >= 1"),
                             ("data.root=/nonexistent", "leave root and image_size unset"),
                             ("evaluate.channels=0", "evaluate.channels=0 must be >= 1"),
                             ("evaluate.layers=0", "evaluate.layers=0 must be >= 3"),
                             ("evaluate.latency_repeats=0", "evaluate.latency_repeats=0 must be >= 1"),
                             ("evaluate.auxiliary=true", "set evaluate.auxiliary=false")]:
        out = tmp_path / "x"
        res = CliRunner().invoke(cli, ["search", str(recipe), override, "--out", str(out)])
        assert res.exit_code == 2, (override, res.output)
        assert needle in res.output and "Traceback" not in res.output, (override, res.output)
        assert not out.exists(), override


def test_search_command_refuses_bad_evaluation_settings_before_searching(tmp_path):
    """Evaluation settings are checked with the recipe, not after the whole search (a negative lr
    failed there as `lr=-1`, without its section; a drop path above 1 or a negative auxiliary
    weight were taken; at density 1 the score and finetune epochs were skipped without a word)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    for override, needle in [("evaluate.lr=-1", "evaluate.lr=-1 is out of range"),
                             ("evaluate.score_lr=0", "evaluate.score_lr=0 is out of range"),
                             ("evaluate.weight_decay=-0.1", "evaluate.weight_decay=-0.1 is out of range"),
                             ("evaluate.aux_weight=-0.4", "evaluate.aux_weight=-0.4 is out of range"),
                             ("evaluate.drop_path=1.5", "evaluate.drop_path=1.5 is out of range"),
                             ("evaluate.auxiliary=maybe", "evaluate.auxiliary='maybe' must be true or false"),
                             ("evaluate.density=1", "evaluate.score_epochs=0"),
                             ("search.density=1 search.score_epochs=0", "evaluate.score_epochs=0")]:
        out = tmp_path / "x"
        res = CliRunner().invoke(cli, ["search", str(recipe), *override.split(), "--out", str(out)])
        assert res.exit_code == 2, (override, res.output)
        assert needle in res.output and "Traceback" not in res.output, (override, res.output)
        assert not out.exists(), override


def test_a_search_never_writes_into_another_runs_directory(tmp_path, monkeypatch):
    """Without --out the timestamped name may be taken (two searches in the same second): the new
    run moves on to -2 and says where it wrote; the other run's files stay as they were."""
    from prunekit.cli import rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    other = tmp_path / "runs" / "search-20260101-000000"
    other.mkdir(parents=True)
    (other / "recipe.json").write_text("{\"someone\": \"else\"}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    res = CliRunner().invoke(cli, ["search", str(recipe), "evaluate.enabled=false"])
    assert res.exit_code == 0, res.output
    assert "run directory: runs/search-20260101-000000-2" in res.output
    assert sorted(p.name for p in other.iterdir()) == ["recipe.json"]
    assert (other / "recipe.json").read_text() == "{\"someone\": \"else\"}"
    assert (tmp_path / "runs" / "search-20260101-000000-2" / "result.json").exists()
