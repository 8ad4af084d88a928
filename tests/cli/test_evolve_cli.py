"""`prunekit evolve` writes a run directory whose best function prunes; `prunekit info` lists criteria."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli.evolve_cmd import load_evolve_recipe
from prunekit.cli.main import cli
from prunekit.core.errors import ConfigError
from prunekit.engine.train import TrainConfig
from prunekit.evolve import digits_task
from prunekit.evolve.fitness import train_dense
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models import create_model

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "evolve_digits_cifar.yaml"


def test_shipped_recipe_reads():
    cfg, reeval, name, _ = load_evolve_recipe(str(RECIPE), [])
    assert [t.name for t in cfg.tasks] == ["digits", "cifar10_subset"] and cfg.population == 14
    assert reeval == {"top": 3, "seeds": 3} and name == "evolve_digits_cifar"
    with pytest.raises(ConfigError, match="unknown recipe key"):
        load_evolve_recipe(str(RECIPE), ["method.name=x"])
    for bad in ("reevaluate.top=true", "reevaluate.seeds=-1", "reevaluate.seeds=1.5"):
        with pytest.raises(ConfigError, match="reevaluate takes top and seeds, integers >= 0"):
            load_evolve_recipe(str(RECIPE), [bad])
    for bad in ("reevaluate=5", "reevaluate=[1]"):
        with pytest.raises(ConfigError, match="reevaluate=.* must be a mapping"):
            load_evolve_recipe(str(RECIPE), [bad])
    for bad in ('name="a\\0b"', "name=a/b", "name=.."):
        with pytest.raises(ConfigError, match="name="):
            load_evolve_recipe(str(RECIPE), [bad])
    assert load_evolve_recipe(str(RECIPE), ["name=2024"])[2] == "2024"  # a number in YAML names it too


@pytest.mark.slow  # 30 s with the machine's load average at 18 on 2 cores
def test_evolve_command_writes_a_run_directory(tmp_path):
    dense = tmp_path / "dense.safetensors"
    train_dense(digits_task(dense_train=TrainConfig(epochs=1, lr=0.05)), dense)
    task = f"[{{base: digits, init: {dense}, finetune: {{epochs: 1}}, calib_samples: 64}}]"
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), f"evolve.tasks={task}", "evolve.population=3",
                                      "evolve.parents=2", "evolve.generations=1", "evolve.executor=serial",
                                      "evolve.reeval_top=1", "evolve.reeval_seeds=1", "reevaluate.top=1",
                                      "reevaluate.seeds=1", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("best.txt", "functions.json", "reevaluation.json", "fitness.png", "report.md", "recipe.yaml",
                 "checkpoints/gen_001.json"):
        assert (out / name).is_file(), name
    hof = json.loads((out / "functions.json").read_text())
    assert hof[0]["text"] == (out / "best.txt").read_text().strip() and hof[0]["formula"]
    assert "(generations 0-1: the initial population and 1 bred from it" in (out / "report.md").read_text()
    labels = [r["label"] for r in json.loads((out / "reevaluation.json").read_text())]
    assert len(labels) == 7 and any(lab.startswith("evolved #1") for lab in labels)  # best + the other seeds
    model = create_model("small_cnn")
    x = torch.randn(8, 1, 8, 8)
    prune_(model, MagnitudeConfig(criterion="evolved:" + hof[0]["text"], channel_ratio=0.5, probe=False), x[:1],
           batches=[(x, torch.arange(8) % 4)])
    assert model.conv1.out_channels == 16


def test_info_lists_the_evolved_criteria():
    out = CliRunner().invoke(cli, ["info", "criteria"]).output
    for name in ("ga_func2", "abs_snr", "t_stat", "seed_geo_median", "evolved:<text>"):
        assert name in out


def test_a_task_that_cannot_load_fails_in_one_line_and_leaves_no_run_directory(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)  # truncated: not even a header
    task = f"[{{base: digits, init: {broken}, calib_samples: 64}}]"
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), f"evolve.tasks={task}", "evolve.population=3",
                                      "evolve.parents=2", "evolve.generations=0", "evolve.executor=serial",
                                      "reevaluate.seeds=0", "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: task 'digits': dense weights") and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("task, needle", [
    ("[{base: digits}, {base: cifar10_subset, data: {root: /nonexistent/cifar.tar.gz}}]",
     "task 'cifar10_subset': data.root '/nonexistent/cifar.tar.gz' does not exist"),
    ("[{base: digits, model: nosuchmodel}]", "task 'digits': "),
    ("[{base: digits, init: /nonexistent/dense.safetensors}]", "init '/nonexistent/dense.safetensors' is not a file"),
    ("[{base: digits, ignore: [conv9]}]", "task 'digits': ignore names modules that do not exist: ['conv9']"),
    ("[{base: digits, model_kwargs: 5}]", "task 'digits': model_kwargs=5 must be a mapping"),
])
def test_every_task_is_checked_before_any_dense_model_trains(tmp_path, task, needle):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), f"evolve.tasks={task}", "evolve.population=3",
                                      "evolve.parents=2", "evolve.generations=0", "evolve.executor=serial",
                                      "reevaluate.seeds=0", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output and "training the dense" not in result.output
    assert not out.exists()


def test_resume_refuses_a_directory_that_is_not_an_evolve_run(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.md").write_text("# someone else's report\n")
    (foreign / "recipe.yaml").write_text("protocol: cifar10_resnet20\narms: {}\n")
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), "--resume", str(foreign)])
    assert result.exit_code == 2 and "not an evolve run directory" in result.output, result.output
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before


def test_a_new_evolve_run_never_writes_into_another_runs_directory(tmp_path, monkeypatch):
    """The default name taken by a run started in the same second: this one claims -2, and the
    other run's files stay as they were."""
    import prunekit.evolve.search as search_mod
    from prunekit.cli import rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    monkeypatch.setattr("prunekit.evolve.search.check_tasks", lambda cfg: None)
    used = []

    def fake_search(cfg, run_dir, **kwargs):
        used.append(run_dir)
        raise ConfigError("stopped here by the test")
    monkeypatch.setattr(search_mod, "run_search", fake_search)
    other = tmp_path / "runs" / "evolve_digits_cifar-20260101-000000"
    other.mkdir(parents=True)
    (other / "recipe.yaml").write_text("name: someone else\n")
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), "-q"])
    assert result.exit_code == 2 and "stopped here by the test" in result.output, result.output
    assert used == [Path("runs") / "evolve_digits_cifar-20260101-000000-2"]
    assert sorted(p.name for p in other.iterdir()) == ["recipe.yaml"]
    assert (other / "recipe.yaml").read_text() == "name: someone else\n"


