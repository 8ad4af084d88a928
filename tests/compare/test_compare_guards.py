"""`prunekit compare` keeps results safe: report-only loads nothing, checks come before training,
damaged records and foreign dense models are refused, the report describes its records."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from prunekit.cli.main import cli
from prunekit.compare import CompareRecipe, run_compare
from prunekit.compare import arms as arms_module
from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.data import DataConfig, load_data
from prunekit.models import create_model

quiet = dict(echo=lambda s: None)


def _raw(dense_path, **changes):
    raw = {"name": "t", "model": {"name": "small_cnn"}, "data": {"name": "digits", "batch_size": 64},
           "seeds": [0], "device": "cpu", "dense": {"weights": str(dense_path)},
           "finetune": {"epochs": 1, "lr": 0.02, "log_every": 0}, "method_train": {"lr": 0.02, "log_every": 0},
           "bench": {"repeats": 3, "warmup": 1}, "eval": {"latency": False},
           "arms": {"dense": {"method": None},
                    "l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}}}}
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = create_model("small_cnn", 10)  # untrained: these tests check bookkeeping, not accuracy
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    save_model(model, str(path))
    return path


def test_report_only_loads_no_data_and_trains_nothing(dense_path, tmp_path, monkeypatch):
    recipe = CompareRecipe.from_dict(_raw(dense_path))
    run_compare(recipe, tmp_path / "c", **quiet)
    before = {p: p.read_bytes() for p in (tmp_path / "c" / "arms").rglob("*.json")}
    import prunekit.compare.run as run_module

    def no(*a, **k):
        raise AssertionError("report-only must not load data or train")

    monkeypatch.setattr(run_module, "load_data", no)
    monkeypatch.setattr(run_module, "train", no)
    monkeypatch.setattr(run_module, "run_arm", no)
    # a recipe whose dense weights are missing and whose dense.train would train: still nothing runs
    raw = _raw(tmp_path / "missing.safetensors", dense={"weights": str(tmp_path / "missing.safetensors"),
                                                         "train": {"epochs": 1}})
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", report_only=True, **quiet)
    assert result.ran == [] and sorted(result.summary) == ["dense", "l2"]  # matched by compare.json's sha256
    result = run_compare(recipe, tmp_path / "c", report_only=True, **quiet)
    assert result.ran == [] and sorted(result.summary) == ["dense", "l2"]
    assert {p: p.read_bytes() for p in (tmp_path / "c" / "arms").rglob("*.json")} == before
    assert not (tmp_path / "missing.safetensors").exists()


def test_report_only_without_records_or_folder_says_so(dense_path, tmp_path):
    with pytest.raises(CheckpointError, match="no records to report"):
        run_compare(CompareRecipe.from_dict(_raw(dense_path)), tmp_path / "none", report_only=True, **quiet)
    (tmp_path / "empty").mkdir()
    result = run_compare(CompareRecipe.from_dict(_raw(dense_path)), tmp_path / "empty", report_only=True, **quiet)
    assert any("no records yet for arm(s) dense, l2" in n for n in result.notes)


def test_arms_not_run_are_named_in_the_notes(dense_path, tmp_path):
    result = run_compare(CompareRecipe.from_dict(_raw(dense_path)), tmp_path / "c", only=["l2"], **quiet)
    assert result.ran == [("l2", 0)]
    assert any("no records yet for arm(s) dense (run them with --arms dense)" in n for n in result.notes)
    assert "no records yet" in (tmp_path / "c" / "compare.md").read_text()
    other = run_compare(CompareRecipe.from_dict(_raw(dense_path, seeds=[1])), tmp_path / "c", only=["l2"], **quiet)
    assert any("records of seed(s) [0] are on disk but not in this report" in n for n in other.notes)
    fewer = _raw(dense_path)
    del fewer["arms"]["l2"]  # l2's records stay on disk: the report says so instead of leaving them out silently
    report = run_compare(CompareRecipe.from_dict(fewer), tmp_path / "c", report_only=True, **quiet)
    assert any("records of arm(s) l2 are on disk but not in this report" in n for n in report.notes)


@pytest.mark.parametrize("method", [{"name": "magnitude", "macs_fraction": 0.001},
                                    {"name": "gator", "target": 0.1, "epochs": 1, "ignore": ["conv3"]}],
                         ids=["one-shot", "trained"])
def test_an_impossible_target_fails_before_any_arm_trains_and_names_its_arm(dense_path, tmp_path, monkeypatch, method):
    """Also for a method that trains (Gator): with conv3 unpruned even every gate closed keeps 33%
    of the MACs, which its own up-front check says before the first arm trains."""
    raw = _raw(dense_path)
    raw["arms"]["bad"] = {"method": method}
    ran = []
    monkeypatch.setattr("prunekit.compare.run.run_arm", lambda *a, **k: ran.append(a[1].name))
    with pytest.raises(ConfigError, match=r"^arm bad, seed 0: impossible target"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    assert ran == [] and not (tmp_path / "c" / "recipe.yaml").exists()


def test_an_error_inside_an_arm_names_the_arm(dense_path, tmp_path, monkeypatch):
    def fails(*a, **k):
        raise ConfigError("something is wrong")

    monkeypatch.setattr("prunekit.compare.run.run_arm", fails)
    with pytest.raises(ConfigError, match=r"^arm dense, seed 0: something is wrong"):
        run_compare(CompareRecipe.from_dict(_raw(dense_path)), tmp_path / "c", **quiet)


def test_a_refused_rerun_leaves_the_folder_as_it_was(dense_path, tmp_path):
    raw = _raw(dense_path)
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    saved = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    raw["finetune"] = {**raw["finetune"], "epochs": 3}
    with pytest.raises(CheckpointError, match=r"different arm spec or dense model \(changed: finetune, finetune_epochs\)"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)  # the message names what changed
    assert {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()} == saved


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("seed"), "it says arm 'l2', seed None"),
    (lambda r: r.update(acc="abc"), "'acc' is 'abc', not a finite number"),
    (lambda r: r.update(acc=float("inf")), "'acc' is inf, not a finite number"),
    (lambda r: r.update(macs_fraction=None), "'macs_fraction' is None, not a finite number"),
    (lambda r: r.update(val_acc="x"), "'val_acc' is 'x', not a finite number"),
    (lambda r: r.update(finetune_epochs=1.5), "'finetune_epochs' is 1.5, not a whole number"),
    (lambda r: r.update(latency={"n": 3}), "'latency' has no median_ms"),
    (lambda r: r.update(latency={"median_ms": 1.0, "speedup": "x"}), "latency 'speedup' is 'x', not a finite"),
    (lambda r: r.update(latency={"median_ms": 1.0, "n": {"a": 1}}), "latency 'n' is {'a': 1}, not a whole number"),
    (lambda r: r.update(environment="x"), "'environment' is 'x', not a mapping"),  # read by the report: a traceback
    (lambda r: r.update(fields_added_since=5), "'fields_added_since' is 5, not a list of field names"),
])
def test_a_damaged_record_gets_one_message_naming_it(dense_path, tmp_path, damage, message):
    raw = _raw(dense_path)
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    path = tmp_path / "c" / "arms" / "l2" / "seed0.json"
    rec = json.loads(path.read_text())
    damage(rec)
    path.write_text(json.dumps(rec))
    for report_only in (False, True):
        with pytest.raises(CheckpointError, match=f"record {path} is damaged") as err:
            run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", report_only=report_only, **quiet)
        assert message in str(err.value) and "remove it" in str(err.value)


def test_dense_weights_trained_with_other_settings_are_refused(tmp_path):
    """A dense model compare trained into `dense.weights` records its settings beside it; a recipe
    with other settings refuses it instead of fine-tuning from the wrong model."""
    weights = tmp_path / "shared" / "dense.safetensors"
    small = _raw(weights, dense={"weights": str(weights), "train": {"epochs": 1, "lr": 0.05, "log_every": 0}},
                 data={"name": "digits", "batch_size": 64, "limit_train": 256}, arms={"dense": {"method": None}})
    run_compare(CompareRecipe.from_dict(small), tmp_path / "smoke", **quiet)
    info = json.loads(weights.with_suffix(".json").read_text())
    assert info["data"]["limit_train"] == 256 and info["train"]["epochs"] == 1
    full = {**small, "data": {"name": "digits", "batch_size": 64}}
    with pytest.raises(CheckpointError, match=r"data.limit_train=256 \(recipe: None\)"):
        run_compare(CompareRecipe.from_dict(full), tmp_path / "full", **quiet)
    assert not (tmp_path / "full").exists()
    recipe = tmp_path / "full.yaml"  # --dry-run says so too (it printed the dense model and exit 0)
    recipe.write_text(yaml.safe_dump(full))
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", "--out", str(tmp_path / "full")])
    assert res.exit_code == 2 and "data.limit_train=256 (recipe: None)" in res.output, res.output
    given = {**full, "dense": {"weights": str(weights)}}  # no dense.train: the weights are taken as given
    assert run_compare(CompareRecipe.from_dict(given), tmp_path / "given", **quiet).ran == [("dense", 0)]


def test_changing_the_protocol_data_trains_its_own_dense_model_in_the_output_folder():
    raw = yaml.safe_load(open("recipes/compare_gator_resnet20.yaml"))
    assert CompareRecipe.from_dict(dict(raw)).dense_weights == "local/protocol_dense_resnet20.safetensors"
    for change in ({"data": {"limit_train": 512}}, {"dense": {"train": {"epochs": 2}}}, {"model": {"name": "resnet56"}}):
        assert CompareRecipe.from_dict({**raw, **change}).dense_weights is None, change
    assert CompareRecipe.from_dict({**raw, "data": {"root": "elsewhere", "num_workers": 2}}).dense_weights is not None
    asked = {**raw, "data": {"limit_train": 512}, "dense": {"weights": "mine.safetensors"}}
    assert CompareRecipe.from_dict(asked).dense_weights == "mine.safetensors"


@pytest.mark.parametrize("model", [{"name": "resnet20", "kwargs": {}}, {"name": "resnet20", "kwargs": None}])
def test_writing_the_protocol_model_without_kwargs_keeps_the_protocol_dense_model(model):
    raw = yaml.safe_load(open("recipes/compare_gator_resnet20.yaml"))
    recipe = CompareRecipe.from_dict({**raw, "model": model})
    assert recipe.model_kwargs == {} and recipe.dense_weights == "local/protocol_dense_resnet20.safetensors"
    assert CompareRecipe.from_dict({**raw, "model": {"name": "resnet20", "kwargs": {"x": 1}}}).dense_weights is None


def test_the_report_describes_the_records_latency_and_devices(dense_path, tmp_path):
    raw = _raw(dense_path, eval={"latency": True}, bench={"repeats": 3, "warmup": 1, "device": "auto"})
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    path = tmp_path / "c" / "arms" / "l2" / "seed0.json"
    assert json.loads(path.read_text())["latency"]["device"] == "cpu"  # "auto" resolved
    raw["bench"] = {"repeats": 50, "warmup": 10}  # the bench section changed since: records keep theirs
    rec = json.loads(path.read_text())
    rec["device"] = "cuda:0"
    path.write_text(json.dumps(rec))
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", report_only=True, **quiet)
    report = (tmp_path / "c" / "compare.md").read_text()
    assert "cpu, float32, batch 1, 3 timed forwards" in report and "50 timed" not in report
    assert any("more than one training device: cpu: dense; cuda:0: l2" in n for n in result.notes)


def test_a_latency_recorded_as_auto_is_read_from_the_records_machine():
    from prunekit.compare.run import _latency_setting

    lat = {"device": "auto", "dtype": "float32", "batch_size": 1, "n": 50}
    old = [{"latency": lat, "environment": {"cuda": None}}, {"latency": {**lat, "device": "cpu"}}]
    assert _latency_setting(old) == "cpu, float32, batch 1, 50 timed forwards"  # one setting, not two
    assert _latency_setting([{"latency": lat, "environment": {"cuda": "13.0"}}]).startswith("cuda, ")
    assert _latency_setting([{"latency": lat}]).startswith("auto, ")  # nothing to resolve it from


def test_cli_report_only_needs_no_data(dense_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(dense_path)))
    out = tmp_path / "c"
    run_compare(CompareRecipe.from_dict(_raw(dense_path)), out, **quiet)
    res = CliRunner().invoke(cli, ["compare", str(recipe), "data.root=/nonexistent", "--report-only", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output


def test_an_override_of_a_misspelt_arm_suggests_the_arm(dense_path):
    raw = _raw(dense_path)
    raw["arms"]["magnitude_l2"] = raw["arms"].pop("l2")
    raw["arms"]["magnitud_l2"] = {"method": {"epochs": 1}}  # what arms.magnitud_l2.method.epochs=1 adds
    with pytest.raises(ConfigError, match=r"did you mean arm 'magnitude_l2'\?"):
        CompareRecipe.from_dict(raw)


def test_dry_run_reports_what_a_run_would_find_and_checks_the_data_path(dense_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(dense_path)))
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert f"dense model: {dense_path}" in res.output and "records on disk: 0" in res.output
    assert not (tmp_path / "c").exists()
    missing = tmp_path / "nope.safetensors"
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", f"dense.weights={missing}"])
    assert res.exit_code == 2 and "do not exist and the recipe has no dense.train" in res.output
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", "data.name=imagefolder",
                                   f"data.root={tmp_path / 'nodata.tar.gz'}"])
    assert res.exit_code == 2 and "nodata.tar.gz' does not exist; set data.root=" in res.output


def test_every_record_that_cannot_be_reused_is_named_at_once(dense_path, tmp_path):
    raw = _raw(dense_path, seeds=[0, 1])
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", only=["l2"], **quiet)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0 and "records on disk: 2, 2 of them reused" in res.output, res.output
    raw["finetune"] = {**raw["finetune"], "epochs": 2}
    with pytest.raises(CheckpointError, match=r"^2 records cannot be reused: .*l2/seed0.json.*l2/seed1.json"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    # --dry-run finds it too (it said 'finished records are reused' and exit 0)
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--dry-run", "finetune.epochs=2", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "2 records cannot be reused" in res.output, res.output


def test_a_model_key_compare_does_not_read_is_refused(dense_path):
    raw = _raw(dense_path)
    raw["model"] = {**raw["model"], "num_classes": 3}
    with pytest.raises(ConfigError, match="model: unknown key\\(s\\) num_classes \\(compare takes the number of classes"):
        CompareRecipe.from_dict(raw)


def test_names_in_the_report_s_title_and_notes_are_escaped(dense_path, tmp_path):
    raw = _raw(dense_path, name="t<b>")
    raw["arms"]["l2<script>"] = raw["arms"].pop("l2")  # a newline in an arm name is refused (a folder name)
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", only=["dense"], **quiet)
    report = (tmp_path / "c" / "compare.md").read_text()
    assert "no records yet for arm(s) l2\\<script\\>" in report  # markup escaped
    assert "<script>" not in report and "<b>" not in report


def test_latency_over_fewer_seeds_than_the_accuracy_is_said(dense_path, tmp_path):
    run_compare(CompareRecipe.from_dict(_raw(dense_path)), tmp_path / "c", only=["l2"], **quiet)  # no latency
    raw = _raw(dense_path, seeds=[0, 1], eval={"latency": True})
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", only=["l2"], **quiet)
    assert result.ran == [("l2", 1)] and result.summary["l2"]["acc"]["n"] == 2
    assert result.summary["l2"]["speedup"]["n"] == 1  # one seed's speed-up under a "2 seeds" row
    assert any("arm l2: latency and speed-up are over seeds [1] only" in n for n in result.notes)


def test_an_arm_that_prunes_is_timed_even_when_it_is_called_dense(dense_path, tmp_path):
    raw = _raw(dense_path, eval={"latency": True})
    raw["arms"] = {"reference": {"method": None}, "dense": raw["arms"]["l2"]}  # "dense" names a pruned arm here
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    pruned = result.records["dense"][0]
    assert pruned["macs_fraction"] < 0.6
    # the pruned model itself was timed, not the dense model twice (same numbers, speed-up exactly 1)
    assert pruned["latency"]["median_ms"] != pruned["latency"]["dense_median_ms"]
    assert result.records["reference"][0]["latency"]["speedup"] == 1.0  # the dense model, timed once


def test_the_table_shows_the_dense_time_each_speed_up_is_over():
    """Each arm's speed-up is over the dense model timed beside it; the table shows that time."""
    from prunekit.compare.summary import HEADERS, summarise, table_rows

    rec = {"acc": 0.9, "pruned_acc": 0.8, "macs": 100, "macs_fraction": 0.5, "params": 10, "nonzero_fraction": 1.0,
           "seed": 0, "method_epochs": 0, "finetune_epochs": 1,
           "latency": {"median_ms": 6.35, "dense_median_ms": 2.97, "speedup": 0.47}}
    row = table_rows(summarise({"a": [rec]}), [])[0]
    i = HEADERS.index("dense ms (same run)")
    assert row[i] == "2.97" and row[i - 1] == "6.35" and row[i + 1] == "0.47x"


