"""`prunekit run` end to end with the embedded default recipe, then the commands that reuse its files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_model

from prunekit.cli.main import cli
from prunekit.cli.recipe import load_recipe
from prunekit.cost.macs import count_cost
from prunekit.data import load_data
from prunekit.engine import evaluate
from prunekit.models import create_model
from prunekit.surgery.persist import load_pruned

ACCURACY_FLOOR = 0.90  # digits test accuracy after fine-tuning; the default run reaches ~0.99


def test_default_run_writes_every_artefact(default_run):
    out, result = default_run
    for name in ("recipe.yaml", "dense.safetensors", "pruned.safetensors", "plan.json", "metrics.jsonl",
                 "result.json", "report.md", "report.html", "accuracy_vs_macs.png", "layer_widths.png"):
        assert (out / name).is_file(), name
    assert "report:" in result.output
    report = (out / "report.md").read_text()
    assert "Method: magnitude" in report and "Per-layer" in report


def test_default_run_prunes_macs_and_clears_the_accuracy_floor(default_run):
    out, _ = default_run
    res = json.loads((out / "result.json").read_text())
    assert res["cost_after"]["macs"] <= 0.5 * res["cost_before"]["macs"]  # method.macs_fraction: 0.5
    assert res["cost_after"]["params"] < res["cost_before"]["params"]
    assert res["accuracy_before"] > ACCURACY_FLOOR
    assert res["accuracy_after"] > ACCURACY_FLOOR
    assert res["split"] == "test"
    assert [h["step"] for h in res["history"]] == ["dense", "pruned", "fine-tuned"]
    assert res["cost_before"]["latency"]["median_ms"] > 0 and res["cost_after"]["latency"]["median_ms"] > 0
    assert any(row["channels_after"] < row["channels_before"] for row in res["layers"])


def test_saved_pruned_model_reloads_with_the_saved_accuracy(default_run):
    out, _ = default_run
    res = json.loads((out / "result.json").read_text())
    recipe, _ = load_recipe(str(out))
    bundle = load_data(recipe.data)
    fresh = create_model(recipe.model.name, recipe.model.num_classes, **recipe.model.kwargs)
    pruned = load_pruned(fresh, out / "pruned.safetensors")
    assert evaluate(pruned, bundle.test)["acc"] == res["accuracy_after"]
    assert count_cost(pruned, torch.zeros(1, *bundle.input_shape)).macs == res["cost_after"]["macs"]
    dense = create_model(recipe.model.name, recipe.model.num_classes, **recipe.model.kwargs)
    load_model(dense, str(out / "dense.safetensors"))
    assert evaluate(dense, bundle.test)["acc"] == res["accuracy_before"]


def test_a_run_plan_is_refused_on_another_architecture(default_run):
    """The CLI's plan names the architectures it starts from and ends at, as prune_'s does: replayed
    on a model of other num_classes it is refused, the model untouched."""
    from prunekit.core.errors import PrunekitError
    from prunekit.surgery.plan import apply_plan_, load_plan

    out, _ = default_run
    plan = load_plan(out / "plan.json")
    assert set(plan.fingerprint) == {"dense", "pruned"}
    recipe, _ = load_recipe(str(out))
    other = create_model(recipe.model.name, recipe.model.num_classes + 1, **recipe.model.kwargs)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PrunekitError, match="not the model the plan was made on"):
        apply_plan_(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_resolved_recipe_reloads_to_the_same_recipe(default_run, runner):
    out, _ = default_run
    result = runner.invoke(cli, ["run", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    saved = (out / "recipe.yaml").read_text().split("\n", 1)[1]  # first line is a comment
    assert result.stdout == saved


def test_dry_run_prints_the_recipe_the_run_would_write(default_run, runner, tmp_path):
    """The weights taken from a run directory are part of the resolved recipe: printed by --dry-run
    as in the recipe.yaml written, so that the printed recipe runs the same."""
    out, _ = default_run
    args = ["prune", str(out), "eval.latency=false"]
    dry = runner.invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, (dry.output, dry.exception)
    target = tmp_path / "pruned"
    result = runner.invoke(cli, [*args, "--out", str(target), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert dry.stdout == (target / "recipe.yaml").read_text().split("\n", 1)[1]
    assert load_recipe(str(target))[0].init == str((out / "dense.safetensors").resolve())


def test_a_run_directory_whose_path_holds_an_equals_sign_is_the_recipe(default_run, runner, tmp_path):
    out, _ = default_run
    run = tmp_path / "ratio=0.5" / "sweep lr=1e-3 ü"
    shutil.copytree(out, run)
    result = runner.invoke(cli, ["eval", str(run), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert data["weights"] == str(run / "pruned.safetensors")
    assert data["accuracy"] == json.loads((run / "result.json").read_text())["accuracy_after"]


def test_prune_from_saved_weights_prunes_once(default_run, runner, tmp_path, monkeypatch):
    """The dry run of a one-shot method before the run starts pruned a copy of the very model the
    prune stage then pruned again (twice the timing of a latency target); its result is taken."""
    from prunekit.cli import pipeline
    from prunekit.surgery.persist import load_pruned

    out, _ = default_run
    calls, real = [], pipeline.run_method
    monkeypatch.setattr(pipeline, "run_method", lambda *a, **k: calls.append(1) or real(*a, **k))
    target = tmp_path / "once"
    result = runner.invoke(cli, ["prune", "--weights", str(out / "dense.safetensors"), "--out", str(target),
                                 "method.macs_fraction=0.7", "eval.latency=false", "eval.layer_latency=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(calls) == 1
    res = json.loads((target / "result.json").read_text())
    assert res["cost_after"]["macs"] <= 0.7 * res["cost_before"]["macs"] and res["stage_seconds"]["prune"] > 0
    reloaded = load_pruned(create_model("small_cnn", num_classes=10), target / "pruned.safetensors")
    assert count_cost(reloaded, torch.zeros(1, 1, 8, 8)).macs == res["cost_after"]["macs"]


def test_prune_from_a_saved_dense_checkpoint(default_run, runner, tmp_path):
    out, _ = default_run
    target = tmp_path / "pruned"
    result = runner.invoke(cli, ["prune", "--weights", str(out / "dense.safetensors"), "--out", str(target),
                                 "method.macs_fraction=0.7", "eval.layer_latency=false", "bench.repeats=3"])
    assert result.exit_code == 0, (result.output, result.exception)
    res = json.loads((target / "result.json").read_text())
    assert res["cost_after"]["macs"] <= 0.7 * res["cost_before"]["macs"]
    dense_res = json.loads((out / "result.json").read_text())
    assert res["accuracy_before"] == dense_res["accuracy_before"]  # the same dense weights
    assert (target / "pruned.safetensors").is_file() and not (target / "dense.safetensors").exists()

    tuned = tmp_path / "tuned"
    result = runner.invoke(cli, ["finetune", str(target), "--out", str(tuned), "finetune.epochs=1",
                                 "eval.latency=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    res_tuned = json.loads((tuned / "result.json").read_text())
    assert res_tuned["cost_after"]["macs"] == res["cost_after"]["macs"]
    assert res_tuned["accuracy_after"] > res["accuracy_after"]

    result = runner.invoke(cli, ["eval", str(tuned), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == res_tuned["accuracy_after"]


def test_bench_prints_params_and_macs_of_a_named_model(runner):
    result = runner.invoke(cli, ["bench", "--model", "resnet20", "--no-latency"])
    assert result.exit_code == 0, result.output
    cost = count_cost(create_model("resnet20"), torch.zeros(1, 3, 32, 32))
    assert f"({cost.params:,})" in result.stdout and f"({cost.macs:,})" in result.stdout


def test_bench_names_what_was_given_and_how_it_timed(runner):
    result = runner.invoke(cli, ["bench", "--model", "nosuch"])
    assert result.exit_code == 2 and "with --model nosuch: model: unknown model 'nosuch'" in result.output
    assert "model.kwargs={}" not in result.output  # the overrides --model stands for stay inside
    result = runner.invoke(cli, ["bench", "--model", "resnet20", "--input-shape", "1,32,32", "--no-latency"])
    assert result.exit_code == 2 and "--input-shape 1,32,32:" in result.output
    assert "--input-shape 3,32,32" in result.output and "torch.zeros" not in result.output
    result = runner.invoke(cli, ["bench", "--model", "resnet20", "bench.repeats=2", "bench.warmup=1"])
    assert result.exit_code == 0, result.output
    assert "batch 1, contiguous, 1 thread)" in result.stdout


def test_bench_of_a_named_model_keeps_its_model_overrides(runner):
    # Hand count of ResNet-20 with zero-pad shortcuts: stem 432 + 32; stage 1: 3 * (2 * 2304 + 64);
    # stage 2: 4608 + 9216 + 128 + 2 * (2 * 9216 + 128); stage 3: 18432 + 36864 + 256
    # + 2 * (2 * 36864 + 256); no shortcut parameters; fc 64 * 100 + 100 for 100 classes.
    expected = 464 + 14_016 + 13_952 + 37_120 + 55_552 + 147_968 + 6_500
    result = runner.invoke(cli, ["bench", "--model", "resnet20", "model.kwargs.shortcut=zeropad",
                                 "model.num_classes=100", "--no-latency", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"] == expected == 275_572


def test_bench_of_a_saved_pruned_model(default_run, runner):
    out, _ = default_run
    res = json.loads((out / "result.json").read_text())
    result = runner.invoke(cli, ["bench", str(out), "bench.repeats=3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["macs"] == res["cost_after"]["macs"] and data["params"] == res["cost_after"]["params"]
    assert data["latency"]["n"] == 3 and data["latency"]["median_ms"] > 0


def test_report_rerenders_a_run_directory(default_run, runner, tmp_path):
    out, _ = default_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.md").unlink()
    result = runner.invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()


@pytest.mark.parametrize("topic, names", [
    ("models", ["small_cnn", "resnet56", "vgg16_bn", "tv:<name>"]),
    ("methods", ["magnitude", "slr", "admm"]),
    ("criteria", ["l1", "l2", "taylor", "fpgm", "bn_scale"]),
    ("datasets", ["digits", "cifar10", "imagefolder"]),
])
def test_info_lists_what_is_registered(runner, topic, names):
    result = runner.invoke(cli, ["info", topic])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert set(names) <= listed


def test_info_without_topic_lists_every_section(runner):
    result = runner.invoke(cli, ["info"])
    assert result.exit_code == 0
    for head in ("models:", "datasets:", "methods:", "criteria:"):
        assert head in result.stdout.splitlines()


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, runner):
    """An interrupted run exits 130 and names the command that continues it."""
    import prunekit.cli.commands as commands

    def interrupted(job, state, resume=False):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "run_stages", interrupted)
    out = tmp_path / "run"
    result = runner.invoke(cli, ["run", "--out", str(out), "-q", "train.epochs=1"])
    assert result.exit_code == 130
    assert f"interrupted; continue with: prunekit resume {out}" in result.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_says_how_to_continue_like_ctrl_c(tmp_path):
    """A stopped job (timeout, a batch scheduler) ended the process without a word; now it says
    how to continue, as Ctrl-C does, and exits 143. Its own process: the signal must not reach
    the test runner."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, threading, sys
        import prunekit.cli.commands as commands
        from prunekit.cli.main import main

        def stopped(job, state, resume=False):
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(30)  # the signal arrives here
        commands.run_stages = stopped
        main(["run", "--out", {str(out)!r}, "-q", "train.epochs=1"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert f"interrupted; continue with: prunekit resume {out}" in done.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_a_second_sigterm_is_not_caught_again(tmp_path):
    """The first SIGTERM is turned into an interruption; from then on the default action is back,
    so a second one (a scheduler that gives up waiting) ends the process even during clean-up."""
    script = textwrap.dedent(f"""
        import os, signal, threading
        import prunekit.cli.commands as commands
        from prunekit.cli.main import main

        def stopped(job, state, resume=False):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                threading.Event().wait(30)
            except KeyboardInterrupt:
                print("default again:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # during clean-up
                threading.Event().wait(30)
        commands.run_stages = stopped
        main(["run", "--out", {str(tmp_path / "run")!r}, "-q", "train.epochs=1"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "default again: True" in done.stdout
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]


def test_a_channels_last_prune_is_timed_saved_reported_and_benched_channels_last(default_run, runner, tmp_path):
    """The pruner's memory format reaches the run's latency, report, saved file and `bench`."""
    from prunekit.core.layout import is_channels_last

    out, _ = default_run
    target = tmp_path / "cl"
    result = runner.invoke(cli, ["prune", "--weights", str(out / "dense.safetensors"), "--out", str(target),
                                 "method.macs_fraction=0.7", "method.memory_format=channels_last",
                                 "eval.layer_latency=false", "bench.repeats=3"])
    assert result.exit_code == 0, (result.output, result.exception)
    res = json.loads((target / "result.json").read_text())
    assert res["prune_metrics"]["memory_format"]["choice"] == "channels_last"
    assert res["cost_after"]["latency"]["settings"]["channels_last"] is True
    assert res["cost_before"]["latency"]["settings"]["channels_last"] is True  # both alike: the ratio is pruning's
    report = (target / "report.md").read_text()
    assert "Memory format of the pruned model: channels-last" in report and "| memory format |" in report
    recipe, _ = load_recipe(str(target))
    model = load_pruned(create_model(recipe.model.name, recipe.model.num_classes, **recipe.model.kwargs),
                        target / "pruned.safetensors")
    assert is_channels_last(model)
    bench = runner.invoke(cli, ["bench", str(target), "bench.repeats=3", "--json"])
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["latency"]["settings"]["channels_last"] is True
    stated = runner.invoke(cli, ["bench", str(target), "bench.repeats=3", "bench.channels_last=false", "--json"])
    assert stated.exit_code == 0, stated.output
    assert json.loads(stated.stdout)["latency"]["settings"]["channels_last"] is False  # a stated layout is kept


def test_prunekits_own_warnings_are_one_line_and_others_keep_pythons_form(tmp_path):
    """Through `main` (the console entry point): a prunekit warning reads 'warning: ...' without
    the source line behind it; a warning from elsewhere is printed as Python prints it."""
    script = textwrap.dedent("""
        import warnings
        import prunekit.cost.latency as lat
        from prunekit.cli.main import main

        def one_core():  # a warning of another library, raised while the command runs
            warnings.warn("from elsewhere", UserWarning)
            return 1
        lat.usable_cores = one_core
        before = warnings.showwarning
        try:
            main(["bench", "--model", "resnet20", "bench.threads=2", "bench.repeats=2", "bench.warmup=1"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        assert warnings.showwarning is before  # given back on the way out
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\nwarning: timed on 2 torch threads with 1 CPU core(s)" in "\n" + done.stderr
    assert "UserWarning: from elsewhere" in done.stderr and "warning: from elsewhere" not in done.stderr
    assert "PrunekitWarning" not in done.stderr and "latency.py" not in done.stderr
