"""The GP loop (the authors' co-evolution) with JSON checkpoints.

    pop = the 7 seeds repeated to `population`; evaluate
    for g in 1..G:
        parents = the best `parents` (selBest, elitist: they survive unchanged)
        children = copies of random parents; one-point crossover of consecutive pairs (p = cx_prob)
                   and uniform mutation with a genFull subtree of height 0-4 (p = mut_prob), each
                   variation drawn again until it is valid (bounds + finite scores on a fixed
                   argument within validity_time_s)
        evaluate the new functions; re-evaluate the best few with more seeds; pop = parents + children

A function's accuracy on a task is memoised by (task, seed, text): copies and survivors are not
evaluated again. After every generation `<run_dir>/checkpoints/gen_XXX.json` holds the
population as text, fitnesses, all evaluations, the hall of fame and the `random`/NumPy states;
`run_search(..., resume=True)` continues from the newest one and, with the same seed, ends where
an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
from deap import base, creator, gp, tools

from ..core.errors import CheckpointError, ConfigError, read_json
from ..core.integrity import atomic_write_text, check_writable, file_digest, hold_dir
from ..importance.evolved.space import PSET, SEEDS, EvalError
from ..importance.evolved.text import expression_text, parse_expression
from ..importance.evolved.tree_eval import channel_scores
from .config import EvolveConfig
from .fitness import Job, fitness_of, train_dense
from .jobs import create_executor

HALL_OF_FAME = 10

if not hasattr(creator, "PrunekitFitness"):
    creator.create("PrunekitFitness", base.Fitness, weights=(1.0,))
    creator.create("PrunekitIndividual", gp.PrimitiveTree, fitness=creator.PrunekitFitness)


def individual(text: str):
    return creator.PrunekitIndividual(parse_expression(text))


@functools.lru_cache(maxsize=1)
def validity_argument() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed test argument: 300 digits images (8 channels = rolled copies, D = 64) and
    8 random 3x3 kernels (the authors used MNIST pixels and random 3x3 kernels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[:300] / 16.0, d.target[:300]
    maps = np.stack([np.roll(x, k, axis=1) * (1 + 0.1 * k) for k in range(8)], 1)
    return maps, y, np.random.default_rng(0).normal(size=(8, 9))


def is_valid(tree, cfg: EvolveConfig) -> bool:
    """Within the bloat bounds and finite scores on the test argument within validity_time_s."""
    if tree.height > cfg.max_height or len(tree) > cfg.max_size:
        return False
    maps, y, filters = validity_argument()
    try:
        channel_scores(tree, maps, y, filters, time.monotonic() + cfg.validity_time_s)
    except EvalError:
        return False
    return True


def _crossover(a, b, cfg: EvolveConfig):
    for _ in range(cfg.max_redraws):
        a2, b2 = gp.cxOnePoint(creator.PrunekitIndividual(a), creator.PrunekitIndividual(b))
        if is_valid(a2, cfg) and is_valid(b2, cfg):
            return a2, b2
    return a, b


def _mutation(a, cfg: EvolveConfig):
    expr = functools.partial(gp.genFull, min_=cfg.mut_min_height, max_=cfg.mut_max_height)
    for _ in range(cfg.max_redraws):
        (a2,) = gp.mutUniform(creator.PrunekitIndividual(a), expr=expr, pset=PSET)
        if is_valid(a2, cfg):
            return a2
    return a


def vary(parents: list, n_children: int, cfg: EvolveConfig) -> list:
    """Children of the elitist parents (uses and advances the global `random` state, as DEAP does)."""
    children = [creator.PrunekitIndividual(random.choice(parents)) for _ in range(n_children)]
    for i in range(1, len(children), 2):
        if random.random() < cfg.cx_prob:
            children[i - 1], children[i] = _crossover(children[i - 1], children[i], cfg)
    for i in range(len(children)):
        if random.random() < cfg.mut_prob:
            children[i] = _mutation(children[i], cfg)
    return children


@dataclasses.dataclass
class SearchState:
    generation: int
    population: list[str]
    evaluations: dict[str, dict]  # Job.key -> run_job's result
    hall_of_fame: list[str]
    history: list[dict]


class Search:
    """One evolution; `run_search` is the function to call."""

    def __init__(self, cfg: EvolveConfig, run_dir: str | Path, dense_paths: dict[str, str], progress: bool,
                 dense_sha256: dict[str, str] | None = None):
        self.cfg, self.run_dir, self.dense, self.progress = cfg, Path(run_dir), dense_paths, progress
        self.dense_sha256 = dense_sha256 or {}  # what each task's fitness is measured on, kept in every checkpoint
        self.tasks = {t.name: t for t in cfg.tasks}
        self.task_json = {t.name: json.dumps(t.to_dict(), sort_keys=True) for t in cfg.tasks}

    def job(self, text: str, task: str, seed: int) -> Job:
        return Job(text, self.task_json[task], seed, self.dense[task], self.cfg.device, self.cfg.threads_per_job)

    def fitness(self, text: str, evals: dict) -> float:
        accs = {}
        for t in self.tasks:
            got = [r["acc"] for s in range(1 + self.cfg.reeval_seeds)
                   if (r := evals.get(self.job(text, t, s).key)) is not None]
            accs[t] = got or [0.0]
        return fitness_of(accs, {t: c.weight for t, c in self.tasks.items()})

    def evaluate(self, texts: list[str], seeds: range, evals: dict, run, desc: str) -> None:
        jobs, seen = [], set()
        for text in texts:
            for t in self.tasks:
                for s in seeds:
                    job = self.job(text, t, s)
                    if job.key not in evals and job.key not in seen:
                        jobs.append(job)
                        seen.add(job.key)
        for job, result in zip(jobs, run(jobs, desc=desc, progress=self.progress)):
            evals[job.key] = result

    def evaluate_population(self, pop: list[str], evals: dict, run, g: int) -> None:
        """Evaluate with seed 0, then re-evaluate the best `reeval_top` with every seed until the best
        `reeval_top` are all re-evaluated: a function that moves up when a re-evaluated one falls
        is re-evaluated too, so no single lucky fine-tune ends on top."""
        self.evaluate(pop, range(1), evals, run, f"generation {g}")
        if g == 0:  # before any re-evaluation: a task that cannot measure fitness stops the search here
            self.check_seeds_ran(pop, evals)
        if not (self.cfg.reeval_seeds and self.cfg.reeval_top):
            return
        seeds = range(1 + self.cfg.reeval_seeds)
        while True:
            best = sorted(dict.fromkeys(pop), key=lambda t: -self.fitness(t, evals))[: self.cfg.reeval_top]
            todo = [t for t in best if not self.evaluated(t, seeds, evals)]
            if not todo:
                return
            self.evaluate(todo, seeds, evals, run, f"generation {g} elites")

    def check_seeds_ran(self, seeds: list[str], evals: dict) -> None:
        """ConfigError when every seed function failed on one task: the seeds are the hand-made
        metrics, so the task itself cannot measure fitness (a time limit too short, calibration
        data of one class, ...) and every function of the search would score 0 on it."""
        for task in self.tasks:
            results = [evals[self.job(text, task, 0).key] for text in dict.fromkeys(seeds)]
            if results and all(r.get("error") for r in results):
                raise ConfigError(f"task {task!r} cannot measure fitness: every seed function failed on it, the "
                                  f"first with {results[0]['error']}; fix the task's settings (nothing was searched)")

    def evaluated(self, text: str, seeds: range, evals: dict) -> bool:
        return all(self.job(text, t, s).key in evals for t in self.tasks for s in seeds)

    def record(self, state: SearchState) -> None:
        fits = [self.fitness(t, state.evaluations) for t in state.population]
        pool = dict.fromkeys(state.hall_of_fame + state.population)
        state.hall_of_fame = sorted(pool, key=lambda t: -self.fitness(t, state.evaluations))[:HALL_OF_FAME]
        state.history.append({"generation": state.generation, "best": max(fits), "mean": float(np.mean(fits)),
                              "median": float(np.median(fits)), "best_text": state.hall_of_fame[0],
                              "evaluations": len(state.evaluations)})
        save_checkpoint(self.run_dir, state, self.cfg, fits, self.dense_sha256)


def save_checkpoint(run_dir: Path, state: SearchState, cfg: EvolveConfig, fits: list[float],
                    dense_sha256: dict[str, str] | None = None) -> Path:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    py_state = random.getstate()
    np_state = np.random.get_state()
    data = {"generation": state.generation, "config": cfg.search_dict(), "population": state.population,
            "fitness": fits, "hall_of_fame": state.hall_of_fame, "history": state.history,
            "evaluations": state.evaluations,
            "random_state": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_state": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
            "dense_sha256": dense_sha256 or {}}
    path = folder / f"gen_{state.generation:03d}.json"
    atomic_write_text(path, json.dumps(data, indent=1))
    return path


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def load_checkpoint(run_dir: Path, cfg: EvolveConfig, dense: dict[str, str] | None = None,
                    dense_sha256: dict[str, str] | None = None) -> SearchState | None:
    """The search state of the newest checkpoint, or None without one. `dense` and `dense_sha256`
    ({task: path}, {task: sha256}): the dense models the search goes on with, which must be the
    ones the checkpoint's fitness came from."""
    files = sorted((run_dir / "checkpoints").glob("gen_*.json"), key=_generation_of)
    if not files:
        return None
    data = read_json(files[-1], "search checkpoint", "delete it to resume from the one before")
    if not isinstance(data, dict) or "config" not in data:
        raise CheckpointError(f"{files[-1]} is damaged: it is not a search checkpoint; delete it to resume from the one before")
    if data["config"] != json.loads(json.dumps(cfg.search_dict())):
        raise CheckpointError(f"{run_dir} was searched with other settings; resume with the same recipe "
                              "or start a new run directory")
    _check_same_dense(files[-1], data.get("dense_sha256", {}), dense or {}, dense_sha256 or {})  # absent: older file
    try:
        wrong = _state_error(data)
    except KeyError as err:
        wrong = f"it has no {err}"
    if wrong:
        raise CheckpointError(f"{files[-1]} is damaged: {wrong}; delete it to resume from the one before")
    try:
        for text in data["population"] + data["hall_of_fame"]:
            parse_expression(text)  # checkpoint text is parsed like any other text
        v, internal, gauss = data["random_state"]
        name, keys, pos, has_gauss, cached = data["numpy_state"]
        random.setstate((v, tuple(internal), gauss))
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except ConfigError as err:
        raise CheckpointError(f"{files[-1]} holds an invalid function ({err}); delete it to resume from the "
                              "one before") from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as err:
        raise CheckpointError(f"{files[-1]} is damaged ({type(err).__name__}: {err}); delete it to resume from "
                              "the one before") from None
    return SearchState(data["generation"], data["population"], data["evaluations"], data["hall_of_fame"],
                       data["history"])


