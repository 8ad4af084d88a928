"""A run killed mid-training continues with `prunekit resume` to the same result as an
uninterrupted run; a stopped run is never taken as finished by the other commands."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from prunekit.cli.main import cli



def make_runner() -> CliRunner:  # as tests/cli/conftest.py: stderr kept apart on every click version
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()

ARGS = ["train.epochs=2", "finetune.epochs=2", "eval.latency=false", "threads=1", "name=resume"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _records(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # the line being written
            pass
    return out


def _epochs_in(records: list[dict], stage: str) -> int:
    """Epoch records logged since the last start of `stage`."""
    n, inside = 0, False
    for r in records:
        if r.get("event") == "stage":
            inside, n = r.get("name") == stage, 0 if r.get("name") == stage else n
        elif r.get("event") == "epoch" and inside:
            n += 1
    return n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    try:
        result = make_runner().invoke(cli, ["run", *ARGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def _run_and_kill(args: list[str], out: Path, stage: str, epochs: int, while_alive=None) -> None:
    """Start `prunekit *args` in a process and SIGKILL it once `stage` logged `epochs` epochs and
    wrote their checkpoint (the epoch record comes just before the checkpoint); `while_alive()`
    runs just before the kill."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "prunekit.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _epochs_in(_records(out), stage) < epochs or not (out / "ckpt" / stage / "last.pt").exists():
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run did not reach the epoch in time"
            time.sleep(0.01)
        if while_alive is not None:
            while_alive()
            assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_resuming_a_run_still_in_progress_is_refused_and_its_lock_goes_with_its_process(tmp_path):
    """Two processes trained one run side by side and both wrote its files; now the second is
    refused while the first holds the directory, and the lock goes when the first is killed."""
    from prunekit.core.integrity import hold_dir
    out = tmp_path / "run"

    def try_resume():  # refused before it reads or writes anything in the directory
        res = make_runner().invoke(cli, ["resume", str(out)])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "in use by another prunekit process" in lines[0], res.output

    _run_and_kill(["run", *ARGS, "train.epochs=6", "--out", str(out)], out, "train", 1, while_alive=try_resume)
    with hold_dir(out):  # released by the killed process's end
        pass


def _last_resume(records: list[dict]) -> list[dict]:
    at = max(i for i, r in enumerate(records) if r.get("event") == "resume" and "todo" in r)
    return records[at:]


