"""`prunekit compare`: table, plot, resume, Torch-Pruning arm and its skip, recipe checks."""
from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli.main import cli
from prunekit.compare import CompareRecipe, pareto_front, run_compare
from prunekit.compare import arms as arms_module
from prunekit.compare import baselines
from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.cost.macs import count_cost
from prunekit.data import DataConfig, load_data
from prunekit.methods.magnitude import MagnitudeConfig, magnitude_prune_
from prunekit.models import create_model


def _raw(dense_path, **changes):
    raw = {"name": "t", "model": {"name": "small_cnn"}, "data": {"name": "digits", "batch_size": 64},
           "seeds": [0, 1], "device": "cpu", "dense": {"weights": str(dense_path)},
           "finetune": {"epochs": 1, "lr": 0.02, "log_every": 0}, "method_train": {"lr": 0.02, "log_every": 0},
           "target": {"metric": "macs", "fraction": 0.5},
           "bench": {"repeats": 3, "warmup": 1}, "eval": {"latency": False},
           "arms": {"dense": {"method": None},
                    "l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}},
                    "fpgm": {"method": {"name": "magnitude", "criterion": "fpgm", "macs_fraction": 0.5}}}}
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def dense_path(tmp_path_factory):
    """A small CNN trained one epoch on digits, saved once for every test here."""
    from safetensors.torch import save_model

    from prunekit.engine.train import TrainConfig, train

    torch.set_num_threads(1)
    bundle = load_data(DataConfig(name="digits", batch_size=64))
    torch.manual_seed(0)
    model = create_model("small_cnn", bundle.num_classes)
    train(model, bundle.train, None, TrainConfig(epochs=1, lr=0.05, log_every=0), progress=False)
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    save_model(model, str(path))
    return path


def test_compare_writes_table_plot_and_json(dense_path, tmp_path):
    result = run_compare(CompareRecipe.from_dict(_raw(dense_path, eval={"latency": True})), tmp_path / "c",
                         echo=lambda s: None)
    assert (tmp_path / "c" / "accuracy_vs_macs.png").stat().st_size > 1000
    report = (tmp_path / "c" / "compare.md").read_text()
    for arm in ("dense", "l2", "fpgm"):
        assert f"| {arm}" in report
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert sorted(result.ran) == [("dense", 0), ("dense", 1), ("fpgm", 0), ("fpgm", 1), ("l2", 0), ("l2", 1)]
    for arm in ("l2", "fpgm"):
        recs = data["records"][arm]
        assert [r["seed"] for r in recs] == [0, 1]
        accs = [r["acc"] for r in recs]
        assert data["summary"][arm]["acc"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert data["summary"][arm]["acc"]["std"] == pytest.approx(statistics.stdev(accs))
        assert data["summary"][arm]["acc"]["n"] == 2
        assert recs[0]["finetune_epochs"] == 1 and recs[0]["latency"]["speedup"] > 0
    # oracle: the l2 arm's MACs are those of the magnitude pruner run by hand on the dense model
    bundle = load_data(DataConfig(name="digits"))
    model = create_model("small_cnn", 10)
    from safetensors.torch import load_model
    load_model(model, str(dense_path))
    example = next(iter(bundle.val))[0][:2]
    before = count_cost(model, example)
    magnitude_prune_(model, MagnitudeConfig(macs_fraction=0.5), example)
    assert data["records"]["l2"][0]["macs"] == count_cost(model, example).macs
    assert data["records"]["l2"][0]["macs_fraction"] == pytest.approx(count_cost(model, example).macs / before.macs)
    from prunekit.compare import sha256_file
    assert data["dense"]["sha256"] == sha256_file(dense_path)


def test_killed_compare_resumes_without_redoing_finished_arms(dense_path, tmp_path, monkeypatch):
    real, calls = arms_module.run_arm, []

    def dies_on_fourth(*args, **kw):
        calls.append((args[1].name, args[2]))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed in the middle of the fourth arm x seed (l2, seed 1)
        return real(*args, **kw)

    import prunekit.compare.run as run_module
    monkeypatch.setattr(run_module, "run_arm", dies_on_fourth)
    recipe = CompareRecipe.from_dict(_raw(dense_path))
    with pytest.raises(KeyboardInterrupt):
        run_compare(recipe, tmp_path / "c", echo=lambda s: None)
    finished = {p: p.read_text() for p in (tmp_path / "c" / "arms").rglob("*.json")}
    assert len(finished) == 3 and not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.setattr(run_module, "run_arm", real)
    result = run_compare(recipe, tmp_path / "c", echo=lambda s: None)
    assert sorted(result.ran) == sorted([("l2", 1), ("fpgm", 0), ("fpgm", 1)])
    for path, text in finished.items():
        assert path.read_text() == text  # finished records were neither rerun nor rewritten
    again = run_compare(recipe, tmp_path / "c", echo=lambda s: None)
    assert again.ran == [] and again.summary["fpgm"]["acc"]["n"] == 2
    report_only = run_compare(CompareRecipe.from_dict(_raw(dense_path, seeds=[0, 1, 2])), tmp_path / "c", only=[],
                              echo=lambda s: None)
    assert report_only.ran == [] and any("not every seed" in n for n in report_only.notes)


def test_a_kill_while_a_record_is_written_leaves_the_old_record_whole(tmp_path, monkeypatch):
    from pathlib import Path

    from prunekit.compare.records import write_json

    path = tmp_path / "arms" / "l2" / "seed1.json"
    write_json(path, {"acc": 0.5})
    real = Path.write_text

    def dies_halfway(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"acc": 0.75, "note": "x" * 100})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"acc": 0.5}