def _check_same_dense(path: Path, saved: object, dense: dict[str, str], dense_sha256: dict[str, str]) -> None:
    """CheckpointError when a task's dense model is not the file the saved fitness was measured on
    (replaced, retrained, edited): old and new evaluations would be ranked together."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is damaged: dense_sha256 is not a mapping; delete it to resume from the "
                              "one before")
    for task, digest in dense_sha256.items():
        if task in saved and saved[task] != digest:
            raise CheckpointError(f"the dense model of task {task!r} ({dense.get(task)}) is not the one this search "
                                  f"measured its functions on (its contents changed since {path.name}); put that file "
                                  "back, or start a new run directory to search on the new one")


def _generation_of(path: Path) -> tuple[int, str]:
    """gen_1000.json after gen_999.json (their names sort the other way)."""
    number = path.stem.removeprefix("gen_")
    return (int(number) if number.isdigit() else -1, path.name)


def evaluations_ok(evaluations) -> bool:
    """Whether saved evaluations are {job key: result} with an accuracy in [0, 1] in every result."""
    acc = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
    return isinstance(evaluations, dict) and all(isinstance(r, dict) and acc(r.get("acc")) for r in evaluations.values())


def _state_error(data: dict) -> str:
    """What is wrong with the form of a checkpoint's search state ("" when nothing is)."""
    checks = [
        (isinstance(data["generation"], int) and not isinstance(data["generation"], bool) and data["generation"] >= 0,
         "generation is not an integer >= 0"),
        (isinstance(data["population"], list) and data["population"], "the population is not a non-empty list"),
        (isinstance(data["hall_of_fame"], list) and data["hall_of_fame"], "the hall of fame is not a non-empty list"),
        (evaluations_ok(data["evaluations"]),
         "evaluations is not a mapping of results with an accuracy in [0, 1]"),
        (isinstance(data["history"], list) and all(_history_ok(h) for h in data["history"]),
         "history is not a list of records (generation, best, mean, median, best_text, evaluations)"),
        (not isinstance(data["history"], list) or not isinstance(data["generation"], int)
         or [h.get("generation") if isinstance(h, dict) else None for h in data["history"]]
         == list(range(data["generation"] + 1)),
         "history does not hold one record per generation up to the checkpoint's"),
    ]
    return next((why for ok, why in checks if not ok), "")


