"""`prunekit search` on digits: the run directory holds per-epoch genotypes, alpha plot, network,
result and report, and the saved network reloads from its own JSON genotype."""
import json

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli.main import cli
from prunekit.core.errors import ConfigError
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
    # the search time is its epochs' (a resumed search counted only the last process's)
    assert result["search_time_s"] == sum(h["epoch_time_s"] for h in result["search_history"])
    # `prunekit report` writes the search's report again (it replaced it with an empty pruning report),
    # and an alphas.jsonl line that is not a record is left out of the plot instead of failing it
    text = (out / "report.md").read_text()
    with open(out / "alphas.jsonl", "ab") as f:  # a record, a line of text and a line that is not UTF-8
        f.write(b'{"phase": "pretrain", "phase_epoch": 0, "alpha_normal": "x"}\nnot json\n\xff\xfe\n')
    again = CliRunner().invoke(cli, ["report", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "report.md").read_text() == text and not (out / "report.html").exists()
    # commands that read `prunekit run` directories say where the searched network is
    for command in ("eval", "bench"):
        other = CliRunner().invoke(cli, [command, str(out)])
        assert other.exit_code == 2 and "is a `prunekit search` run" in other.output, other.output
    # it says where it writes and which phase runs as each starts, not only at the end
    lines = res.output.splitlines()
    assert lines[0] == f"run directory: {out}"
    assert any(l.startswith("searching on cpu: 1 dense + 1 score + 1 finetune epochs") for l in lines)
    assert any(l.startswith("evaluating the searched cell") for l in lines)
    assert lines[-1] == f"report: {out / 'report.md'}"
    quiet = CliRunner().invoke(cli, ["search", str(recipe), "-q", "evaluate.enabled=false", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert [l.split(":")[0] for l in quiet.output.splitlines()] == ["genotype", "report"]
    assert result["evaluation"]["cell"] == "searched" and result["evaluation"]["genotype"] == result["genotype"]


def test_a_reference_cell_evaluated_instead_is_named_in_the_report_and_result(tmp_path):
    """evaluate.genotype=darts_v2: the report listed the evaluation right under the searched cell,
    and result.json did not say which cell the test accuracy was of."""
    from prunekit.methods.prdarts.genotype import REFERENCE_GENOTYPES

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["search", str(recipe), "-q", "evaluate.genotype=darts_v2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["evaluation"]["cell"] == "darts_v2"
    assert result["evaluation"]["genotype"] == REFERENCE_GENOTYPES["darts_v2"].to_dict() != result["genotype"]
    assert "## Evaluation network (the reference darts_v2 cell, not the searched one)" in (out / "report.md").read_text()


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
                             ("evaluate.auxiliary=true", "auxiliary=False (evaluate.auxiliary=false in a search recipe)"),
                             ("evaluate.cutout=16", "evaluate.cutout=16 blanks the whole of every 8x8 training image")]:
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
                             ("evaluate.auxiliary=maybe", "auxiliary='maybe' must be true or false"),
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


def _stop_at_save(monkeypatch, n: int) -> None:
    """Ctrl-C in the n-th end-of-epoch checkpoint of this process, before it is written (the
    epoch's genotype and alphas are already logged)."""
    import importlib

    engine = importlib.import_module("prunekit.engine.train")

    calls, real = [], engine.save_checkpoint

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", save)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


LONGER = ["search.pretrain_epochs=2", "search.finetune_epochs=2", "evaluate.dense_epochs=2", "search.arch_lr=0.03"]


def test_a_search_stopped_twice_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from prunekit.engine.train import TIMING_KEYS

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert runner.invoke(cli, ["search", str(recipe), *LONGER, "-q", "--out", str(ref)]).exit_code == 0
    with monkeypatch.context() as m:  # stopped while the second dense epoch is saved
        _stop_at_save(m, 2)
        res = runner.invoke(cli, ["search", str(recipe), *LONGER, "-q", "--out", str(out)])
    assert res.exit_code == 130 and f"continue with: prunekit resume {out}" in res.stderr, (res.output, res.exception)
    assert not (out / "result.json").exists()
    with monkeypatch.context() as m:  # resumed, then stopped in the evaluation's dense training
        _stop_at_save(m, 5)
        res = runner.invoke(cli, ["resume", str(out)])
    assert res.exit_code == 130, (res.output, res.exception)
    assert res.stdout.splitlines()[0] == (f"resuming {out}: finished no phase; to do: search pretrain, search scores, "
                                          "search finetune, evaluate dense, evaluate scores, evaluate finetune")
    res = runner.invoke(cli, ["resume", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert res.stdout.splitlines()[0] == (f"resuming {out}: finished search pretrain, search scores, search finetune; "
                                          "to do: evaluate dense, evaluate scores, evaluate finetune")
    for name in ("genotype.json", "alphas.jsonl"):
        assert (out / name).read_text() == (ref / name).read_text(), name
    a, b = load_file(str(ref / "network.safetensors")), load_file(str(out / "network.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r, g = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    plain = lambda hist: [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in hist]
    assert plain(g["search_history"]) == plain(r["search_history"])
    assert plain(g["evaluation"]["history"]) == plain(r["evaluation"]["history"])
    assert g["evaluation"]["test"] == r["evaluation"]["test"] and g["genotype"] == r["genotype"]
    # a finished search is not resumed; one line, nothing written
    before = _files(out)
    res = runner.invoke(cli, ["resume", str(out)])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: run {out} already finished; nothing to resume (see its report.md)"], res.stderr
    assert _files(out) == before


def test_resuming_a_search_with_another_recipe_or_a_damaged_checkpoint_is_one_line(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_at_save(m, 3)
        assert runner.invoke(cli, ["search", str(recipe), "--out", str(out)]).exit_code == 130
    before = _files(out)
    res = runner.invoke(cli, ["search", str(recipe), "search.arch_lr=0.1", "--resume", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "search.arch_lr: run 0.0003 vs now 0.1" in lines[0], res.stderr
    assert f"prunekit resume {out}" in lines[0] and _files(out) == before
    recipe_json = json.loads((out / "recipe.json").read_text())  # an edit of the run's own recipe
    recipe_json["search"]["hvp_r"] = 0.5
    (out / "recipe.json").write_text(json.dumps(recipe_json))
    res = runner.invoke(cli, ["resume", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "differs from the recipe the search started with (search.hvp_r: 0.01 then, 0.5 now)" in lines[0], lines[0]
    recipe_json["search"]["hvp_r"] = 0.01
    recipe_json["data"]["seed"] = 1  # the data split: it passed, and moved images between the two splits
    (out / "recipe.json").write_text(json.dumps(recipe_json))
    res = runner.invoke(cli, ["resume", str(out)])
    assert res.exit_code == 2 and "(data.seed: 0 then, 1 now)" in res.stderr, res.stderr
    assert {k: v for k, v in _files(out).items() if k != "recipe.json"} == {
        k: v for k, v in before.items() if k != "recipe.json"}
    recipe_json["data"]["seed"] = 0
    recipe_json["threads"] = 2  # where it runs: free to change (as is the evaluation before it begins)
    recipe_json["evaluate"]["finetune_epochs"] = 2
    (out / "recipe.json").write_text(json.dumps(recipe_json))  # other whitespace too: accepted
    from prunekit.methods.prdarts.run import SearchRecipe, check_recipe_unchanged, run_search

    check_recipe_unchanged(out, recipe_json, "recipe.json")
    moved = SearchRecipe.from_dict({**recipe_json, "data": {**recipe_json["data"], "seed": 1}})
    with pytest.raises(ConfigError, match=r"the recipe given differs .*\(data.seed: 0 then, 1 now\)"):
        run_search(moved, out, resume=True)  # the Python API resume is checked too
    assert {k: v for k, v in _files(out).items() if k != "recipe.json"} == {
        k: v for k, v in before.items() if k != "recipe.json"}
    last = out / "ckpt" / "search" / "pretrain" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    res = runner.invoke(cli, ["resume", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "pretrain/last.pt is corrupt" in lines[0], res.stderr
    res = runner.invoke(cli, ["search", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "not a search run directory" in res.stderr, res.stderr


@pytest.mark.parametrize("recipe, needles", [
    ({"search": 5}, ["missing required key(s) data", "cannot be resumed", "prunekit search"]),
    ({"data": {}}, ["no 'search' section"]),
    ({"search": {}, "data": {}, "version": 99}, ["version 99 is not supported", "prunekit that started the search"]),
], ids=["missing-section", "no-search", "other-version"])
def test_resume_of_a_search_whose_recipe_json_is_damaged_says_which_file(tmp_path, recipe, needles):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(recipe))
    res = CliRunner().invoke(cli, ["resume", str(run)])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run / "recipe.json") in lines[0], lines
    assert "__init__" not in lines[0] and all(n in lines[0] for n in needles), lines[0]
