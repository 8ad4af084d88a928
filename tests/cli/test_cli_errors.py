"""A bad recipe or flag: exit status 2, one line naming the problem, no traceback, no file touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.cli.main import cli
from prunekit.core.errors import ConfigError


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder holding a recipe; commands run inside it (runs/ would appear here)."""
    (tmp_path / "mine.yaml").write_text("model: {name: small_cnn}\ndata: {name: digits}\n"
                                        "method: {name: magnitude, channel_ratio: 0.5}\n")
    (tmp_path / "notes.txt").write_text("keep me\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_ARGUMENTS = [
    (["bogus=1"], ["unknown recipe key 'bogus'", "allowed:", "train"]),
    (["train.lrr=0.1"], ["train", "unknown key(s) lrr (did you mean lr?)", "allowed:", "lr"]),
    (["model.name=resnet57"], ["unknown model 'resnet57'", "resnet56", "tv:<name>", "timm:<name>"]),
    (["method.name=nope"], ["unknown method 'nope'", "magnitude", "admm"]),
    (["--method", "nope"], ["unknown method 'nope'"]),
    (["train.epochs"], ["'train.epochs' is not key=value", "train.epochs=3"]),
    (["train..epochs=3"], ["invalid key"]),
    (["train.epochs=[1"], ["invalid YAML"]),
    (["train.lr=-1"], ["train", "lr=-1"]),
    (["method.criterion=l7"], ["criterion='l7'", "l1"]),
    (["method.macs_fraction=1.5"], ["macs_fraction=1.5", "out of range"]),
    (["method.macs_fraction=0.001"], ["impossible target", "max_ratio"]),
    (["method.channel_ratio=0.5"], ["exactly one target"]),
    (["model.num_classes=3"], ["num_classes=3", "10 classes"]),
    (["model.name=resnet20"], ["cannot take digits images"]),
    (["data.name=mnist"], ["unknown dataset 'mnist'", "digits"]),
    (["missing.yaml"], ["'missing.yaml' does not exist"]),
    (["mine.yml"], ["'mine.yml' does not exist; did you mean mine.yaml?"]),  # the recipe beside it
    (["mien.yaml"], ["'mien.yaml' does not exist; did you mean mine.yaml?"]),
    (["mine.yaml", "other.yaml"], ["unexpected argument 'other.yaml'"]),
    (["eval.split=train"], ["split='train'", "test"]),
    (["train.epochs=" + "[" * 5000 + "]" * 5000], ["nested too deeply"]),
    (["name=' '"], ["without path separators, control characters", "leading and trailing spaces"]),
    (['name="a\\tb"'], ["control characters (NUL among them)"]),
    (["method.criterion=taylor", "calibration_batches=0"], ["'taylor' needs data", "set calibration_batches"]),
    # a method that trains is not dry-run, but a typo in ignore must not wait for the dense training
    (["--method", "gator", "method.target=0.5", "method.ignore=[nope]"], ["ignore names modules that do not exist"]),
    # nor a layer name of SLR's (it trains, so it is not dry-run either)
    (["--method", "slr", "method.sparsity=0.5", "method.layers=[conv9]"], ["conv9"]),
    (["--method", "slr", "method.sparsity={conv9: 0.5}"], ["conv9"]),
    # a keyword the builder takes, with a value it cannot build from (raw TypeError/RuntimeError before)
    (["model.kwargs={width: x}"], ["model 'small_cnn' cannot be built with width='x'"]),
    (["model.kwargs={width: -1}"], ["model 'small_cnn' cannot be built with width=-1"]),
    (["model.kwargs={width: 1.5}"], ["model 'small_cnn' cannot be built with width=1.5"]),
    # a warm-up as long as a phase of the method failed only when that phase began, after training
    (["--method", "slr", "method.sparsity=0.5", "method.epochs=3", "method.retrain_epochs=1",
      "method_train={warmup_epochs: 2}"], ["retrain_epochs=1", "method_train", "warmup_epochs=2"]),
    (["--method", "gator", "method.target=0.5", "method.epochs=2", "train.warmup_epochs=2"],
     ["epochs=2", "train", "warmup_epochs=2 leaves no epoch"]),
    (["--method", "gator", "method.target=0.1", "method.ignore=[conv3]"],  # before the dense model trains
     ["impossible target", "keeps 0.330 of the macs"]),
]


