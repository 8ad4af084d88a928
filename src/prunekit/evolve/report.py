"""After a search: re-evaluate the best functions (and the seeds, for comparison) with fresh
seeds, and write the run directory's functions, plot and report.

Files written into the run directory:
    best.txt                 the best function as text (criterion "evolved:<text>", or
                             "evolved:samples=<n>:<text>" after a search with calib_samples=n)
    functions.json           hall of fame: text, readable formula, search fitness
    reevaluation.json        mean/std accuracy per task over fresh seeds, best functions and seeds
    fitness.png              best/median/mean fitness per generation
    report.md                all of the above as a readable page
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..core.errors import CheckpointError, read_json
from ..core.integrity import atomic_write_text
from ..importance.evolved.space import SEEDS
from ..importance.evolved.text import expression_text, formula, parse_expression
from ..importance.evolved.tree_eval import criterion_spec
from .config import EvolveConfig
from .fitness import fitness_of
from .jobs import create_executor
from .search import Search, SearchState, evaluations_ok, prepare_dense

REEVAL_SEED_BASE = 1000  # fresh seeds: never used by the search (it uses 0..reeval_seeds)


def reevaluate(cfg: EvolveConfig, run_dir: Path, texts: dict[str, str], seeds: int, progress: bool = True) -> list[dict]:
    """label -> text evaluated on every task with `seeds` fresh fine-tune seeds; rows sorted by fitness."""
    search = Search(cfg, run_dir, prepare_dense(cfg, run_dir), progress)
    saved = run_dir / "checkpoints" / "reevaluation.json"
    evals = load_reevaluations(saved, cfg)
    fresh = range(REEVAL_SEED_BASE, REEVAL_SEED_BASE + seeds)
    with create_executor(cfg.executor, cfg.workers, cfg.ray_address, cfg.num_cpus, cfg.num_gpus) as run:
        todo = [t for t in dict.fromkeys(texts.values()) if not search.evaluated(t, fresh, evals)]
        # saved after each call, which takes enough functions to keep every worker busy: a resumed
        # run redoes only the call it was stopped in
        per_call = max(1, math.ceil(cfg.workers / max(1, len(search.tasks) * seeds)))
        for start in range(0, len(todo), per_call):
            search.evaluate(todo[start:start + per_call], fresh, evals, run,
                            f"re-evaluation {min(start + per_call, len(todo))}/{len(todo)}")
            atomic_write_text(saved, json.dumps({"config": cfg.search_dict(), "evaluations": evals}, indent=1))
    rows = []
    for label, text in texts.items():
        accs = {t: [evals[search.job(text, t, REEVAL_SEED_BASE + s).key]["acc"] for s in range(seeds)]
                for t in search.tasks}
        rows.append({"label": label, "text": text, "formula": formula(parse_expression(text)),
                     "fitness": fitness_of(accs, {t: c.weight for t, c in search.tasks.items()}),
                     "tasks": {t: {"mean": statistics.fmean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0,
                                   "accs": a} for t, a in accs.items()}})
    return sorted(rows, key=lambda r: -r["fitness"])


def load_reevaluations(path: Path, cfg: EvolveConfig) -> dict:
    """The re-evaluation results saved in `path` by a run with these settings; {} when there are none."""
    if not path.is_file():
        return {}
    data = read_json(path, "re-evaluation checkpoint", "delete it to re-evaluate from the start")
    if not isinstance(data, dict) or data.get("config") != json.loads(json.dumps(cfg.search_dict())):
        raise CheckpointError(f"{path} was written with other settings; resume with the same recipe, or delete "
                              "it to re-evaluate from the start")
    if not evaluations_ok(data.get("evaluations")):
        raise CheckpointError(f"{path} is damaged: its evaluations are not results with an accuracy in [0, 1]; "
                              "delete it to re-evaluate from the start")
    return data["evaluations"]


def plot_fitness(path: Path, history: list[dict]) -> Path:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    gens = [h["generation"] for h in history]
    for key, style in (("best", "o-"), ("median", "s--"), ("mean", "^:")):
        ax.plot(gens, [h[key] for h in history], style, label=key)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (geometric mean of val accuracy)")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def counted(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def write_run(run_dir: Path, cfg: EvolveConfig, state: SearchState, reeval: list[dict]) -> Path:
    """Write best.txt, functions.json, reevaluation.json, fitness.png and report.md; returns the report."""
    search = Search(cfg, run_dir, {t.name: "" for t in cfg.tasks}, False)
    hof = [{"text": t, "formula": formula(parse_expression(t)), "fitness": search.fitness(t, state.evaluations)}
           for t in state.hall_of_fame]
    atomic_write_text(run_dir / "best.txt", hof[0]["text"] + "\n")
    atomic_write_text(run_dir / "functions.json", json.dumps(hof, indent=1))
    atomic_write_text(run_dir / "reevaluation.json", json.dumps(reeval, indent=1))
    plot_fitness(run_dir / "fitness.png", state.history)
    bred = len(state.history) - 1  # generation 0 is the initial population, then `bred` more
    generations = f"generations 0-{bred}: the initial population and {bred} bred from it" if bred else "generation 0 only"
    lines = [f"# Evolved pruning functions ({generations}, population {cfg.population})", "",
             "Fitness: weighted geometric mean over tasks of the validation accuracy after pruning and fine-tuning.",
             "Tasks: " + "; ".join(f"{t.name} ({t.model} on {t.data['name']}, remove {t.prune_ratio:.0%} of every "
                                   f"group, fine-tune {counted(t.finetune.epochs, 'epoch')})" for t in cfg.tasks), "",
             "![fitness per generation](fitness.png)", "", "## Hall of fame (search fitness)", "",
             "| # | fitness | formula |", "|---|---|---|"]
    lines += [f"| {i + 1} | {h['fitness']:.4f} | `{_table_code(h['formula'])}` |" for i, h in enumerate(hof)]
    lines += ["", f"Best as text: `{hof[0]['text']}`; as the criterion that scores as this search did: "
              + best_criteria(cfg, hof[0]["text"]), ""]
    if reeval:
        n = len(next(iter(reeval[0]["tasks"].values()))["accs"])
        spread = n > 1  # one seed has no spread to show
        lines += [f"## Re-evaluated with {counted(n, 'fresh seed')} ({'mean ± std of ' if spread else ''}val accuracy)", "",
                  "| function | fitness | " + " | ".join(t.name for t in cfg.tasks) + " |",
                  "|---|---|" + "---|" * len(cfg.tasks)]
        for r in reeval:
            cells = " | ".join(f"{100 * r['tasks'][t.name]['mean']:.2f}"
                               + (f" ± {100 * r['tasks'][t.name]['std']:.2f}" if spread else "") for t in cfg.tasks)
            lines.append(f"| {r['label']} | {r['fitness']:.4f} | {cells} |")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def best_criteria(cfg: EvolveConfig, text: str) -> str:
    """`evolved:...` for `text` reading as many calibration images as the search's tasks did (one
    spec, or one per task when their calib_samples differ)."""
    specs = {t.name: criterion_spec(text, t.calib_samples) for t in cfg.tasks}
    if len(set(specs.values())) == 1:
        return f"`{next(iter(specs.values()))}`"
    return "; ".join(f"for {name}, `{spec}`" for name, spec in specs.items())


def _table_code(text: str) -> str:
    """Code for a Markdown table cell: a pipe (|x| is abs) would end the cell even inside backticks;
    escaped, GitHub shows it as written."""
    return text.replace("|", "\\|")


def comparison_set(state: SearchState, top: int) -> dict[str, str]:
    """The best `top` evolved functions plus the seven seeds (their labels say which is which)."""
    seeds = {expression_text(parse_expression(text)): name.removeprefix("seed_") for name, text in SEEDS.items()}
    out = {}
    for i, text in enumerate(state.hall_of_fame[:top]):
        out[f"evolved #{i + 1}" + (f" (= seed {seeds[text]})" if text in seeds else "")] = text
    for text, name in seeds.items():
        if text not in out.values():
            out[f"seed {name}"] = text
    return out
