"""`prunekit export` on a run directory."""
from __future__ import annotations

import json

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
