"""The GP search on digits: resumable to the identical result, through every executor."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prunekit.core.errors import CheckpointError, ConfigError, TrainingError
from prunekit.engine.train import TrainConfig
from prunekit.evolve import EvolveConfig, digits_task, run_search
from prunekit.evolve.fitness import train_dense
from prunekit.evolve.search import is_valid, vary
from prunekit.importance.evolved.space import SEEDS
from prunekit.importance.evolved.text import parse_expression


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "digits.safetensors"
    task = digits_task(dense_train=TrainConfig(epochs=2, lr=0.05))
    acc = train_dense(task, path)
    assert acc > 0.5  # a model worth pruning
    return str(path)


def _cfg(dense, **kw):
    task = digits_task(init=dense, finetune=TrainConfig(epochs=1, lr=0.01), calib_samples=64)
    base = dict(tasks=[task], population=4, parents=2, generations=2, reeval_top=1, reeval_seeds=1, seed=3,
                executor="serial", workers=2)
    return EvolveConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


def test_interrupted_search_resumes_to_the_same_population(dense, tmp_path):
    cfg = _cfg(dense)
    whole = run_search(cfg, tmp_path / "whole", progress=False)

    def stop_after_first(state):
        if state.generation == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        run_search(cfg, tmp_path / "cut", progress=False, on_generation=stop_after_first)
    random.seed(12345)  # whatever happened in between must not matter
    seen = []
    resumed = run_search(cfg, tmp_path / "cut", resume=True, progress=False,
                         on_generation=lambda state: seen.append(state.generation))
    assert seen == [2]  # it continued from generation 1's checkpoint, not from the start
    assert resumed.population == whole.population
    assert resumed.hall_of_fame == whole.hall_of_fame
    assert [h["best"] for h in resumed.history] == [h["best"] for h in whole.history]
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "gen_002.json").read_text())
    assert saved["population"] == whole.population and len(saved["fitness"]) == 4


def test_resume_refuses_other_settings(dense, tmp_path):
    run_search(_cfg(dense, generations=0), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        run_search(_cfg(dense, generations=0, cx_prob=0.5), tmp_path, resume=True, progress=False)


def test_resume_refuses_a_dense_model_changed_since_the_checkpoint(dense, tmp_path):
    """Fitness measured on one dense model is never ranked with fitness measured on another: a
    task's `init` replaced after generation 0 stops the resume, files untouched."""
    import shutil

    own = tmp_path / "init.safetensors"
    shutil.copy(dense, own)
    cfg = _cfg(str(own), generations=1)

    def stop_after_first(state):
        raise Interrupt
    with pytest.raises(Interrupt):
        run_search(cfg, tmp_path / "run", progress=False, on_generation=stop_after_first)
    saved = (tmp_path / "run" / "checkpoints" / "gen_000.json").read_bytes()
    other = tmp_path / "other.safetensors"
    train_dense(digits_task(dense_train=TrainConfig(epochs=1, lr=0.05, seed=1)), other)
    shutil.copy(other, own)
    with pytest.raises(CheckpointError, match="dense model of task 'digits' .* is not the one this search measured"):
        run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "gen_000.json").read_bytes() == saved
    shutil.copy(dense, own)  # the same file back: the search goes on
    assert run_search(cfg, tmp_path / "run", resume=True, progress=False).generation == 1


def test_search_through_process_pool(dense, tmp_path):
    state = run_search(_cfg(dense, executor="process"), tmp_path, progress=False)
    serial = run_search(_cfg(dense), tmp_path / "serial", progress=False)
    assert state.population == serial.population  # workers compute the same accuracies
    accs = [e["acc"] for e in state.evaluations.values()]
    assert all(0 <= a <= 1 for a in accs) and max(accs) > 0.5