@pytest.mark.parametrize("args, needles", BAD_ARGUMENTS, ids=[" ".join(a)[:40] for a, _ in BAD_ARGUMENTS])
def test_bad_recipe_arguments_fail_cleanly_and_write_nothing(runner, workdir, args, needles):
    before = _snapshot(workdir)
    result = runner.invoke(cli, ["run", *args])
    _assert_one_line_error(result, *needles)
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("text, needles", [
    ("model: {name: small_cnn}\ndata: {name: digits}\nfinetuning: {epochs: 2}\n",
     ["mine.yaml", "unknown recipe key(s) finetuning", "finetune"]),
    ("model: {name: small_cnn}\ndata: [digits\n", ["mine.yaml", "invalid YAML", "line"]),
    ("- just\n- a list\n", ["mine.yaml", "mapping"]),
    ("model: {name: small_cnn}\n", ["needs a 'data' section"]),
    # nine levels of aliases: 9**9 values once expanded (was a 25 s walk and a 254 MB message)
    ("model: {name: small_cnn}\ndata: {name: digits}\nmethod:\n  name: magnitude\n  ignore:\n    - &a [x,x,x,x,x,x,x,x,x]\n"
     + "".join(f"    - &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")),
     ["mine.yaml", "more than 100,000 values", "aliases"]),
    ("model: {name: small_cnn}\ndata: {name: digits}\nmethod: {name: admm, optimization: slr}\n",
     ["means slr with optimization='admm'"]),
])
def test_bad_recipe_files_fail_cleanly(runner, workdir, text, needles):
    (workdir / "mine.yaml").write_text(text)
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["run", "mine.yaml"]), *needles)
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("command", ["run", "eval"])
def test_a_binary_file_given_as_the_recipe_says_to_pass_it_as_weights(runner, workdir, command):
    # A weights file in the recipe's place is an easy slip: `prunekit eval pruned.safetensors`.
    (workdir / "pruned.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"\xe3\x81\x00\xff}" * 8)
    before = _snapshot(workdir)
    result = runner.invoke(cli, [command, "pruned.safetensors"])
    _assert_one_line_error(result, "pruned.safetensors", "not a YAML recipe", "--weights")
    assert _snapshot(workdir) == before


def test_weights_that_do_not_fit_name_the_tensor_that_differs(runner, workdir):
    # A plain safetensors state dict (no prunekit metadata) lacking one tensor.
    from safetensors.torch import save_file

    from prunekit.models import create_model

    state = create_model("small_cnn", num_classes=10).state_dict()
    save_file({k: v.clone() for k, v in state.items() if k != "fc.weight"}, str(workdir / "partial.safetensors"))
    before = _snapshot(workdir)
    result = runner.invoke(cli, ["eval", "mine.yaml", "--weights", "partial.safetensors"])
    _assert_one_line_error(result, "do not fit this model", "Missing key(s)", "fc.weight")
    assert _snapshot(workdir) == before


def test_an_existing_output_directory_is_never_overwritten(runner, workdir):
    before = _snapshot(workdir)
    result = runner.invoke(cli, ["run", "mine.yaml", "--out", str(workdir)])
    _assert_one_line_error(result, "already exists and is not an empty directory", "choose a new path")
    assert _snapshot(workdir) == before


def test_prune_without_weights_says_where_to_get_them(runner, workdir):
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["prune", "mine.yaml"]), "needs weights", "--weights")
    assert _snapshot(workdir) == before  # no run directory was made


@pytest.mark.parametrize("command", ["eval", "prune"])
def test_missing_weights_file(runner, workdir, command):
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, [command, "mine.yaml", "--weights", "nope.safetensors"]),
                           "nope.safetensors does not exist", "dense.safetensors")
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("given, needles", [
    ("runs", ["weights runs is a directory", "dense.safetensors"]),             # a run directory as --weights
    ("plan.json", ["plan.json is neither a .safetensors weights file", "last.pt"]),  # not UnpicklingError text
    ("junk.safetensors", ["cannot read junk.safetensors", "not an intact .safetensors file",
                          "dense.safetensors or pruned.safetensors"]),  # random bytes: the header is garbage
])
def test_weights_that_are_a_directory_or_another_file_say_what_to_give(runner, workdir, given, needles):
    (workdir / "runs").mkdir()
    (workdir / "plan.json").write_text('{"format": "prunekit.plan"}')
    (workdir / "junk.safetensors").write_bytes(bytes(range(256)) * 4)
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["eval", "mine.yaml", f"init={given}"]), *needles)
    assert _snapshot(workdir) == before


def test_debug_flag_lets_the_exception_through(runner, workdir):
    result = runner.invoke(cli, ["--debug", "run", "model.name=resnet57"])
    assert isinstance(result.exception, ConfigError)


