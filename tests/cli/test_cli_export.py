"""`prunekit export` on a run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from prunekit.cli.main import cli


def test_cli_exports_a_run_directory_and_refuses_to_overwrite(default_run, runner, tmp_path):
    out, _ = default_run
    result = runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "m.ts"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["weights"].endswith("pruned.safetensors") and summary["checked_batches"] == [1, 3]
    assert summary["macs"] == json.loads((out / "result.json").read_text())["cost_after"]["macs"]
    again = runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "m.ts")])
    assert again.exit_code == 2 and "exists" in again.stderr


def test_cli_names_an_input_shape_the_model_cannot_take(default_run, runner, tmp_path):
    out, _ = default_run
    result = runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "m.ts"), "--input-shape", "3,64,64"])
    assert result.exit_code == 2
    assert "cannot take inputs of per-sample shape 3,64,64" in result.stderr and "--input-shape" in result.stderr
    assert "try format" not in result.stderr and not (tmp_path / "m.ts").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_during_a_cli_export_leaves_no_staging_folder(default_run, tmp_path):
    """Through the console entry point: SIGTERM during the check unwinds through export_model,
    whose staging folder goes with it, and the process exits 143. Its own process."""
    out, _ = default_run
    target = tmp_path / "exported" / "m.ts"
    target.parent.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, threading
        import prunekit.export as export
        from prunekit.cli.main import main

        def stopped(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(30)
        export._compare = stopped
        main(["export", {str(out)!r}, "--to", {str(target)!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert list(target.parent.iterdir()) == []


def test_export_never_replaces_the_weights_or_files_of_the_run_it_exports(default_run, runner, tmp_path):
    out, _ = default_run
    weights = out / "pruned.safetensors"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for target in (weights, out / "recipe.yaml"):
        result = runner.invoke(cli, ["export", str(out), "--to", str(target), "--format", "torchscript", "--force"])
        assert result.exit_code == 2 and "write the export to another path" in result.stderr, result.output
    elsewhere = runner.invoke(cli, ["export", "--weights", str(weights), str(out), "--to", str(weights), "--force"])
    assert elsewhere.exit_code == 2 and "the weights being exported" in elsewhere.stderr
    checkpoint = next((out / "ckpt").rglob("*.safetensors"))  # a resume reads it
    inside = runner.invoke(cli, ["export", str(out), "--to", str(checkpoint), "--format", "torchscript", "--force"])
    assert inside.exit_code == 2 and "a file of the run" in inside.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # an earlier export in the run directory is no file of the run: it may be replaced
    for _ in range(2):
        again = runner.invoke(cli, ["export", str(out), "--to", str(out / "model.ts"), "--force"])
        assert again.exit_code == 0, again.output
    (out / "model.ts").unlink()  # the run directory is shared with other tests