def test_a_record_from_another_spec_is_refused(dense_path, tmp_path):
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"]}
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    raw["finetune"] = {**raw["finetune"], "epochs": 2}
    with pytest.raises(CheckpointError, match="different arm spec"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)


def test_a_record_made_before_a_config_field_existed_is_kept_with_a_note(dense_path, tmp_path):
    """A field added to a method's config later (at its default) does not orphan finished arms;
    a changed recorded value still does."""
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"]}
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    path = next((tmp_path / "c" / "arms").rglob("seed0.json"))
    rec = json.loads(path.read_text())
    del rec["spec"]["arm"]["config"]["round_slack"]  # as written before round_slack existed
    rec["spec_hash"] = "0" * 16
    path.write_text(json.dumps(rec))
    again = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    assert again.ran == [] and any("round_slack" in n and "recorded before" in n for n in again.notes)
    report = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", report_only=True, echo=lambda s: None)
    assert any("round_slack" in n and "recorded before" in n for n in report.notes)  # --report-only says it too
    assert "round_slack" in (tmp_path / "c" / "compare.md").read_text()
    rec["spec"]["arm"]["config"]["max_ratio"] = 0.5  # a recorded value that differs
    path.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match="different arm spec"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    rec["spec"]["arm"]["config"]["max_ratio"] = 0.9
    raw["arms"]["l2"]["method"]["latency"] = {"batch_size": 16}  # a key inside the user's own mapping
    path.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match="different arm spec"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)


def test_torch_pruning_arm_reaches_the_macs_target(dense_path, tmp_path):
    pytest.importorskip("torch_pruning")
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"tp": {"method": {"name": "torch_pruning", "macs_fraction": 0.5, "iterative_steps": 100}}}
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    rec = result.records["tp"][0]
    # the stopping rule overshoots by at most one of its 100 steps of 1% of the channels
    assert 0.40 < rec["macs_fraction"] <= 0.5
    assert rec["method_metrics"]["steps"] >= 1 and rec["params"] < 0.6 * count_cost(
        _loaded(dense_path), torch.zeros(2, 1, 8, 8)).params