def test_search_through_ray(dense, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        state = run_search(_cfg(dense, executor="ray"), tmp_path, progress=False)
    finally:
        ray.shutdown()
    assert len(state.history) == 3 and max(e["acc"] for e in state.evaluations.values()) > 0.5


def test_starting_ray_leaves_the_search_rng_alone():
    # A resumed search restores `random` from the checkpoint, then starts the executor: ray.init
    # drew from `random`, so a resumed Ray search varied differently from an uninterrupted one.
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    from prunekit.evolve.jobs import create_executor

    if ray.is_initialized():
        pytest.skip("Ray is already running: the executor would not start it")
    random.seed(0)
    before = random.getstate()
    handler = signal.getsignal(signal.SIGTERM)
    with create_executor("ray", 1):
        assert random.getstate() == before
        # ray.init sets its own SIGTERM handler: the CLI's (say how to resume, exit 143) is put back
        assert signal.getsignal(signal.SIGTERM) is handler
    assert random.getstate() == before


def test_variation_keeps_trees_valid_and_bounded():
    cfg = EvolveConfig(tasks=[digits_task()], population=8, parents=2, max_height=6, max_size=30)
    random.seed(0)
    parents = [parse_expression(t) for t in SEEDS.values()][:2]
    from prunekit.evolve.search import individual
    children = vary([individual(str(p)) for p in parents], 12, cfg)
    assert all(c.height <= 6 and len(c) <= 30 and is_valid(c, cfg) for c in children)
    assert len({str(c) for c in children}) > 3  # variation happened


def test_config_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="parents"):
        EvolveConfig(tasks=[digits_task()], population=4, parents=4)
    with pytest.raises(ConfigError, match="val_fraction"):
        digits_task(data={"name": "digits", "val_fraction": 0.0})


def test_a_function_without_finite_scores_gets_accuracy_zero(dense):
    from prunekit.evolve.fitness import Job, run_job

    task = json.dumps(_cfg(dense).tasks[0].to_dict(), sort_keys=True)
    bad = run_job(Job("div(var(P), sub(var(P), var(P)))", task, 0, dense))  # x / 0 for every channel
    good = run_job(Job(SEEDS["t_stat"], task, 0, dense))
    assert bad["acc"] == 0.0 and "finite" in bad["error"]
    assert good["error"] is None and good["acc"] > 0.5


def test_elites_are_reevaluated_with_extra_seeds(dense, tmp_path):
    state = run_search(_cfg(dense, generations=0, reeval_top=2, reeval_seeds=2), tmp_path, progress=False)
    seeds_of = {}
    for key in state.evaluations:
        _, seed, text = key.split("|", 2)
        seeds_of.setdefault(text, set()).add(int(seed))
    assert sorted(len(s) for s in seeds_of.values()) == [1, 1, 3, 3]  # population 4: the best 2 have 3 seeds