def _history_ok(record) -> bool:
    """Whether one history record has the fields the report and the plot read, of their types."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return (isinstance(record, dict) and count(record.get("generation")) and count(record.get("evaluations"))
            and all(number(record.get(k)) for k in ("best", "mean", "median"))
            and isinstance(record.get("best_text"), str))


def check_tasks(cfg: EvolveConfig) -> None:
    """ConfigError for a task whose model, data settings, data path or dense weights cannot be
    used, or for executor='ray' without Ray installed, before anything is trained: a search would
    otherwise fail only on reaching that task, or after training the dense models."""
    import importlib.util

    from ..data import DataConfig
    from ..graph.groups import check_ignore
    from ..models import create_model, get_model_spec

    if cfg.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor='ray' needs Ray: pip install 'prunekit[distributed]', or use executor='process'")
    for task in cfg.tasks:
        where = f"task {task.name!r}"
        try:
            get_model_spec(task.model)
            data = DataConfig(**task.data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        except TypeError as err:  # an unknown data key
            raise ConfigError(f"{where}: data: {err}") from None
        if data.root is not None and not Path(data.root).expanduser().exists():
            raise ConfigError(f"{where}: data.root {data.root!r} does not exist (relative paths start in "
                              f"{Path.cwd()}); give the dataset's path")
        if task.init is not None and not Path(task.init).expanduser().is_file():
            raise ConfigError(f"{where}: init {task.init!r} is not a file; give trained dense weights "
                              "(.safetensors) or leave init unset to train them")
        try:  # the model's keywords and the ignore list, before a dense model trains for them
            check_ignore(create_model(task.model, **task.model_kwargs), task.ignore)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def dense_settings(task) -> dict:
    """What shapes a task's trained dense model (model, data, dense_train; not where the data lives)."""
    data = {k: v for k, v in task.data.items() if k not in ("root", "num_workers")}
    return json.loads(json.dumps({"model": task.model, "model_kwargs": task.model_kwargs, "data": data,
                                  "dense_train": task.dense_train.to_dict()}, default=str))


