"""Runs started together never share a run directory (timestamped names or the same --out)."""
from __future__ import annotations

import builtins
import os
import threading
from types import SimpleNamespace

import pytest

from prunekit.cli import rundir
from prunekit.core import integrity
from prunekit.core.errors import ConfigError


class _Recipe:
    source = "<test>"
    init = None

    def __init__(self, tag: str):
        self.tag = tag

    def to_yaml(self) -> str:
        return f"name: {self.tag}\n"


def _race(n: int, fn) -> list:
    """Call fn(i) from n threads released together; returns results or the exceptions raised."""
    barrier, out = threading.Barrier(n), [None] * n

    def work(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as err:  # noqa: BLE001 (the test inspects it)
            out[i] = err
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _meet_at(n: int, real, wanted):
    """`real` wrapped so that each thread's first call on a `wanted` path waits until all n threads
    have made theirs: the claims then really collide, whatever the scheduler does."""
    barrier, seen = threading.Barrier(n, timeout=10), threading.local()

    def gated(path, *args, **kwargs):
        if wanted(str(path)) and not getattr(seen, "done", False):
            seen.done = True
            barrier.wait()
        return real(path, *args, **kwargs)
    return gated


def test_runs_started_in_the_same_second_get_separate_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    jobs = [SimpleNamespace(recipe=_Recipe(f"run{i}"), weights=None, run_dir=None) for i in range(6)]
    monkeypatch.setattr(integrity.os, "mkdir", _meet_at(len(jobs), os.mkdir,
                                                     lambda p: os.path.basename(p).startswith("demo-")))

    chosen = threading.Barrier(len(jobs))

    def start(i):
        # as in the CLI: the name is chosen, the data and model are prepared, then the directory made
        path = rundir.choose_run_dir("demo", tmp_path / "runs", None)
        chosen.wait()
        rundir.create_run_dir(jobs[i], path)
        return jobs[i].run_dir

    dirs = _race(len(jobs), start)
    assert not any(isinstance(d, Exception) for d in dirs), dirs
    assert len(set(dirs)) == len(jobs)
    names = sorted(d.name for d in dirs)
    assert names == sorted(["demo-20260101-000000"] + [f"demo-20260101-000000-{k}" for k in range(2, 7)])
    for job in jobs:  # each directory holds its own run's recipe, and only that
        assert (job.run_dir / "recipe.yaml").read_text().endswith(f"name: {job.recipe.tag}\n")


@pytest.mark.parametrize("made_beforehand", [False, True], ids=["new", "empty-existing"])
def test_the_same_out_given_twice_at_once_goes_to_one_run_and_the_other_stops(tmp_path, made_beforehand, monkeypatch):
    out = tmp_path / "mine"
    if made_beforehand:
        out.mkdir()
    jobs = [SimpleNamespace(recipe=_Recipe(f"run{i}"), weights=None, run_dir=None) for i in range(4)]
    monkeypatch.setattr(integrity, "open", _meet_at(len(jobs), builtins.open, lambda p: p.endswith("recipe.yaml")),
                        raising=False)

    chosen = threading.Barrier(len(jobs))

    def start(i):
        path = rundir.choose_run_dir("demo", tmp_path / "runs", out)
        chosen.wait()
        return rundir.create_run_dir(jobs[i], path, explicit=True)

    results = _race(len(jobs), start)
    won = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert len(won) == 1, results
    for i, r in enumerate(results):
        if i not in won:
            assert isinstance(r, ConfigError) and "taken by another run" in str(r), r
            assert "choose a new path" in str(r), r
            assert jobs[i].run_dir is None
    assert (out / "recipe.yaml").read_text().endswith(f"name: run{won[0]}\n")
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]
    assert not (tmp_path / "runs").exists()