def test_a_task_whose_dense_weights_do_not_load_stops_the_search(dense, tmp_path):
    # Weights of another width: no function is to blame, so no function may score 0 for it.
    from safetensors.torch import save_model

    from prunekit.evolve.fitness import Job, run_job
    from prunekit.models import create_model

    wrong = tmp_path / "wrong.safetensors"
    save_model(create_model("small_cnn", 10, width=8), str(wrong))
    task = json.dumps(_cfg(dense).tasks[0].to_dict(), sort_keys=True)
    with pytest.raises(CheckpointError, match="task 'digits': dense weights .*wrong.safetensors.*conv1.weight"):
        run_job(Job(SEEDS["t_stat"], task, 0, str(wrong)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="truncated.safetensors cannot be loaded"):
        run_job(Job(SEEDS["t_stat"], task, 0, str(truncated)))


def test_a_task_with_an_empty_validation_split_stops_the_search(dense):
    # round(1,797 * 0.0002) = 0 images held out: every function scored 0 and the search ran on nothing
    from prunekit.evolve.fitness import Job, run_job

    task = _cfg(dense).tasks[0]
    task.data = {**task.data, "val_fraction": 0.0002}
    want = r"task 'digits': its val split, where fitness is measured, holds no images \(val_fraction=0.0002\)"
    with pytest.raises(ConfigError, match=want):
        run_job(Job(SEEDS["t_stat"], json.dumps(task.to_dict(), sort_keys=True), 0, dense))


def test_malformed_task_entries_are_config_errors():
    from prunekit.evolve.config import task_from

    with pytest.raises(ConfigError, match=r"takes only .*got unknown \['foo'\], missing \['data', 'model'\]"):
        task_from({"name": "x", "foo": 1})
    with pytest.raises(ConfigError, match="val_fraction='abc' must be a number"):
        task_from({"base": "digits", "data": {"val_fraction": "abc"}})


def test_a_damaged_or_hostile_checkpoint_is_one_checkpoint_error(dense, tmp_path):
    cfg = _cfg(dense, generations=0)
    run_search(cfg, tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "gen_000.json"
    good = json.loads(path.read_text())
    for change, needle in [({"population": None}, "damaged"), ({"random_state": [1]}, "damaged"),
                           ({"generation": "0"}, "damaged"), ({"evaluations": []}, "damaged"),
                           ({"evaluations": {k: 5 for k in good["evaluations"]}}, "damaged: evaluations"),
                           ({"hall_of_fame": []}, "damaged: the hall of fame"), ({"history": [1, 2]}, "damaged: history"),
                           ({"hall_of_fame": ["__import__('os').system('true')"]}, "invalid function")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=needle):
            run_search(cfg, tmp_path, resume=True, progress=False)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="damaged: it is not a search checkpoint"):
        run_search(cfg, tmp_path, resume=True, progress=False)


def test_a_task_s_dense_model_is_the_same_whatever_ran_before(tmp_path):
    from prunekit.engine.train import TrainConfig
    from prunekit.evolve.fitness import train_dense

    task = digits_task(dense_train=TrainConfig(epochs=1, lr=0.05))
    train_dense(task, tmp_path / "a.safetensors")
    torch.rand(1000)  # the process's random state moves on
    train_dense(task, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_serial_search_gives_the_callers_thread_count_back(dense, tmp_path):
    """Serial jobs run in the caller's process on threads_per_job threads; the caller keeps its own."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_search(_cfg(dense, generations=0, threads_per_job=1), tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_executor_ray_without_ray_is_refused_before_any_training(monkeypatch, tmp_path):
    """Found before the dense models train (it was found only when the first generation started)."""
    import importlib.util

    from prunekit.evolve.search import check_tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, generations=1, executor="ray")
    with pytest.raises(ConfigError, match="executor='ray' needs Ray"):
        check_tasks(cfg)
    with pytest.raises(ConfigError, match="executor='ray' needs Ray"):
        run_search(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "dense").exists()  # nothing trained


def test_a_failing_job_cancels_the_queued_ones_instead_of_waiting_for_them():
    from prunekit.evolve.jobs import create_executor

    start = time.perf_counter()
    with pytest.raises(TypeError, match="'str' object cannot be interpreted"):
        with create_executor("process", 1, job_fn=time.sleep) as run:
            run(["not a number"] + [1.0] * 12)
    assert time.perf_counter() - start < 8  # the 12 queued seconds were not run


def test_a_dead_worker_is_one_clear_error():
    from prunekit.evolve.jobs import create_executor

    with pytest.raises(TrainingError, match="worker process died"):
        with create_executor("process", 1, job_fn=os._exit) as run:
            run([3])


def test_a_failing_ray_job_cancels_the_pending_ones():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    from prunekit.evolve.jobs import create_executor

    if ray.is_initialized():
        pytest.skip("Ray is already running: the executor would not start it")
    cancelled = []
    real_cancel = ray.cancel
    ray.cancel = lambda ref, **kw: (cancelled.append(ref), real_cancel(ref, **kw))
    try:
        with pytest.raises(Exception, match="cannot be interpreted"):
            with create_executor("ray", 1, job_fn=lambda s: time.sleep(s)) as run:
                run(["not a number"] + [1.0] * 6)
    finally:
        ray.cancel = real_cancel
    assert len(cancelled) >= 5


def test_a_function_that_rises_when_an_elite_is_reevaluated_is_reevaluated_too(tmp_path):
    """With reeval_top=1: sum(P) is lucky on seed 0 and falls to 0.5 when re-evaluated; sum(Q),
    second on seed 0 (0.8) but 0.2 on seed 1, then stood first on its one lucky fine-tune and was
    the hall of fame's best."""
    from prunekit.evolve.search import Search, SearchState

    accs = {("sum(P)", 0): 0.9, ("sum(P)", 1): 0.1, ("sum(Q)", 0): 0.8, ("sum(Q)", 1): 0.2,
            ("sum(X)", 0): 0.5, ("sum(X)", 1): 0.5, ("sum(W)", 0): 0.4, ("sum(W)", 1): 0.4}

    def run(jobs, desc="", progress=False):
        return [{"key": j.key, "acc": accs[j.text, j.seed], "error": None, "seconds": 0.0} for j in jobs]
    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, reeval_top=1, reeval_seeds=1)
    search = Search(cfg, tmp_path, {"digits": "unused.safetensors"}, False)
    state = SearchState(0, ["sum(P)", "sum(Q)", "sum(X)", "sum(W)"], {}, [], [])
    search.evaluate_population(state.population, state.evaluations, run, 0)
    search.record(state)
    assert search.fitness("sum(Q)", state.evaluations) == 0.5  # re-evaluated: 0.8 and 0.2
    best = state.hall_of_fame[0]
    assert search.evaluated(best, range(2), state.evaluations)
    assert best in ("sum(P)", "sum(Q)", "sum(X)") and search.fitness(best, state.evaluations) == 0.5


def test_task_names_cannot_write_outside_the_run_directory():
    """A task's name names its dense model in <run>/dense/: '../../x' wrote it beside the run directory."""
    from prunekit.evolve.config import task_from

    for name in ("../../escaped", "a/b", "..", " ", "a|b", "a" * 101):  # too long: failed after the dense training
        with pytest.raises(ConfigError, match=f"task name {name!r} is not allowed"):
            digits_task(name=name)
    with pytest.raises(ConfigError, match="task name '../x' is not allowed"):
        EvolveConfig(tasks=[{"base": "digits", "name": "../x"}], population=4, parents=2)
    assert task_from({"base": "digits", "name": "digits-small_2.0"}).name == "digits-small_2.0"
    assert digits_task(name="a" * 100).name == "a" * 100


@pytest.mark.parametrize("tasks", ["digits", None, {"base": "digits"}])
def test_a_task_list_that_is_not_a_list_is_one_clear_error(tasks):
    # `tasks: digits` was read letter by letter: "task base 'd' is unknown"
    with pytest.raises(ConfigError, match=r"tasks=.* must be a list of tasks, e\.g\. \[digits, cifar10_subset\]"):
        EvolveConfig.from_dict({"tasks": tasks, "population": 4, "parents": 2})


def test_bloat_bounds_hold_the_seeds_and_stay_readable_as_text():
    """Seeds above max_height/max_size started the search (and survived as elites) outside the
    bounds; a max_size above the parser's node limit let the search accept a tree whose text the
    next generation could not read back."""
    from prunekit.importance.evolved.text import MAX_NODES

    with pytest.raises(ConfigError, match=r"max_height=3 is below the seed function t_stat \(6\).*max_height >= 6"):
        EvolveConfig(tasks=[digits_task()], population=4, parents=2, max_height=3)
    with pytest.raises(ConfigError, match=r"max_size=20 is below the seed function sym_div \(27\).*max_size >= 27"):
        EvolveConfig(tasks=[digits_task()], population=4, parents=2, max_size=20)
    with pytest.raises(ConfigError, match=rf"max_size=5000 is above the 2,000 nodes.*max_size <= {MAX_NODES}"):
        EvolveConfig(tasks=[digits_task()], population=4, parents=2, max_size=5000)


def test_resume_reads_the_newest_checkpoint_past_generation_999(tmp_path):
    """gen_1000.json sorts before gen_999.json by name: resume went back one generation."""
    from prunekit.evolve.search import SearchState, load_checkpoint, save_checkpoint

    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, generations=1001)
    key = "digits|0|" + SEEDS["seed_l1"]
    for g in (999, 1000):
        history = [{"generation": i, "best": 0.5, "mean": 0.5, "median": 0.5, "best_text": SEEDS["seed_l1"],
                    "evaluations": 1} for i in range(g + 1)]
        state = SearchState(g, [SEEDS["seed_l1"]] * 4, {key: {"acc": 0.5}}, [SEEDS["seed_l1"]], history)
        save_checkpoint(tmp_path, state, cfg, [0.5] * 4)
    assert load_checkpoint(tmp_path, cfg).generation == 1000