@pytest.mark.parametrize("name", ["../../outside", "a/b", "a\\b", "..", ".", "", "a\0b", " l2", "l2 ", "a\tb"])
def test_an_arm_name_that_is_not_one_folder_name_is_refused(dense_path, tmp_path, name):
    raw = _raw(dense_path)
    raw["arms"] = {name: {"method": None}}
    with pytest.raises(ConfigError, match=r"arm name .* must be a folder name"):
        CompareRecipe.from_dict(raw)


def test_a_refused_arm_name_writes_no_record_outside_the_output_folder(dense_path, tmp_path):
    raw = _raw(dense_path)
    raw["arms"] = {"../../outside": {"method": None}}
    with pytest.raises(ConfigError):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "a" / "c", **quiet)
    assert list(tmp_path.rglob("*.json")) == []


def test_arm_names_that_are_one_name_as_text_are_refused(dense_path):
    raw = _raw(dense_path)
    raw["arms"] = {1: {"method": None}, "1": {"method": {"name": "magnitude", "macs_fraction": 0.5}}}
    with pytest.raises(ConfigError, match=r"arm '1' is given twice"):
        CompareRecipe.from_dict(raw)


def test_the_table_shows_accuracy_to_the_hundredth_so_small_spreads_are_not_zero():
    from prunekit.compare.summary import HEADERS, summarise, table_rows

    def rec(seed, acc, pruned):
        return {"acc": acc, "pruned_acc": pruned, "macs": 100, "macs_fraction": 0.5, "params": 10,
                "nonzero_fraction": 1.0, "seed": seed, "method_epochs": 0, "finetune_epochs": 1}

    accs, pruned = [0.8590, 0.8583, 0.8583], [0.8527, 0.8263, 0.8380]
    rows = table_rows(summarise({"a": [rec(s, a, p) for s, (a, p) in enumerate(zip(accs, pruned))],
                                 "b": [rec(0, 0.8566, 0.1569)]}), [])
    # by hand: mean 85.8533, sample std sqrt((0.0467^2 + 2 * 0.0233^2) / 2) = 0.0404
    assert rows[0][HEADERS.index("acc %")] == "85.85 ± 0.04"
    assert rows[0][HEADERS.index("acc after prune %")] == "83.90 ± 1.32"
    assert rows[1][HEADERS.index("acc %")] == "85.66" and rows[1][HEADERS.index("acc after prune %")] == "15.69"