def _loaded(path):
    from safetensors.torch import load_model
    model = create_model("small_cnn", 10)
    load_model(model, str(path))
    return model


def test_torch_pruning_arm_is_skipped_with_a_note_when_not_importable(dense_path, tmp_path, monkeypatch):
    def missing():
        raise ImportError("No module named 'torch_pruning'")

    monkeypatch.setattr(baselines, "import_torch_pruning", missing)
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"],
                   "tp": {"method": {"name": "torch_pruning", "macs_fraction": 0.5}}}
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    assert "tp" not in result.summary and "l2" in result.summary
    assert any("tp" in n and "not importable" in n for n in result.notes)
    assert "not importable" in (tmp_path / "c" / "compare.md").read_text()


def test_finished_records_of_an_arm_skipped_here_stay_in_the_report(dense_path, tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"],
                   "tp": {"method": {"name": "torch_pruning", "macs_fraction": 0.5, "iterative_steps": 50}}}
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)  # where it is installed
    on_disk = json.loads((tmp_path / "c" / "arms" / "tp" / "seed0.json").read_text())

    def missing():
        raise ImportError("No module named 'torch_pruning'")

    monkeypatch.setattr(baselines, "import_torch_pruning", missing)  # the machine that writes the report
    for kw in ({"report_only": True}, {}):
        result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None, **kw)
        assert result.ran == [] and result.summary["tp"]["acc"]["mean"] == on_disk["acc"]
        assert result.summary["tp"]["macs"]["mean"] == on_disk["macs"] and result.summary["tp"]["seeds"] == [0]
        assert any(n.startswith("arm tp: torch_pruning skipped") and n.endswith("its finished records are reported")
                   for n in result.notes) and not any("no records yet" in n for n in result.notes)
        assert "| tp" in (tmp_path / "c" / "compare.md").read_text()
    raw["seeds"] = [0, 1]  # a seed it has not run: skipped here, named as missing, never run
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    assert ("tp", 1) not in result.ran and result.summary["tp"]["seeds"] == [0]
    assert any("not every seed has run yet" in n and "tp (seeds [1])" in n for n in result.notes)


def test_slr_arm_keeps_its_sparsity_through_fine_tuning(dense_path, tmp_path):
    raw = _raw(dense_path, seeds=[0])
    raw["finetune"]["epochs"] = 2
    raw["arms"] = {"slr": {"method": {"name": "slr", "sparsity": 0.7, "epochs": 1}, "keep_zeros": True}}
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    rec = result.records["slr"][0]
    assert rec["method_epochs"] == 1 and rec["finetune_epochs"] == 1
    # 70% of every conv but the first stays zero after fine-tuning (the rest: stem conv, linear, BN)
    model = _loaded(dense_path)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1:]
    pruned = sum(round(0.7 * c.weight.numel()) for c in convs)
    total = sum(p.numel() for p in model.parameters())
    assert rec["nonzero_fraction"] == pytest.approx((total - pruned) / total, abs=2e-3)
    assert rec["macs_fraction"] == 1.0  # zeros inside dense kernels remove no MACs
    assert any("slr keeps 100.0% of the macs" in n for n in result.notes)


def test_mask_zeros_holds_zeros_while_training_and_only_then():
    from prunekit.surgery.masks import remove_masks

    def trained(keep: bool):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
        with torch.no_grad():
            net[0].weight[:, :, 0, :] = 0.0  # 24 of 72 weights
        if keep:
            assert arms_module._mask_zeros_(net) == 1  # only the conv has zeros
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(4, 2, 4, 4)).square().mean().backward()
            opt.step()
        remove_masks(net, bake=True)
        return int((net[0].weight == 0).sum())

    assert trained(keep=True) == 24
    assert trained(keep=False) == 0