def test_home_relative_task_paths_are_expanded(dense, tmp_path, monkeypatch):
    """init: ~/... and data.root: ~/... name the user's home, as on the command line."""
    from pathlib import Path

    from prunekit.evolve.search import check_tasks, prepare_dense

    monkeypatch.setenv("HOME", str(Path(dense).parent))
    (Path(dense).parent / "data").mkdir(exist_ok=True)
    name = Path(dense).name
    cfg = EvolveConfig(tasks=[digits_task(init=f"~/{name}", data={"name": "digits", "root": "~/data",
                                                                  "val_fraction": 0.2})])
    check_tasks(cfg)
    assert prepare_dense(cfg, tmp_path) == {"digits": dense}
    with pytest.raises(ConfigError, match="init '~/missing.safetensors' is not a file"):
        check_tasks(EvolveConfig(tasks=[digits_task(init="~/missing.safetensors")]))


def test_the_re_evaluation_is_saved_per_call_and_resumed(dense, tmp_path, monkeypatch):
    """Resuming a finished or interrupted run re-evaluates no function twice (one worker: one
    function per call, saved after each)."""
    from prunekit.evolve import report
    from prunekit.evolve.search import Search

    cfg = _cfg(dense, generations=0, reeval_top=0, reeval_seeds=0, workers=1)
    texts = {"a": SEEDS["t_stat"], "b": SEEDS["abs_snr"]}
    real, calls = Search.evaluate, []

    def stop_on_second(self, texts_, *args):
        calls.append(texts_)
        if len(calls) == 2:
            raise Interrupt
        return real(self, texts_, *args)

    monkeypatch.setattr(Search, "evaluate", stop_on_second)
    with pytest.raises(Interrupt):
        report.reevaluate(cfg, tmp_path, texts, seeds=1, progress=False)
    saved = json.loads((tmp_path / "checkpoints" / "reevaluation.json").read_text())
    assert len(saved["evaluations"]) == 1  # the first function's one job
    monkeypatch.setattr(Search, "evaluate", lambda self, texts_, *a: calls.append(texts_) or real(self, texts_, *a))
    rows = report.reevaluate(cfg, tmp_path, texts, seeds=1, progress=False)
    assert calls[2:] == [[SEEDS["abs_snr"]]]  # only the function the interruption missed
    again = report.reevaluate(cfg, tmp_path, texts, seeds=1, progress=False)
    assert again == rows and len(calls) == 3  # a finished re-evaluation is read back, not run again
    (tmp_path / "checkpoints" / "reevaluation.json").write_text('{"config": 1}')
    with pytest.raises(CheckpointError, match="reevaluation.json was written with other settings"):
        report.reevaluate(cfg, tmp_path, texts, seeds=1, progress=False)
    calls.clear()  # two workers: both functions' jobs go out in one call, so both workers are busy
    report.reevaluate(_cfg(dense, generations=0, reeval_top=0, reeval_seeds=0, workers=2), tmp_path / "two", texts,
                      seeds=1, progress=False)
    assert calls == [[SEEDS["t_stat"], SEEDS["abs_snr"]]]