@pytest.mark.parametrize("change, message", [
    ({"name": 2024}, r"name=2024 must be text"),
    ({"name": "a\0b"}, r"name='a\\x00b' names a folder: use text without path separators, control characters"),
    ({"name": "é" * 101}, r"names a folder and is 202 bytes long: use at most 200"),
    ({"out": 5}, r"out=5 must be a folder path"),
    ({"model": {"name": "small_cnn", "kwargs": [1]}}, r"model.kwargs=\[1\] must be a mapping"),
    ({"dense": {"weights": 2024}}, r"dense.weights=2024 must be a path"),
])
def test_recipe_values_of_the_wrong_type_are_one_config_error(dense_path, change, message):
    # YAML reads `name: 2024` as an integer: each of these crashed later with a bare TypeError
    with pytest.raises(ConfigError, match=message):
        CompareRecipe.from_dict(_raw(dense_path, **change))


def test_reporting_the_val_split_needs_a_val_split(dense_path, tmp_path):
    # eval.split=val with val_fraction=0 crashed with a TypeError after the data was loaded
    raw = _raw(dense_path, eval={"split": "val", "latency": False},
               data={"name": "digits", "batch_size": 64, "val_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"eval.split=val.*data.val_fraction=0"):
        CompareRecipe.from_dict(raw)
    tiny = {**raw, "data": {"name": "digits", "batch_size": 64, "val_fraction": 1e-6}}  # rounds to no image
    with pytest.raises(ConfigError, match=r"eval.split=val.*no validation images"):
        run_compare(CompareRecipe.from_dict(tiny), tmp_path / "c", **quiet)
    assert not (tmp_path / "c").exists()


def test_an_arm_without_fine_tuning_is_still_held_to_the_shared_budget():
    # finetune: false skipped the budget check: a method training 3 epochs under a 1-epoch budget
    raw = {"model": {"name": "small_cnn"}, "data": {"name": "digits"}, "dense": {"train": {"epochs": 1}},
           "finetune": {"epochs": 1},
           "arms": {"g": {"method": {"name": "gator", "target": 0.5, "epochs": 3}, "finetune": False}}}
    with pytest.raises(ConfigError, match="arm 'g' trains 3 epochs itself, more than the shared budget"):
        CompareRecipe.from_dict(raw)
    raw["finetune"]["epochs"] = 3
    assert CompareRecipe.from_dict(raw).arms["g"].budget_left(3) == 0


def test_a_kill_after_the_dense_model_is_saved_keeps_its_training_settings(dense_path, tmp_path, monkeypatch):
    """The settings a dense model was trained with are on disk as soon as its weights are, so a kill
    while it is scored cannot let a recipe with other settings take it."""
    import prunekit.compare.run as run_module

    small = _raw(dense_path, dense={"train": {"epochs": 1, "lr": 0.05, "log_every": 0}},
                 data={"name": "digits", "batch_size": 64, "limit_train": 128}, arms={"dense": {"method": None}})

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_compare(CompareRecipe.from_dict(small), tmp_path / "c", **quiet)
    monkeypatch.undo()
    assert (tmp_path / "c" / "dense.safetensors").is_file()
    assert not list((tmp_path / "c").glob("*.tmp")) and not list((tmp_path / "c").glob(".*.tmp"))
    other = {**small, "dense": {"train": {"epochs": 2, "lr": 0.05, "log_every": 0}}}
    with pytest.raises(CheckpointError, match=r"dense.train.epochs=1 \(recipe: 2\)"):
        run_compare(CompareRecipe.from_dict(other), tmp_path / "c", **quiet)


def test_two_writers_of_one_file_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """Processes filling one folder (one per seed) each write compare.json at their end: a shared
    temporary name let one rename the other's half-written file and the other fail."""
    import os

    from prunekit.compare import records

    path, real, inner = tmp_path / "compare.json", os.replace, []

    def other_process_writes_meanwhile(src, dst):
        if not inner:
            inner.append(1)
            records.write_json(path, {"by": "other"})
        real(src, dst)

    monkeypatch.setattr(os, "replace", other_process_writes_meanwhile)
    records.write_json(path, {"by": "this"})
    assert json.loads(path.read_text()) == {"by": "this"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json"]


def test_the_resolved_recipe_in_the_output_folder_runs_the_same_comparison_again(dense_path, tmp_path):
    # recipe.yaml held the arms as {method: <name>, config: {...}}, which no recipe reader takes
    raw = _raw(dense_path, arms={"dense": {"method": None},
                                 "l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}, "keep_zeros": True}})
    out = tmp_path / "c"
    run_compare(CompareRecipe.from_dict(raw), out, **quiet)
    res = CliRunner().invoke(cli, ["compare", str(out / "recipe.yaml"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "running" not in res.output  # the same specs: every record is reused
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["arms"]["l2"]["method"]["name"] == "magnitude" and resolved["arms"]["l2"]["keep_zeros"] is True


def test_a_seed_in_an_arms_method_config_is_refused(dense_path):
    # the arm's seed replaced it silently, and the record's spec still said seed 5
    raw = _raw(dense_path, arms={"r": {"method": {"name": "random_init", "sparsity": 0.5, "seed": 5}}})
    with pytest.raises(ConfigError, match=r"arm 'r': method.seed=5 would not be used.*`seeds`"):
        CompareRecipe.from_dict(raw)


def test_ctrl_c_says_the_finished_records_stay_and_how_to_continue(dense_path, tmp_path, monkeypatch):
    import prunekit.compare as compare_pkg

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare_pkg, "run_compare", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(dense_path)))
    out = tmp_path / "c"
    res = CliRunner().invoke(cli, ["compare", str(recipe), "--out", str(out), "-q"])
    assert res.exit_code == 130, res.output
    assert f"the finished arm x seed records stay in {out}: run the same command again" in res.stderr


def test_a_home_relative_dense_path_and_out_folder_are_expanded(dense_path, tmp_path, monkeypatch):
    """`~/...` in dense.weights and out names the user's home, as it does on the command line, not a
    folder called '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "dense.safetensors").write_bytes(dense_path.read_bytes())
    raw = _raw("~/w/dense.safetensors", out="~/results", arms={"dense": {"method": None}})
    result = run_compare(CompareRecipe.from_dict(raw), **quiet)
    assert result.ran == [("dense", 0)]
    assert (tmp_path / "results" / "t").is_dir() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("change", ["truncate", "replace"])
def test_damaged_or_replaced_dense_weights_are_named_and_the_records_kept(dense_path, tmp_path, change):
    """The records were checked against whatever dense file lay there: a damaged or swapped
    dense.safetensors read as 'records cannot be reused; remove them'. Now the dense file is
    compared with the sha256 its dense.json recorded, first, and the message names it."""
    raw = _raw(dense_path, dense={"weights": None, "train": {"epochs": 1, "lr": 0.02, "log_every": 0}})
    out = tmp_path / "c"
    run_compare(CompareRecipe.from_dict(raw), out, **quiet)
    records = {p: p.read_bytes() for p in (out / "arms").rglob("*.json")}
    weights = out / "dense.safetensors"
    if change == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.write_bytes(dense_path.read_bytes())  # a valid dense model, but not this comparison's
    for report_only in (False, True):
        with pytest.raises(CheckpointError, match="are not the model recorded in .*dense.json.*damaged or replaced"):
            run_compare(CompareRecipe.from_dict(raw), out, report_only=report_only, **quiet)
    assert {p: p.read_bytes() for p in (out / "arms").rglob("*.json")} == records


def test_a_dense_training_checkpoint_of_other_settings_names_the_folder_to_remove(dense_path, tmp_path):
    """The engine's advice ('use a new ckpt_dir') is not a compare setting: the message names
    the output folder's dense_ckpt instead."""
    from prunekit.engine.train import TrainConfig, train
    out = tmp_path / "c"
    bundle = load_data(DataConfig(name="digits", batch_size=64))
    torch.manual_seed(0)
    train(create_model("small_cnn", 10), bundle.train, None, TrainConfig(epochs=2, lr=0.02, log_every=0),
          ckpt_dir=out / "dense_ckpt", progress=False)
    raw = _raw(dense_path, dense={"weights": None, "train": {"epochs": 1, "lr": 0.02, "log_every": 0}})
    with pytest.raises(CheckpointError, match=r"training checkpoint in .*dense_ckpt cannot continue .*remove "
                                              r".*dense_ckpt to train the dense model from the start"):
        run_compare(CompareRecipe.from_dict(raw), out, **quiet)


def test_a_comparison_folder_another_process_works_in_is_refused(dense_path, tmp_path):
    """Two compares in one folder ran the same arms side by side; the folder is held while one works."""
    import fcntl
    import os
    out = tmp_path / "c"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another process's lock (flock: a second open of the folder conflicts)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another prunekit process"):
            run_compare(CompareRecipe.from_dict(_raw(dense_path)), out, **quiet)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []
    run_compare(CompareRecipe.from_dict(_raw(dense_path)), out, **quiet)  # free again


def test_a_dense_training_checkpoint_made_under_other_data_settings_is_refused(dense_path, tmp_path):
    """A killed dense training resumed under another data.seed (same steps per epoch) went on with
    the first run's model on another split, and the result was recorded with the new settings."""
    import json
    out = tmp_path / "c"
    raw = _raw(dense_path, dense={"weights": None, "train": {"epochs": 1, "lr": 0.02, "log_every": 0}},
               arms={"dense": {"method": None}}, seeds=[0])
    run_compare(CompareRecipe.from_dict(raw), out, **quiet)
    recorded = json.loads((out / "dense_ckpt" / "settings.json").read_text())  # written before the first epoch
    assert recorded["data"]["seed"] == 0
    (out / "dense.safetensors").unlink()  # as if killed before the weights were saved
    raw["data"] = {**raw["data"], "seed": 1}
    with pytest.raises(CheckpointError, match=r"checkpoint in .*dense_ckpt was made with data.seed=0 \(recipe: 1\); "
                                              r"remove .*dense_ckpt to train the dense model from the start"):
        run_compare(CompareRecipe.from_dict(raw), out, **quiet)


def test_admm_is_an_arm_method_as_it_is_a_run_method(dense_path):
    """`prunekit info` and `prunekit run --method admm` take the alias; a compare arm refused it."""
    raw = _raw(dense_path, arms={"a": {"method": {"name": "admm", "sparsity": 0.7, "epochs": 1}}})
    arm = CompareRecipe.from_dict(raw).arms["a"]
    assert arm.config.optimization == "admm"
    raw["arms"]["a"]["method"]["optimization"] = "slr"
    with pytest.raises(ConfigError, match="arm 'a': method 'admm' means slr with optimization='admm'"):
        CompareRecipe.from_dict(raw)


def test_an_arm_set_to_null_is_removed_and_dry_run_builds_the_model(dense_path, tmp_path):
    """`arms.<name>=null` was refused ('must be a mapping'); --dry-run passed an unknown model."""
    from click.testing import CliRunner

    from prunekit.cli.main import cli

    raw = _raw(dense_path)
    raw["arms"]["fpgm"] = None
    assert sorted(CompareRecipe.from_dict(raw).arms) == ["dense", "l2"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_raw(dense_path)))
    res = CliRunner().invoke(cli, ["compare", str(recipe), "arms.fpgm=null", "--dry-run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and '"fpgm"' not in res.output, res.output
    for bad, needle in (("model.name=resnet2", "unknown model 'resnet2'"), ("model.kwargs={foo: 1}", "does not take foo")):
        res = CliRunner().invoke(cli, ["compare", str(recipe), bad, "--dry-run", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and needle in res.output, (bad, res.output)
    assert not (tmp_path / "o").exists()


def test_prunekit_report_names_a_missing_folder_and_a_comparison_folder(tmp_path):
    from click.testing import CliRunner

    from prunekit.cli.main import cli

    res = CliRunner().invoke(cli, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.json").write_text("{}")
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "c")])
    assert res.exit_code == 2 and "is a comparison folder" in res.output and "--report-only" in res.output, res.output


def test_report_only_keeps_what_compare_json_said_of_the_dense_model(dense_path, tmp_path):
    """--report-only rewrote compare.json with the dense model's training and data settings gone."""
    import json
    raw = _raw(dense_path, dense={"weights": None, "train": {"epochs": 1, "lr": 0.02, "log_every": 0}},
               arms={"dense": {"method": None}}, seeds=[0])
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", **quiet)
    before = json.loads((tmp_path / "c" / "compare.json").read_text())["dense"]
    assert before.get("trained_here") and "train" in before and "data" in before
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", report_only=True, **quiet)
    after = json.loads((tmp_path / "c" / "compare.json").read_text())["dense"]
    assert {k: after.get(k) for k in before} == before
