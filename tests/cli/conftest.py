"""Fixtures of the CLI tests: a runner with separate stderr, and one default run shared by them."""
from __future__ import annotations

import inspect

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli.main import cli


def make_runner() -> CliRunner:
    # click < 8.2 mixes stderr into stdout unless told not to; later versions always separate them.
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


@pytest.fixture
def runner() -> CliRunner:
    return make_runner()


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`prunekit run` with the embedded default recipe, into a temporary run directory."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("default") / "run"
    try:
        result = make_runner().invoke(cli, ["run", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result