def test_a_ray_cluster_that_cannot_be_joined_is_one_error_before_any_training(tmp_path):
    """ray_address="auto" with no cluster running: one ConfigError naming the setting, before the
    dense models train (the connection used to be tried only after them)."""
    pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    import ray
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, generations=1, executor="ray",
                       ray_address="auto")
    env = {k: os.environ.pop(k) for k in ("RAY_ADDRESS",) if k in os.environ}
    try:
        with pytest.raises(ConfigError, match="ray_address='auto': Ray could not join a cluster there"):
            run_search(cfg, tmp_path / "run", progress=False)
    finally:
        os.environ.update(env)
    assert not (tmp_path / "run" / "dense").exists()  # nothing trained


def test_an_address_where_nothing_answers_is_one_error_within_seconds():
    """Ray retries an unreachable "host:port" for minutes; the executor asks the port first."""
    pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    from prunekit.evolve.jobs import create_executor

    start = time.perf_counter()
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ConfigError, match=rf"ray_address='{address}': nothing answers at 127.0.0.1:1"):
            with create_executor("ray", 1, address=address):
                pass
    assert time.perf_counter() - start < 30


def test_an_interrupted_process_pool_stops_its_workers_instead_of_waiting_for_them(tmp_path):
    """Ctrl-C or SIGTERM while jobs run: the pool waited for every running job (minutes of
    fine-tuning each) before the command could say how to resume. Its own process: the signal
    must not reach the test runner."""
    script = textwrap.dedent("""
        import os, signal, threading, time
        from prunekit.evolve.jobs import create_executor

        if __name__ == "__main__":
            # a process started in the background by a non-interactive shell inherits SIGINT ignored,
            # and Python then leaves it ignored: Ctrl-C's handler is put back for this check
            signal.signal(signal.SIGINT, signal.default_int_handler)
            start = time.perf_counter()
            threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            try:
                with create_executor("process", 2, job_fn=time.sleep) as run:
                    run([60.0, 60.0])
            except KeyboardInterrupt:
                print(f"stopped after {time.perf_counter() - start:.1f} s")
    """)
    path = tmp_path / "interrupted_pool.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(re.search(r"stopped after ([\d.]+) s", done.stdout).group(1)) < 30, done.stdout