def test_dry_run_validates_and_writes_nothing(runner, workdir):
    before = _snapshot(workdir)
    result = runner.invoke(cli, ["run", "mine.yaml", "--method", "admm", "method.sparsity=0.5", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "name: slr" in result.stdout and "optimization: admm" in result.stdout
    assert _snapshot(workdir) == before


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli.main", "run", "model.name=resnet57"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "unknown model 'resnet57'" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")


@NO_CUDA
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("args, needles", [
    (["bench.device=cuda"], ["bench:", "device='cuda'", "eval.latency=false"]),
    (["bench.device=auto", "bench.cuda_graph=true"], ["bench:", "cuda_graph", "eval.latency=false"]),
    (["--method", "gator", "method.target=0.5", "method.cost=latency", "method.latency.device=cuda"],
     ["latency", "device='cuda'"]),
])
def test_latency_settings_this_machine_cannot_time_fail_before_training(runner, workdir, dry_run, args, needles):
    # they failed in the last step, after every training stage had run (hours on a real recipe)
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["run", "mine.yaml", "train={epochs: 1}", *args, *dry_run]), *needles)
    assert _snapshot(workdir) == before


@NO_CUDA
def test_resuming_a_run_on_a_machine_that_cannot_time_its_bench_section_fails_before_training(runner, workdir):
    from prunekit.cli.overrides import dump_yaml
    from prunekit.cli.recipe import load_recipe
    from prunekit.cli.runstate import new_state, write_state

    run = workdir / "run"
    run.mkdir()
    recipe, _ = load_recipe("mine.yaml", ["train={epochs: 1}", "bench.device=cuda"])
    (run / "recipe.yaml").write_text(dump_yaml(recipe.to_dict()))
    write_state(run, new_state("run", ["train", "prune"], None))
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["resume", str(run)]), "bench:", "device='cuda'")
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("out", ["full", "notes.txt/run"])
def test_dry_run_checks_the_output_directory_the_run_would_use(runner, workdir, out):
    (workdir / "full").mkdir()
    (workdir / "full" / "result.json").write_text("{}")
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["run", "mine.yaml", "--out", out, "--dry-run"]), out)
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("args", [["--out", "notes.txt/run"], ["out=notes.txt"], ["out=notes.txt/runs"]])
def test_an_output_path_under_a_file_says_which_part_is_a_file(runner, workdir, args):
    # was "File exists (notes.txt)", and only once the data, the model and the pruning were checked
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["run", "mine.yaml", *args]), "notes.txt is a file, not a folder")
    assert _snapshot(workdir) == before