def test_a_run_killed_twice_resumes_to_the_uninterrupted_result(reference, tmp_path):
    out = tmp_path / "run"
    _run_and_kill(["run", *ARGS, "--out", str(out)], out, "train", 1)  # killed in dense training
    assert not (out / "result.json").exists()
    runner = make_runner()
    for cmd in (["finetune", str(out)], ["prune", str(out)], ["eval", str(out)], ["bench", str(out), "--no-latency"]):
        res = runner.invoke(cli, cmd)  # the stopped run's files are never taken as its result
        assert res.exit_code == 2 and "did not finish" in res.stderr and "prunekit resume" in res.stderr, res.output
    _run_and_kill(["resume", str(out)], out, "finetune", 1)  # resumed, then killed in fine-tuning
    # the first resume continued dense training from its checkpoint: epoch 2 only, not both again
    first = _last_resume(_records(out))
    assert first[0]["todo"][0] == "train"
    assert any(r.get("event") == "resume" and r.get("from_epoch", 0) >= 1 for r in first)
    assert _epochs_in(first, "train") <= 1
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["train", "prune"] and not state["finished"]
    threads = torch.get_num_threads()
    try:
        res = runner.invoke(cli, ["resume", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, (res.output, res.exception)
    state = json.loads((out / "state.json").read_text())
    assert state["finished"] and state["done"] == ["train", "prune", "finetune"]
    # finished stages were not run again; fine-tuning lost at most the epoch that was running
    tail = _last_resume(_records(out))
    assert {r.get("name") for r in tail if r.get("event") == "stage"} == {"finetune"}
    assert _epochs_in(tail, "finetune") <= 1 and any(r.get("event") == "resume" and r.get("from_epoch", 0) >= 1
                                                      for r in tail)
    # the same model and numbers as the run that was never stopped
    ref, got = load_file(str(reference / "pruned.safetensors")), load_file(str(out / "pruned.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_result, result = (json.loads((d / "result.json").read_text()) for d in (reference, out))
    for key in ("accuracy_before", "accuracy_after", "accuracy_pruned_no_finetune", "cost_before", "cost_after"):
        assert result[key] == ref_result[key], key
    assert [e["step"] for e in result["history"]] == [e["step"] for e in ref_result["history"]]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_refuses_finished_and_foreign_directories(reference, tmp_path):
    runner = make_runner()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("keep me\n")
    for run_dir, needle in ((reference, "already finished"), (tmp_path / "x", "no state.json")):
        before = _files(run_dir)
        res = runner.invoke(cli, ["resume", str(run_dir)])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
        assert _files(run_dir) == before  # a refusal leaves the directory as it was


def test_bench_and_eval_of_a_directory_without_weights_fail(reference, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(reference / "recipe.yaml", bare / "recipe.yaml")
    runner = make_runner()
    for cmd in (["bench", str(bare), "--no-latency"], ["eval", str(bare)], ["finetune", str(bare)]):
        res = runner.invoke(cli, cmd)
        assert res.exit_code == 2 and "holds no weights" in res.stderr, (cmd, res.output)
        assert len(res.stderr.strip().splitlines()) == 1


def test_a_pruned_run_missing_its_pruned_weights_is_refused_not_replaced_by_the_dense_model(reference, tmp_path):
    """export/eval/bench/finetune of a run whose state says it pruned took dense.safetensors, silently,
    when pruned.safetensors was gone; --weights dense.safetensors still takes it on purpose."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "pruned.safetensors").unlink()
    runner = make_runner()
    for cmd in (["export", str(run), "--to", str(tmp_path / "m.ts")], ["eval", str(run)],
                ["bench", str(run), "--no-latency"], ["finetune", str(run)]):
        res = runner.invoke(cli, cmd)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "pruned its model but pruned.safetensors is missing" \
            in lines[0] and "--weights" in lines[0], (cmd, res.output)
    assert not (tmp_path / "m.ts").exists()
    res = runner.invoke(cli, ["eval", str(run), "--weights", str(run / "dense.safetensors")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("edit, fragment", [
    ({"done": 3}, "done is not a list"), ({"weights": 5}, "a weights entry"), ({"stages": "train"}, "stages is not"),
    ({"stages": ["train", "search"]}, "stages is not"), ({"evaluations": [{"step": "dense"}]}, "evaluations"),
    ({"seconds": [1]}, "seconds"), ({"finished": "no"}, "finished"), ({"done": ["finetune"]}, "done is not"),
])
def test_a_run_state_with_entries_of_the_wrong_form_is_refused(tmp_path, edit, fragment):
    """`prunekit resume` acts on state.json: a string of stages was walked letter by letter."""
    from prunekit.cli.runstate import new_state, read_state, write_state
    from prunekit.core.errors import CheckpointError

    state = new_state("run", ["train", "prune"], None)
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    write_state(tmp_path, {**state, **edit})
    with pytest.raises(CheckpointError, match=f"damaged: {fragment}.*cannot be resumed"):
        read_state(tmp_path)


@pytest.mark.parametrize("done, section", [(["train", "prune"], "finetune"), (["train"], "method")])
def test_resume_of_a_run_whose_recipe_lost_a_stage_still_to_do_is_refused(reference, tmp_path, done, section):
    """recipe.yaml is read again on resume: a stage still to do whose section was set to null there
    stops with one line, before anything is written."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    state.update(done=done, finished=False, weights=f"ckpt/{done[-1]}/model.safetensors",
                 evaluations=state["evaluations"][:len(done)])
    if "prune" not in done:
        state["before_prune"] = None
    state.pop("recipe_sha256", None)  # as a run started before the recipe's digest was kept
    (run / "state.json").write_text(json.dumps(state))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe[section] = None
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    before = _files(run)
    res = make_runner().invoke(cli, ["resume", str(run)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.output, res.exception)
    assert f"'{section}'" in lines[0] and "recipe.yaml" in lines[0], lines[0]
    assert _files(run) == before


def test_resume_refuses_a_recipe_edited_since_the_run_started(reference, tmp_path):
    """An edited target was taken without a word: the stages still to do ran other settings than
    the finished ones."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    assert state["recipe_sha256"]
    state.update(done=["train"], finished=False, weights="ckpt/train/model.safetensors", before_prune=None,
                 evaluations=state["evaluations"][:1])
    (run / "state.json").write_text(json.dumps(state))
    text = (run / "recipe.yaml").read_text()
    assert "macs_fraction: 0.5" in text
    (run / "recipe.yaml").write_text(text.replace("macs_fraction: 0.5", "macs_fraction: 0.3"))
    before = _files(run)
    res = make_runner().invoke(cli, ["resume", str(run)])
    assert res.exit_code == 2 and "recipe.yaml changed since the run started" in res.stderr, res.output
    assert _files(run) == before
