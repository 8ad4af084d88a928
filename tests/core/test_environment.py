"""Environment record: versions, CPU, GPU and git revision, each tolerant of absence."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess

import pytest
import torch

from prunekit.core.environment import cpu_model, environment, git_revision


def test_environment_fields():
    env = environment()
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_model"] == cpu_model() and env["cpu_model"]
    assert env["prunekit"] not in ("", None)
    assert (env["cuda"] is None) == (not torch.cuda.is_available())
    json.dumps(env)  # every value must be JSON-serialisable for result.json


def test_outside_a_checkout_git_is_none(tmp_path):
    assert git_revision(tmp_path) == (None, None)
    assert environment(tmp_path)["git_commit"] is None


def test_missing_git_binary_is_tolerated(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no git on PATH
    assert git_revision(tmp_path) == (None, None)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_and_dirty_flag_of_a_checkout(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    head = git("log", "-1", "--format=%H")
    assert git_revision(tmp_path) == (head, False)
    (tmp_path / "f.txt").write_text("b")
    assert git_revision(tmp_path) == (head, True)