def _check_dense_settings(path: Path, info: Path, settings: dict) -> None:
    """CheckpointError when the dense model at `path` was trained with other settings than the
    task now gives (its .json beside it says which; a file without them is taken as it is)."""
    if not info.exists():
        return
    recorded = read_json(info, "dense model record", f"remove it and {path.name} to train again", mapping=True).get("settings")
    if recorded is None or recorded == settings:
        return
    keys = sorted(k for k in settings if recorded.get(k) != settings[k])
    raise CheckpointError(f"{path} was trained with other {', '.join(keys)} than the task now gives; remove {path} "
                          f"and {info} to train it again, or run with the settings it was trained with")


def prepare_dense(cfg: EvolveConfig, run_dir: Path, echo: Callable[[str], None] = lambda s: None) -> dict[str, str]:
    """task -> trained dense weights: the task's `init`, else trained once into run_dir/dense/."""
    paths = {}
    for task in cfg.tasks:
        if task.init is not None:
            paths[task.name] = str(Path(task.init).expanduser())
            continue
        path, info = run_dir / "dense" / f"{task.name}.safetensors", run_dir / "dense" / f"{task.name}.json"
        settings = dense_settings(task)
        if path.exists():
            _check_dense_settings(path, info, settings)
        else:
            echo(f"training the dense {task.model} of task {task.name} ({task.dense_train.epochs} epoch{'' if task.dense_train.epochs == 1 else 's'})")
            acc = train_dense(task, path, cfg.device)
            atomic_write_text(info, json.dumps({"val_acc": acc, "settings": settings}))
        paths[task.name] = str(path)
    return paths