def test_a_task_every_seed_fails_on_stops_the_search_with_its_reason(dense, tmp_path):
    """A time limit no function can meet: the seven hand-made seeds all fail, so the task cannot
    measure fitness; the search stops with that reason instead of scoring every function 0."""
    cfg = _cfg(dense, generations=1)
    cfg.tasks[0].score_time_s = 1e-6
    with pytest.raises(ConfigError, match=r"task 'digits' cannot measure fitness: every seed function failed on it"):
        run_search(cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_task_settings_a_candidate_cannot_honour_are_refused_up_front():
    from prunekit.evolve.config import task_from

    with pytest.raises(ConfigError, match=r"prune_ratio=0.95 is above 0.9"):
        task_from({"base": "digits", "prune_ratio": 0.95})
    for change, needle in [({"finetune": 5}, "finetune=5 must be a mapping"),
                           ({"model_kwargs": 5}, "model_kwargs=5 must be a mapping"),
                           ({"ignore": "conv1"}, r"ignore='conv1' must be a list of names"),
                           ({"init": 3}, "init=3 must be the path")]:
        with pytest.raises(ConfigError, match=needle):
            task_from({"base": "digits", **change})
    with pytest.raises(ConfigError, match="dense_train=5 must be a mapping"):
        task_from({"name": "x", "model": "small_cnn", "data": {"name": "digits"}, "dense_train": 5})


@pytest.mark.parametrize("change, needle", [({"ignore": ["conv9"]}, r"ignore names modules that do not exist: \['conv9'\]"),
                                            ({"model_kwargs": {"depth": 3}}, "does not take depth")])
def test_a_task_s_ignore_list_and_model_keywords_are_checked_before_any_training(tmp_path, change, needle):
    from prunekit.evolve.config import task_from

    cfg = EvolveConfig(tasks=[task_from({"base": "digits", **change})], population=4, parents=2, generations=1,
                       executor="serial")
    with pytest.raises(ConfigError, match=needle):
        run_search(cfg, tmp_path, progress=False)
    assert not (tmp_path / "dense").exists()


def test_a_checkpoint_history_the_report_cannot_read_is_refused(dense, tmp_path):
    cfg = _cfg(dense, generations=0)
    run_search(cfg, tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "gen_000.json"
    good = json.loads(path.read_text())
    for history in ([{}], [], [{**good["history"][0], "best": "high"}], good["history"] * 2):
        path.write_text(json.dumps({**good, "history": history}))
        with pytest.raises(CheckpointError, match="damaged: history"):
            run_search(cfg, tmp_path, resume=True, progress=False)


def test_a_damaged_dense_model_the_run_trained_says_to_delete_it(dense, tmp_path):
    from prunekit.evolve.fitness import Job, run_job

    own = tmp_path / "dense" / "digits.safetensors"
    own.parent.mkdir()
    own.write_text("garbage")
    task = _cfg(dense).tasks[0]
    task.init = None
    with pytest.raises(CheckpointError, match=r"the run trained itself: delete .*digits.safetensors and resume"):
        run_job(Job(SEEDS["t_stat"], json.dumps(task.to_dict(), sort_keys=True), 0, str(own)))


def test_a_failing_ray_job_raises_its_own_error_not_ray_s_wrapper():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    from prunekit.evolve.jobs import create_executor

    if ray.is_initialized():
        pytest.skip("Ray is already running: the executor would not start it")

    def refuse(_):
        raise ConfigError("task 'x': the one-line reason")

    with pytest.raises(ConfigError) as caught:
        with create_executor("ray", 1, job_fn=refuse) as run:
            run([1])
    assert str(caught.value) == "task 'x': the one-line reason"


@pytest.mark.parametrize("asked, needle", [(dict(num_cpus=4), r"num_cpus=4 and num_gpus=0.*workers=2 CPUs.*raise workers"),
                                           (dict(num_gpus=1), r"num_gpus=1, which no node .*0 GPUs.*lower num_cpus/num_gpus")])
def test_ray_jobs_that_no_node_can_hold_are_one_error_instead_of_a_silent_wait(asked, needle):
    """Ray queued such jobs for ever, with its warning in a log the search does not show."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (prunekit[distributed])")
    from prunekit.evolve.jobs import create_executor

    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    if asked.get("num_gpus") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=needle):
        with create_executor("ray", 2, **asked, job_fn=lambda s: s) as run:
            run([1])
    assert not ray.is_initialized()  # the Ray this executor started is shut down again


def test_a_dense_model_trained_with_other_settings_is_not_reused(tmp_path):
    """The run directory's dense model was reused whatever the task's dense_train now said."""
    from prunekit.evolve.search import prepare_dense

    one = EvolveConfig(tasks=[digits_task(dense_train=TrainConfig(epochs=1, lr=0.05))], population=4, parents=2)
    paths = prepare_dense(one, tmp_path)
    digest = Path(paths["digits"]).read_bytes()
    assert prepare_dense(one, tmp_path) == paths  # the same settings: reused
    two = EvolveConfig(tasks=[digits_task(dense_train=TrainConfig(epochs=2, lr=0.05))], population=4, parents=2)
    with pytest.raises(CheckpointError, match=r"digits.safetensors was trained with other dense_train than the task "
                                              r"now gives; remove .* to train it again"):
        prepare_dense(two, tmp_path)
    assert Path(paths["digits"]).read_bytes() == digest


def test_a_new_search_refuses_a_directory_with_checkpoints_and_an_unwritable_one(tmp_path, monkeypatch):
    """resume=False over an earlier search overwrote its first generations and left the rest; a
    read-only directory was found only when the first generation, fully measured, was saved."""
    import errno
    import tempfile

    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, generations=1, executor="serial")
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "gen_000.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds the checkpoints of a search; resume it"):
        run_search(cfg, tmp_path / "old", progress=False)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match="the file system is read-only"):
        run_search(cfg, tmp_path / "ro", progress=False)
    assert not (tmp_path / "ro" / "dense").exists()


def test_a_checkpoint_that_is_not_a_search_checkpoint_is_named_damaged(tmp_path):
    from prunekit.evolve.search import load_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "gen_000.json").write_text("[]")
    with pytest.raises(CheckpointError, match="gen_000.json is damaged: it is not a search checkpoint; delete it"):
        load_checkpoint(tmp_path, EvolveConfig(tasks=[digits_task()], population=4, parents=2))
