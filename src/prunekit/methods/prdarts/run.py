"""A search recipe end to end: data -> search -> derived cell trained at the density -> report.

`SearchRecipe` holds the typed sections (`data`: DataConfig with val_fraction as the alpha
split, `search`: PRDartsConfig, `evaluate`: EvalRecipe); `run_search(recipe, run_dir)` writes:
    recipe.json              the resolved recipe
    genotypes/<phase>_<epoch>.json, genotype.json   each epoch's derived cell, and the final one
    alphas.jsonl, alphas.png the alphas of each epoch and their mean softmax per op
    search_log.jsonl         the engine's per-epoch records (entropy, parameter-free share, ...)
    network.safetensors      the evaluation network trained at the density (weights + masks,
                             genotype as JSON inside), when evaluate.enabled
    ckpt/search/, ckpt/evaluate/   each phase's checkpoint (<phase>/last.pt, written every epoch)
                             and the settings it was started with (settings.json)
    ckpt/recipe.json         the recipe as the search started: a resume refuses another recipe
                             (device and threads aside; the evaluation's until it begins)
    result.json, report.md   accuracy, nonzeros, MACs, latency, and what is (not) claimed
A run stopped before result.json (Ctrl-C, SIGKILL) continues with `run_search(..., resume=True)`
(`prunekit resume <run>`): finished phases are read back, the phase in progress continues after
its last saved epoch, and on CPU the result equals that of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...core.config import Config, check_range
from ...core.errors import CheckpointError, ConfigError, ConfigSchemaError, read_json
from ...core.integrity import atomic_write_text, claim_dir, hold_dir
from ...data.config import DataConfig
from ...data.subsets import FirstBatches, random_batches
from .checkpoints import alpha_row_ok, read_lines
from .config import PRDartsConfig
from .genotype import REFERENCE_GENOTYPES, Genotype, alpha_entropy
from .ops import PRIMITIVES

RECIPE_COPY = "ckpt/recipe.json"  # relative to the run directory: the recipe as the search started


@dataclasses.dataclass
class EvalRecipe(Config):
    """How the derived cell is evaluated: network size, density, the three training phases,
    DARTS's regularisers (auxiliary 0.4, drop path 0.2, cutout 16 in the paper setting)."""

    enabled: bool = True
    genotype: str = "searched"  # or a reference: darts_v2, dass
    channels: int = 16
    layers: int = 8
    auxiliary: bool = True
    density: float | None = None  # None: the search's density
    dense_epochs: int = 10
    score_epochs: int = 5
    finetune_epochs: int = 10
    lr: float = 0.025
    score_lr: float = 0.1
    weight_decay: float = 3e-4
    aux_weight: float = 0.4
    drop_path: float = 0.2
    cutout: int = 16
    latency_repeats: int = 30

    def validate(self) -> None:
        if self.genotype != "searched" and self.genotype not in REFERENCE_GENOTYPES:
            raise ConfigError(f"evaluate.genotype={self.genotype!r}; use 'searched' or one of "
                              f"{', '.join(REFERENCE_GENOTYPES)}")
        if self.density is not None:
            check_range("evaluate.density", self.density, 0.0, 1.0, lo_open=True)
        for name in ("channels", "layers", "dense_epochs", "score_epochs", "finetune_epochs", "cutout",
                     "latency_repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"evaluate.{name}={v!r} must be an integer >= 0")
        for name, low in (("channels", 1), ("layers", 3), ("latency_repeats", 1)):
            if getattr(self, name) < low:
                why = " (DARTS places its reductions at layers//3 and 2*layers//3)" if name == "layers" else ""
                raise ConfigError(f"evaluate.{name}={getattr(self, name)} must be >= {low}{why}")
        for name in ("lr", "score_lr"):
            check_range(f"evaluate.{name}", getattr(self, name), 0.0, math.inf, lo_open=True)
        for name in ("weight_decay", "aux_weight"):
            check_range(f"evaluate.{name}", getattr(self, name), 0.0, math.inf)
        check_range("evaluate.drop_path", self.drop_path, 0.0, 1.0)

    def check_input(self, input_shape: Sequence[int], num_classes: int) -> None:
        """ConfigError unless the evaluation network runs on (C, H, W) inputs: checked on a narrow
        network of the reference cell before the search (every cell changes the size alike)."""
        from .evalnet import EvalNetwork

        if not self.enabled:
            return
        h, w = (int(d) for d in input_shape[-2:])
        if self.cutout and self.cutout // 2 >= h and self.cutout // 2 >= w:  # rows cy-half..cy+half-1 cover all
            raise ConfigError(f"evaluate.cutout={self.cutout} blanks the whole of every {h}x{w} training image (its "
                              f"square reaches {self.cutout // 2} pixels each way from any centre); DARTS's 16 is "
                              f"for 32x32 images: give about half the image side (evaluate.cutout={max(1, min(h, w) // 2)}) "
                              "or 0 to turn it off")
        net = EvalNetwork(REFERENCE_GENOTYPES["darts_v2"], 2, num_classes, self.layers, self.auxiliary,
                          int(input_shape[0])).train()
        try:
            with torch.no_grad():
                net(torch.zeros(2, *input_shape))
        except RuntimeError as err:
            hint = ("; set evaluate.auxiliary=false (DARTS's auxiliary head expects 32x32 images)"
                    if self.auxiliary else "")
            raise ConfigError(f"the evaluation network does not run on {tuple(input_shape)} inputs "
                              f"({str(err).splitlines()[0][:160]}){hint}") from None


@dataclasses.dataclass
class SearchRecipe(Config):
    data: DataConfig
    search: PRDartsConfig = dataclasses.field(default_factory=PRDartsConfig)
    evaluate: EvalRecipe = dataclasses.field(default_factory=EvalRecipe)
    device: str = "cpu"
    threads: int | None = None
    limit_eval_batches: int | None = None  # cap on the val (alpha) and test batches used per pass

    def validate(self) -> None:
        if self.limit_eval_batches is not None and (isinstance(self.limit_eval_batches, bool) or
                                                    not isinstance(self.limit_eval_batches, int) or
                                                    self.limit_eval_batches < 1):
            raise ConfigError(f"limit_eval_batches={self.limit_eval_batches!r} must be an integer >= 1 or null")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r} must be an integer >= 1 or null (torch's default)")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} must be 'cpu' or 'cuda[:index]'")
        if self.data.val_fraction <= 0:
            raise ConfigError("data.val_fraction must be > 0: the validation split trains alpha (DARTS uses 0.5)")
        ev = self.evaluate
        density = ev.density if ev.density is not None else self.search.density
        if ev.enabled and density >= 1 and ev.score_epochs > 0:
            raise ConfigError(f"the evaluation network trains at density {density}, which keeps every weight, so "
                              f"evaluate.score_epochs={ev.score_epochs} has no scores to train; set "
                              "evaluate.score_epochs=0 or evaluate.density below 1")


def _alpha_plot(run_dir: Path) -> Path | None:
    from ...report.plots import plot_alpha_history

    path = run_dir / "alphas.jsonl"
    if not path.exists():
        return None
    rows = [row for row in map(_json_or_none, read_lines(path)) if alpha_row_ok(row)]
    if not rows:
        return None
    labels = [f"{r['phase']}:{r['phase_epoch']}" for r in rows]
    mass = {cell: [torch.tensor(r[f"alpha_{cell}"]).softmax(-1).mean(0).tolist() for r in rows]
            for cell in ("normal", "reduce")}
    return plot_alpha_history(run_dir / "alphas.png", labels, mass, PRIMITIVES)


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _evaluate(recipe: SearchRecipe, genotype: Genotype, bundle: Any, run_dir: Path,
              progress: bool = False, resume: bool = False) -> dict[str, Any]:
    from ...data.augment import CutoutLoader
    from ...engine.evaluate import evaluate
    from .evalnet import EvalNetwork
    from ...layers.sparse import sparse_layers
    from .network import EvalSchedule, network_report, save_network, train_at_density

    ev = recipe.evaluate
    density = ev.density if ev.density is not None else recipe.search.density
    torch.manual_seed(recipe.search.seed)
    net = EvalNetwork(genotype, ev.channels, bundle.num_classes, ev.layers, ev.auxiliary, bundle.input_shape[0])
    train = CutoutLoader(bundle.train, ev.cutout, recipe.data.seed) if ev.cutout else bundle.train
    schedule = EvalSchedule(ev.dense_epochs, ev.score_epochs, ev.finetune_epochs, ev.lr, ev.score_lr,
                            weight_decay=ev.weight_decay, aux_weight=ev.aux_weight, drop_path=ev.drop_path,
                            seed=recipe.search.seed)
    history = train_at_density(net, density, train, bundle.val, schedule, device=recipe.device, progress=progress,
                               ckpt_dir=run_dir / "ckpt" / "evaluate", resume=resume)
    test = evaluate(net, bundle.test, torch.device(recipe.device))
    example = torch.zeros(1, *bundle.input_shape)
    save_network(net.cpu(), run_dir / "network.safetensors", example)
    report = network_report(net, example, device="cpu", repeats=ev.latency_repeats)
    raised = sum(1 for _, m in sparse_layers(net) if density * m.weight.numel() < 0.5)  # kept at one weight
    return {"density": density, "history": history, "test": test, "cost": report, "layers_at_one_weight": raised}


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_search`; `run_dir` is the directory to resume."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def run_search(recipe: SearchRecipe, run_dir: str | Path, progress: bool = False, explicit: bool = True,
               echo: Callable[[str], None] | None = None, resume: bool = False) -> dict[str, Any]:
    """Search, evaluate and write the run directory (see the module docstring); returns result.json,
    whose "run_dir" is the directory used. `run_dir` is claimed for this run alone (`claim_dir`):
    an `explicit` path may be empty but not another run's; a default name that is taken gets a
    suffix (-2, -3, ...). `progress` shows a bar per training epoch; `echo` (e.g. print) gets one
    line as each phase starts and ends. With `resume=True` the search in `run_dir` (see
    `resumable_search`) continues from its checkpoints. Ctrl-C raises `SearchInterrupted`."""
    say = echo or (lambda line: None)
    from ...data import load_data

    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={recipe.device!r} but CUDA is not available here; use device=cpu")
    data_device = str(getattr(recipe.data, "device", "cpu") or "cpu")
    if data_device.startswith("cuda") and not torch.cuda.is_available():  # the CIFAR recipe sets both
        raise ConfigError(f"data.device={data_device!r} (where the batches are put) but CUDA is not available here; "
                          "use data.device=cpu")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    bundle = load_data(recipe.data)  # a missing or unreadable dataset fails before any file is written
    recipe.evaluate.check_input(bundle.input_shape, bundle.num_classes)  # so does an input it cannot take
    if resume:
        run_dir = Path(run_dir)
        check_recipe_unchanged(run_dir, recipe.to_dict(), "the recipe given")
    else:
        run_dir = claim_dir(run_dir, "recipe.json", json.dumps(recipe.to_dict(), indent=1), explicit)
        (run_dir / "ckpt").mkdir(exist_ok=True)  # a resume refuses a recipe.json edited since (any section)
        atomic_write_text(run_dir / RECIPE_COPY, json.dumps(recipe.to_dict(), indent=1))
        say(f"run directory: {run_dir}")
    try:
        with hold_dir(run_dir, "search"):
            return _search_and_evaluate(recipe, bundle, run_dir, progress, say, resume)
    except KeyboardInterrupt:
        raise SearchInterrupted(run_dir) from None


def _search_and_evaluate(recipe: SearchRecipe, bundle: Any, run_dir: Path, progress: bool,
                         say: Callable[[str], None], resume: bool) -> dict[str, Any]:
    from .search import search

    alpha_split = bundle.val  # the architect cycles all of it; evaluations see the first batches
    bundle.val = FirstBatches(bundle.val, recipe.limit_eval_batches)
    bundle.test = random_batches(bundle.test, recipe.limit_eval_batches, recipe.data.seed)
    cfg = recipe.search
    say(f"searching on {recipe.device}: {cfg.pretrain_epochs} dense + {cfg.score_epochs} score + "
        f"{cfg.finetune_epochs} finetune epochs at density {cfg.density}")
    found = search(recipe.search, bundle.train, alpha_split, bundle.num_classes, bundle.input_shape[0],
                   device=recipe.device, out_dir=run_dir, progress=progress, eval_loader=bundle.val,
                   ckpt_dir=run_dir / "ckpt" / "search", resume=resume)
    # summed over the epochs (each checkpoint keeps its epochs' records): a resumed search counts
    # the time of every process, not only the last
    search_time = sum(float(h.get("epoch_time_s", 0.0)) for h in found.history)
    result: dict[str, Any] = {"genotype": found.genotype.to_dict(), "search_time_s": search_time,
                              "search_history": found.history, "supernet_nonzeros": found.nonzeros,
                              "alpha_entropy_final": {"normal": alpha_entropy(found.supernet.alpha_normal),
                                                      "reduce": alpha_entropy(found.supernet.alpha_reduce)},
                              "param_free_share": found.genotype.parameter_free_share(),
                              "device": recipe.device, "torch": torch.__version__, "run_dir": str(run_dir)}
    _alpha_plot(run_dir)
    say(f"searched in {result['search_time_s']:.0f} s; genotype written to {run_dir / 'genotype.json'}")
    if recipe.evaluate.enabled:
        ev = recipe.evaluate
        geno = found.genotype if ev.genotype == "searched" else REFERENCE_GENOTYPES[ev.genotype]
        say(f"evaluating the {ev.genotype} cell: {ev.dense_epochs} dense + {ev.score_epochs} score + "
            f"{ev.finetune_epochs} finetune epochs")
        result["evaluation"] = _evaluate(recipe, geno, bundle, run_dir, progress, resume)
        result["evaluation"]["cell"] = ev.genotype  # "searched", or the reference cell evaluated instead
        result["evaluation"]["genotype"] = geno.to_dict()
        say(f"test accuracy {result['evaluation']['test']['acc']:.4f}")
    atomic_write_text(run_dir / "report.md", render_report(result))  # result.json last: it marks the run finished
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1, default=str))
    return result


def resumable_search(run_dir: str | Path) -> SearchRecipe:
    """The recipe of a search run directory that can be resumed; ConfigError saying why not
    (not a search's directory, or one that finished)."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.json"
    if not run_dir.is_dir() or not path.is_file():
        raise ConfigError(f"{run_dir} is not a search run directory (no recipe.json); give the directory "
                          "`prunekit search` wrote")
    raw = read_json(path, "search recipe", "the search cannot be resumed", ConfigError, mapping=True)
    if "search" not in raw:
        raise ConfigError(f"{path} is not a search recipe (no 'search' section); the run cannot be resumed")
    if (run_dir / "result.json").is_file():
        raise ConfigError(f"run {run_dir} already finished; nothing to resume (see its report.md)")
    check_recipe_unchanged(run_dir, raw, str(path))
    try:
        return SearchRecipe.from_dict(raw)
    except ConfigSchemaError as err:  # written by another prunekit: not damage
        raise ConfigError(f"{path}: {err}; resume it with the prunekit that started the search") from None
    except ConfigError as err:
        raise ConfigError(f"{path} is damaged ({err}); the search cannot be resumed: start it again with "
                          "`prunekit search`") from None


# where the batches are made and how many threads run them: no result depends on these
_FREE_TO_CHANGE = ("device", "threads", "data.device", "data.num_workers")


def check_recipe_unchanged(run_dir: Path, now: dict[str, Any], what: str) -> None:
    """ConfigError when `now` (a recipe as a dict) differs from the recipe the search in `run_dir`
    started with (its ckpt/recipe.json) in a setting its finished epochs depend on. The evaluation's
    settings are free until the evaluation begins (then its checkpoints guard its schedule). Run
    directories from before that copy was kept are not checked here."""
    first = run_dir / RECIPE_COPY
    if not first.is_file():
        return
    started = read_json(first, "search recipe copy", "the search cannot be resumed", ConfigError, mapping=True)
    evaluating = (run_dir / "ckpt" / "evaluate").is_dir()
    changed = [(k, a, b) for k, a, b in recipe_differences(started, now)
               if k not in _FREE_TO_CHANGE and (evaluating or not k.startswith("evaluate."))]
    if changed:
        pairs = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in changed[:6])
        raise ConfigError(f"{what} differs from the recipe the search started with ({pairs}); its finished epochs ran "
                          "with that recipe (another data split would move images between the weight and the alpha "
                          "batches mid-search): put it back as it was, or start a new search with the change")


def recipe_differences(run: Any, now: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, run's value, now's value) for every leaf where two recipe dicts differ (lists
    and tuples compare alike)."""
    if isinstance(run, dict) and isinstance(now, dict):
        return [d for k in sorted(set(run) | set(now), key=str)
                for d in recipe_differences(run.get(k), now.get(k), f"{where}.{k}" if where else str(k))]
    run, now = _listed(run), _listed(now)
    return [] if run == now else [(where, run, now)]


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, (list, tuple)) else value


def saved_phases(recipe: SearchRecipe, run_dir: str | Path) -> tuple[list[str], list[str]]:
    """(finished phases, phases still to do) of a search run directory, as its checkpoints say
    ("search pretrain", ..., "evaluate finetune"); CheckpointError for a damaged one."""
    from .checkpoints import saved_epochs
    from .network import EVAL_PHASES
    from .search import PHASES

    cfg, ev = recipe.search, recipe.evaluate
    parts = [("search", PHASES, (cfg.pretrain_epochs, cfg.score_epochs, cfg.finetune_epochs))]
    if ev.enabled:
        parts.append(("evaluate", EVAL_PHASES, (ev.dense_epochs, ev.score_epochs, ev.finetune_epochs)))
    done, todo = [], []
    for part, phases, epochs in parts:
        saved = saved_epochs(Path(run_dir) / "ckpt" / part, phases, epochs)
        for phase, n in zip(phases, epochs):
            if n:
                (done if saved[phase] == n else todo).append(f"{part} {phase}")
    return done, todo


def rewrite_search_report(run_dir: str | Path) -> list[Path]:
    """report.md (and alphas.png) of a finished search run written again from its result.json;
    CheckpointError for a result.json that is not a search's."""
    run_dir = Path(run_dir)
    result = read_json(run_dir / "result.json", "search result", "the report cannot be written", CheckpointError,
                       mapping=True)
    try:
        text = render_report(result)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{run_dir / 'result.json'} is not a complete search result ({type(err).__name__}: "
                              f"{err}); its report.md was left as it was") from None
    atomic_write_text(run_dir / "report.md", text)
    plot = _alpha_plot(run_dir)
    return [run_dir / "report.md"] + ([plot] if plot is not None else [])


def _density_note(ev: dict[str, Any]) -> str:
    """What the report adds when layers hold more weights than the density asks: every masked
    layer keeps at least one, so a density below 1/numel of a layer is raised there."""
    raised = ev.get("layers_at_one_weight") or 0
    if not raised:
        return ""
    return (f"; {raised} masked layer(s) keep one weight where density {ev['density']} would keep none, so the "
            "network holds more weights than the density asks")


def render_report(result: dict[str, Any]) -> str:
    g = result["genotype"]
    lines = ["# PR-DARTS search", "", f"Device: {result['device']}, torch {result['torch']}; search "
             f"{result['search_time_s']:.0f} s (its epochs, summed over every resume).", "", "## Derived cell", "",
             f"- normal: {', '.join(f'{op}<-{j}' for op, j in g['normal'])}",
             f"- reduce: {', '.join(f'{op}<-{j}' for op, j in g['reduce'])}",
             f"- parameter-free share of the edges: {result['param_free_share']:.2f} (a share near 1 is the "
             "known DARTS collapse toward skip/pool)",
             f"- final alpha entropy (nats; uniform = 2.079): normal {result['alpha_entropy_final']['normal']:.3f}, "
             f"reduce {result['alpha_entropy_final']['reduce']:.3f}", "",
             "Per-epoch genotypes: genotypes/; alphas: alphas.jsonl, alphas.png.", ""]
    ev = result.get("evaluation")
    if ev:
        c = ev["cost"]
        cell = ev.get("cell", "searched")
        lines += ["## Evaluation network" + ("" if cell == "searched" else
                                             f" (the reference {cell} cell, not the searched one)"), "",
                  f"- density {ev['density']}: test accuracy {ev['test']['acc']:.4f} (loss {ev['test']['loss']:.4f}, "
                  f"n={ev['test']['n']})",
                  f"- nonzero conv/linear weights: {c['nonzero']:,} of {c['total']:,}{_density_note(ev)}",
                  f"- MACs per sample: {c['macs']:,} dense kernels; {c['nonzero_macs']:,} over nonzero weights only",
                  f"- latency (CPU, batch 1, interleaved): masked / all-ones-masked = "
                  f"{c['latency_ratio_masked_vs_dense']:.3f}",
                  f"- speed: {c['speed_note']}. 2:4 path: {c['semi_structured_2to4']}.", ""]
    return "\n".join(lines)