def test_ctrl_c_names_the_resume_command(tmp_path, monkeypatch):
    """An interrupted search exits 130 and says how to continue it (it checkpoints every generation)."""
    import prunekit.evolve.search as search_mod

    monkeypatch.setattr("prunekit.evolve.search.check_tasks", lambda cfg: None)

    def interrupted(cfg, run_dir, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(search_mod, "run_search", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["evolve", str(RECIPE), "--out", str(out), "-q"])
    assert result.exit_code == 130, result.output
    assert f"interrupted; continue with: prunekit evolve --resume {out}" in result.stderr
    assert (out / "recipe.yaml").is_file()  # what --resume reads


def _stopped_run(tmp_path, monkeypatch):
    """A run directory holding the shipped recipe, with the search replaced by a stop."""
    import prunekit.evolve.search as search_mod

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE.read_text())
    monkeypatch.setattr(search_mod, "check_tasks", lambda cfg: None)

    def stop(*args, **kwargs):
        raise ConfigError("stopped here by the test")
    monkeypatch.setattr(search_mod, "run_search", stop)
    return run


def test_resume_refuses_settings_that_change_the_recorded_search_and_a_second_directory(tmp_path, monkeypatch):
    """--resume with overrides ran a search its recipe.yaml did not describe (a plain --resume then
    failed); --out beside --resume was ignored without a word."""
    run = _stopped_run(tmp_path, monkeypatch)
    before = (run / "recipe.yaml").read_text()
    for extra, needle in [(["evolve.population=20"], "change evolve.population from the search"),
                          (["reevaluate.seeds=1"], "change reevaluate.seeds"),
                          (["--out", str(tmp_path / "other")], "name two run directories")]:
        result = CliRunner().invoke(cli, ["evolve", "--resume", str(run), *extra, "-q"])
        assert result.exit_code == 2 and needle in result.output, (extra, result.output)
    assert not (tmp_path / "other").exists() and (run / "recipe.yaml").read_text() == before
    result = CliRunner().invoke(cli, ["evolve", "--resume", str(run), "evolve.workers=1", "evolve.executor=serial", "-q"])
    assert "stopped here by the test" in result.output, result.output  # where jobs run may change


def test_a_weights_file_or_a_directory_as_the_recipe_gets_advice_this_command_takes(tmp_path):
    """The advice was --weights or init=, which evolve, compare and search do not have."""
    weights = tmp_path / "dense.safetensors"
    weights.write_bytes(b"\x80\x81\xfe\xff" * 8)
    for command in ("evolve", "compare", "search"):
        result = CliRunner().invoke(cli, [command, str(weights)])
        assert result.exit_code == 2 and "is not a YAML recipe (it is not UTF-8 text); give a YAML recipe file" \
            in result.output and "--weights" not in result.output, (command, result.output)
    result = CliRunner().invoke(cli, ["evolve", str(tmp_path)])
    assert result.exit_code == 2 and f"continue the run in it with prunekit evolve --resume {tmp_path}" in result.output
    result = CliRunner().invoke(cli, ["prune", str(weights)])
    assert "--weights" in result.output, result.output  # prune does take weights