def test_budget_and_method_checks():
    raw = {"model": {"name": "small_cnn"}, "data": {"name": "digits"}, "dense": {"train": {"epochs": 1}},
           "finetune": {"epochs": 3}, "arms": {"g": {"method": {"name": "gator", "target": 0.5, "epochs": 2,
                                                                "finetune_epochs": 1}}}}
    r = CompareRecipe.from_dict(raw)
    assert r.arms["g"].trained_epochs == 3 and r.arms["g"].budget_left(3) == 0
    raw["finetune"]["epochs"] = 2
    with pytest.raises(ConfigError, match="more than the shared budget"):
        CompareRecipe.from_dict(raw)
    raw["finetune"]["epochs"] = 3
    raw["arms"]["g"]["method"]["name"] = "nope"
    with pytest.raises(ConfigError, match="unknown method 'nope'.*torch_pruning"):
        CompareRecipe.from_dict(raw)
    raw["arms"] = {"m": {"method": {"name": "magnitude", "macs_fraction": 0.5}, "finetune": "yes"}}
    with pytest.raises(ConfigError, match="finetune='yes' must be true or false"):
        CompareRecipe.from_dict(raw)
    del raw["dense"]
    raw["arms"]["m"]["finetune"] = True
    with pytest.raises(ConfigError, match="dense needs weights"):
        CompareRecipe.from_dict(raw)


def test_a_warmup_longer_than_an_arms_fine_tuning_is_refused_when_the_recipe_is_read():
    # an SLR arm training 2 of the 3 budget epochs is fine-tuned for 1: a 2-epoch warm-up failed
    # only then, after the method had trained
    raw = {"model": {"name": "small_cnn"}, "data": {"name": "digits"}, "dense": {"train": {"epochs": 1}},
           "finetune": {"epochs": 3, "warmup_epochs": 2, "schedule": "constant"},
           "arms": {"l2": {"method": {"name": "magnitude", "macs_fraction": 0.5}},
                    "slr": {"method": {"name": "slr", "sparsity": 0.5, "epochs": 1, "retrain_epochs": 1}}}}
    with pytest.raises(ConfigError, match="arm 'slr' is fine-tuned for 1 epoch.*warmup_epochs=2"):
        CompareRecipe.from_dict(raw)
    raw["finetune"]["warmup_epochs"] = 1
    assert CompareRecipe.from_dict(raw).arms["slr"].budget_left(3) == 1
    raw["method_train"] = {"warmup_epochs": 1, "schedule": "cosine"}  # the SLR phases train 1 epoch each
    with pytest.raises(ConfigError, match="arm 'slr'.*epochs=1 phase.*warmup_epochs=1 leaves no epoch"):
        CompareRecipe.from_dict(raw)


def test_pareto_front_matches_brute_force():
    rng = __import__("random").Random(0)
    for _ in range(50):
        pts = {f"p{i}": (float(rng.randint(1, 6)), rng.randint(0, 5) / 5) for i in range(rng.randint(1, 7))}
        want = [n for n, (m, a) in pts.items()
                if not any(m2 <= m and a2 >= a and (m2, a2) != (m, a) for m2, a2 in pts.values())]
        assert sorted(pareto_front(pts)) == sorted(want)