def run_search(cfg: EvolveConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
               on_generation: Callable[[SearchState], None] | None = None,
               echo: Callable[[str], None] = lambda s: None) -> SearchState:
    """Run (or resume) the evolution; returns the final state (hall_of_fame[0] is the best text)."""
    run_dir = Path(run_dir)
    check_tasks(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_writable(run_dir)  # before any generation is measured that could not be saved
    if not resume and any((run_dir / "checkpoints").glob("gen_*.json")):
        raise ConfigError(f"{run_dir} holds the checkpoints of a search; resume it (resume=True, or prunekit evolve "
                          "--resume) or give a new run directory")
    # the executor first: a Ray cluster that cannot be joined is said before any dense model trains
    with hold_dir(run_dir, "evolution"), \
            create_executor(cfg.executor, cfg.workers, cfg.ray_address, cfg.num_cpus, cfg.num_gpus) as run:
        dense = prepare_dense(cfg, run_dir, echo)
        digests = {task: file_digest(path) for task, path in dense.items()}  # before generation 0 is measured
        search = Search(cfg, run_dir, dense, progress, digests)
        state = load_checkpoint(run_dir, cfg, dense, digests) if resume else None
        if state is None:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            seeds = list(SEEDS.values())
            pop = [expression_text(parse_expression(seeds[i % len(seeds)])) for i in range(cfg.population)]
            state = SearchState(0, pop, {}, [], [])
            search.evaluate_population(pop, state.evaluations, run, 0)
            search.record(state)
            _notify(on_generation, state, echo)
        while state.generation < cfg.generations:
            g = state.generation + 1
            ranked = [individual(t) for t in state.population]
            for ind in ranked:
                ind.fitness.values = (search.fitness(str(ind), state.evaluations),)
            parents = tools.selBest(ranked, cfg.parents)
            children = vary(parents, cfg.population - cfg.parents, cfg)
            pop = [expression_text(t) for t in parents + children]
            search.evaluate_population(pop, state.evaluations, run, g)
            state.generation, state.population = g, pop
            search.record(state)
            _notify(on_generation, state, echo)
    return state


def _notify(on_generation, state: SearchState, echo) -> None:
    h = state.history[-1]
    echo(f"generation {h['generation']}: best {h['best']:.4f}, mean {h['mean']:.4f} ({h['evaluations']} evaluations)")
    if on_generation is not None:
        on_generation(state)