def test_a_home_folder_written_with_a_tilde_is_the_home_folder(runner, workdir, monkeypatch):
    # `out: ~/runs` made a folder named "~" in the working directory
    home = workdir / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    result = runner.invoke(cli, ["run", "mine.yaml", "out=~/runs", "eval.latency=false", "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert not (workdir / "~").exists()
    (run,) = (home / "runs").iterdir()
    again = runner.invoke(cli, ["eval", "mine.yaml", f"init=~/runs/{run.name}/pruned.safetensors", "--json"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert str(home) in again.stdout
    out = runner.invoke(cli, ["run", "mine.yaml", "--out=~/mine", "eval.latency=false", "-q"])
    assert out.exit_code == 0, (out.output, out.exception)
    assert (home / "mine" / "pruned.safetensors").is_file() and not (workdir / "~").exists()


def _signed_state_file(path: Path, change=None) -> None:
    """A checksummed prunekit state file of small_cnn (digits: 10 classes), `change` applied to its tensors."""
    from prunekit.models import create_model
    from prunekit.surgery.tensor_file import read_tensor_file, save_state_file, write_tensor_file

    save_state_file(create_model("small_cnn", num_classes=10), path)
    if change is not None:
        meta, tensors = read_tensor_file(path)
        change(tensors)
        write_tensor_file(path, tensors, meta)  # signed again: only the numbers are wrong


def _nan_weight(tensors) -> None:
    tensors["conv1.weight"][0, 0, 0, 0] = float("nan")


def _integer_weight(tensors) -> None:
    tensors["conv1.weight"] = tensors["conv1.weight"].round().long()


@pytest.mark.parametrize("command", ["eval", "bench"])
@pytest.mark.parametrize("change, needles", [
    (_nan_weight, ["parameter conv1.weight holds NaN or inf", "converged"]),
    (_integer_weight, ["another kind of dtype", "conv1.weight"]),
], ids=["nan", "integer"])
def test_weights_with_nan_or_of_another_dtype_are_refused_when_loaded(runner, workdir, command, change, needles):
    _signed_state_file(workdir / "w.safetensors", change)
    before = _snapshot(workdir)
    args = [command, "mine.yaml", "--weights", "w.safetensors"] + (["--no-latency"] if command == "bench" else [])
    _assert_one_line_error(runner.invoke(cli, args), *needles)
    assert _snapshot(workdir) == before


def test_a_safetensors_file_under_another_name_is_read_as_one(runner, workdir):
    _signed_state_file(workdir / "weights.st")
    result = runner.invoke(cli, ["bench", "mine.yaml", "--weights", "weights.st", "--no-latency"])
    assert result.exit_code == 0, (result.output, result.exception)


class _RunsCode:
    """Unpickled, this would create a file: the test checks that it never is."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_given_as_weights_is_never_loaded_nor_called_safe_to_load(runner, workdir):
    import torch

    marker = workdir / "ran"
    torch.save({"model": _RunsCode(marker)}, workdir / "evil.pt")
    before = _snapshot(workdir)
    result = runner.invoke(cli, ["eval", "mine.yaml", "--weights", "evil.pt"])
    _assert_one_line_error(result, "evil.pt holds Python objects", "never loads", "as --weights")
    assert "weights_only" not in result.stderr and "ckpt_dir" not in result.stderr
    assert not marker.exists() and _snapshot(workdir) == before


HUGE = [
    (["run", "mine.yaml", "bench.batch_size=100000000", "--dry-run"], ["bench.batch_size=100000000", "GiB",
                                                                        "eval.latency=false"]),
    (["bench", "mine.yaml", "--no-latency", "--input-shape", "1,99999999999999999999,8"], ["--input-shape", "GiB"]),
    (["bench", "mine.yaml", "--input-shape", "3,100000,100000"], ["--input-shape 3,100000,100000", "GiB"]),
    (["bench", "mine.yaml", "--no-latency", "--input-shape", ",".join(["1"] * 65)], ["66 dimensions"]),
    (["bench", "mine.yaml", "bench.batch_size=100000000"], ["timing at batch_size=100000000", "GiB"]),
]


@pytest.mark.parametrize("args, needles", HUGE, ids=["run-batch", "overflow", "shape", "dims", "bench-batch"])
def test_inputs_larger_than_the_machine_are_one_message_before_any_allocation(runner, workdir, monkeypatch, args,
                                                                             needles):
    monkeypatch.setattr("prunekit.core.environment.memory_bytes", lambda: 16 * 2**30)  # any machine: 16 GiB
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, args), *needles)
    assert _snapshot(workdir) == before


def test_timing_that_runs_out_of_memory_after_training_says_the_model_is_saved(runner, workdir, monkeypatch):
    import prunekit.cost.latency as latency

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(latency, "compare_latency", out_of_memory)
    result = runner.invoke(cli, ["run", "mine.yaml", "train.epochs=1", "finetune=null", "--out", "r"])
    _assert_one_line_error(result, "ran out of memory", "bench.batch_size", "prunekit bench r")
    assert (workdir / "r" / "pruned.safetensors").is_file()


def test_a_plain_safetensors_file_with_integer_weights_is_refused(runner, workdir):
    from safetensors.torch import save_file

    from prunekit.models import create_model

    state = {k: v.clone() for k, v in create_model("small_cnn", num_classes=10).state_dict().items()}
    state["conv1.weight"] = state["conv1.weight"].round().long()
    save_file(state, str(workdir / "plain.safetensors"))  # no prunekit metadata: the plain loading path
    before = _snapshot(workdir)
    _assert_one_line_error(runner.invoke(cli, ["eval", "mine.yaml", "--weights", "plain.safetensors"]),
                           "another kind of dtype", "conv1.weight")
    assert _snapshot(workdir) == before


def test_eval_does_not_check_the_bench_batch_it_never_uses(runner, workdir, monkeypatch):
    monkeypatch.setattr("prunekit.core.environment.memory_bytes", lambda: 16 * 2**30)
    _signed_state_file(workdir / "w.safetensors")
    result = runner.invoke(cli, ["eval", "mine.yaml", "--weights", "w.safetensors", "bench.batch_size=400000000"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_memory_the_os_does_not_know_refuses_nothing(monkeypatch):
    from prunekit.core import environment

    monkeypatch.setattr(environment.os, "sysconf", lambda name: -1)
    assert environment.memory_bytes() is None
    environment.check_input_fits((1, 3, 32, 32), "input")