def test_cli_compare_writes_the_report(dense_path, tmp_path):
    recipe = tmp_path / "cmp.yaml"
    import yaml
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"]}
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["compare", str(recipe), "finetune.epochs=1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "compare.md").is_file() and (out / "accuracy_vs_macs.png").is_file()
    bad = CliRunner().invoke(cli, ["compare", str(recipe), "arms.l2.method.name=nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown method 'nope'" in bad.output


def test_damaged_dense_weights_and_records_are_one_checkpoint_error(dense_path, tmp_path):
    raw = _raw(dense_path, seeds=[0])
    raw["arms"] = {"l2": raw["arms"]["l2"]}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(dense_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read dense weights .*truncated.safetensors"):
        run_compare(CompareRecipe.from_dict({**raw, "dense": {"weights": str(truncated)}}), tmp_path / "a",
                    echo=lambda s: None)
    assert not (tmp_path / "a").exists()  # a new output folder is not left behind holding only recipe.yaml
    wrong = tmp_path / "wrong.safetensors"  # a dense model of another width: the message names a tensor
    from safetensors.torch import save_model
    save_model(create_model("small_cnn", 10, width=8), str(wrong))
    with pytest.raises(CheckpointError, match="do not fit model 'small_cnn': size mismatch for conv1.weight"):
        run_compare(CompareRecipe.from_dict({**raw, "dense": {"weights": str(wrong)}}), tmp_path / "b",
                    echo=lambda s: None)
    run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    record = tmp_path / "c" / "arms" / "l2" / "seed0.json"
    record.write_text(record.read_text()[:40])  # cut short by hand or by a full disk
    with pytest.raises(CheckpointError, match="seed0.json is not valid JSON"):
        run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)


def test_eval_max_batches_scores_a_seeded_random_subset(dense_path, tmp_path, monkeypatch):
    """The first k batches of a class-sorted test split hold one or two classes; compare draws
    a random subset with the data seed instead."""
    from prunekit.compare import run as run_module

    seen, subsets = [], []
    real = run_module.random_batches

    def spy(loader, n, seed):
        sub = real(loader, n, seed)
        seen.append((n, seed, sub.num_samples))
        subsets.append(sub)
        return sub

    monkeypatch.setattr(run_module, "random_batches", spy)
    raw = _raw(dense_path, eval={"latency": False, "max_batches": 2}, seeds=[0],
               data={"name": "digits", "batch_size": 64, "eval_batch_size": 32, "seed": 3})
    raw["arms"] = {"dense": {"method": None}}
    result = run_compare(CompareRecipe.from_dict(raw), tmp_path / "c", echo=lambda s: None)
    assert seen == [(2, 3, 64), (2, 3, 64)]  # val and test, 2 evaluation batches of 32 each, the data seed
    # the recorded accuracy is the dense model's on exactly that test subset, counted here
    from safetensors.torch import load_model
    model = create_model("small_cnn", 10).eval()
    load_model(model, str(dense_path))
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in subsets[1])
    assert result.records["dense"][0]["acc"] == pytest.approx(right / 64)


def test_records_keep_the_scalar_entries_of_method_reports():
    from prunekit.compare.arms import _scalars

    metrics = {"steps": 2, "history": [1, 2], "latency": {"target": 0.69, "measured_fraction": 0.68,
                                                            "attempts": [{"goal": 0.69}], "estimate": {"layers": 3}},
               "per_layer": {f"l{i}": i for i in range(40)}}
    assert _scalars(metrics) == {"steps": 2, "latency": {"target": 0.69, "measured_fraction": 0.68}}


def test_an_arm_pruned_channels_last_is_timed_channels_last_with_its_dense_model(dense_path, monkeypatch):
    """The arm's layout is the timing's for both models (the speed-up is the pruning's), and the
    record says which layout; a bench section that states channels_last keeps it."""
    recipe = CompareRecipe.from_dict(_raw(dense_path))
    dense = create_model("small_cnn", 10)
    arm = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    seen, real = [], arms_module.compare_latency
    monkeypatch.setattr(arms_module, "compare_latency",
                        lambda models, shape, cfg: seen.append(cfg.channels_last) or real(models, shape, cfg))
    record = arms_module.measure_against_dense("cl", arm, dense, (1, 8, 8), recipe)
    assert record["memory_format"] == "channels_last" and seen == [True]
    stated = CompareRecipe.from_dict(_raw(dense_path, bench={"repeats": 3, "warmup": 1, "channels_last": False}))
    record = arms_module.measure_against_dense("cl", arm, dense, (1, 8, 8), stated)
    assert record["memory_format"] == "contiguous" and seen == [True, False]
