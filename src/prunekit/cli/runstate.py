"""Where a run stands: which stages finished, and the weights to continue from.

Every workflow command keeps `<run>/state.json` up to date (written atomically: a temporary
file moved over the old one), so that a run stopped at any moment, even by SIGKILL, can be
continued with `prunekit resume <run>`:

    format, version      "prunekit.run_state", 1
    command, stages      the command that made the run and its stages in order
                         (e.g. "run", ["train", "prune", "finetune"])
    done                 the stages that finished; they are never redone
    weights              file (relative to the run) holding the model after the last finished
                         stage; null: the recipe's `init`, or the seeded fresh model
    before_prune         the same for the model pruning started from (the report compares
                         against it); set once pruning finished
    evaluations, seconds, prune_metrics   what the finished stages measured (the result's input)
    finished             true once result.json and the report are written
    recipe_sha256        sha256 of recipe.yaml when the run started: a resume refuses an edited one

While a command works in a run directory it holds an exclusive OS lock on the directory
(`core.integrity.hold_dir`; released when the process ends, however it ends), so a second `prunekit resume`
of a run still in progress is refused instead of training beside it and mixing its files.

A training stage in progress keeps its own checkpoint in `<run>/ckpt/<stage>/last.pt`, written
after every epoch, so a resume loses at most the epoch that was running. Each finished stage's
weights go to `<run>/ckpt/<stage>/model.safetensors` (the dense model after `train` also to
dense.safetensors, as before).

>>> state = new_state("run", ["train", "prune"], weights=None)
>>> state["done"], state["finished"]
([], False)
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError, ConfigError, read_json

STATE_NAME = "state.json"
FORMAT, VERSION = "prunekit.run_state", 1


def new_state(command: str, stages: list[str], weights: str | None) -> dict[str, Any]:
    """The state of a run that has not started any stage; `weights` is what it starts from."""
    return {"format": FORMAT, "version": VERSION, "command": command, "stages": list(stages), "done": [],
            "weights": weights, "before_prune": None, "evaluations": [], "seconds": {}, "prune_metrics": {},
            "finished": False}


def stage_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage keeps its checkpoint (last.pt) and its finished weights (model.safetensors)."""
    return run_dir / "ckpt" / stage


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace state.json atomically (a crash leaves the old or the new file, never half)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_NAME}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / STATE_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """state.json of a run directory, None when it has none (made before runs kept a state)."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        return None
    state = read_json(path, "run state", "the run cannot be resumed")
    keys = ("command", "stages", "done", "weights", "before_prune", "evaluations", "seconds", "finished")
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in keys):
        raise CheckpointError(f"{path} is not a prunekit run state; the run cannot be resumed")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has run state version {state.get('version')!r}; this prunekit "
                              f"reads version {VERSION}")
    wrong = _state_error(state)
    if wrong:
        raise CheckpointError(f"{path} is damaged: {wrong}; the run cannot be resumed (start it again)")
    return state


STAGES = ("train", "prune", "finetune")


def _state_error(state: dict[str, Any]) -> str:
    """What is wrong with the types of a run state's entries ("" when nothing is)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    path_or_none = lambda v: v is None or (isinstance(v, str) and bool(v))
    stages, done = state["stages"], state["done"]
    evals = state["evaluations"]
    checks = [
        (isinstance(state["command"], str), "command is not a name"),
        (isinstance(stages, list) and all(s in STAGES for s in stages) and len(set(stages)) == len(stages),
         f"stages is not a list of distinct stages from {', '.join(STAGES)}"),
        (isinstance(done, list) and all(isinstance(s, str) and s in stages for s in done),
         "done is not a list of the run's stages"),
        (path_or_none(state["weights"]) and path_or_none(state["before_prune"]), "a weights entry is not a file name"),
        (isinstance(evals, list) and all(isinstance(e, dict) and isinstance(e.get("step"), str)
                                         and number(e.get("accuracy")) for e in evals),
         "evaluations is not a list of records with a step and an accuracy"),
        (isinstance(state["seconds"], dict) and all(number(v) for v in state["seconds"].values()),
         "seconds is not a mapping of stage times"),
        (isinstance(state.get("prune_metrics", {}), dict), "prune_metrics is not a mapping"),
        (isinstance(state["finished"], bool), "finished is not true or false"),
        (isinstance(state.get("recipe_sha256", ""), str), "recipe_sha256 is not text"),
    ]
    return next((why for ok, why in checks if not ok), "")


def check_finished(run_dir: Path, command: str) -> None:
    """ConfigError when a run directory given to `command` stopped before it finished.

    Its files are those of an earlier stage (the dense model of a run stopped before pruning),
    so taking them would silently work on the wrong model.
    """
    state = read_state(run_dir)
    if state is None or state["finished"]:
        return
    todo = [s for s in state["stages"] if s not in state["done"]]
    where = f"stopped in stage '{todo[0]}'" if todo else "stopped before writing its result"
    raise ConfigError(f"run directory {run_dir} did not finish ({where}; finished: "
                      f"{', '.join(state['done']) or 'none'}); continue it with `prunekit resume {run_dir}` "
                      f"before giving it to `prunekit {command}`")


def weights_path(run_dir: Path, name: str | None) -> str | None:
    """A weights entry of the state as a path: relative names live in the run directory."""
    if name is None:
        return None
    path = Path(name)
    return str(path if path.is_absolute() else run_dir / path)


def resumable_state(run_dir: Path) -> dict[str, Any]:
    """The state of a run that `prunekit resume` can continue; ConfigError saying why not."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; give the run directory to resume")
    state = read_state(run_dir)
    if state is None:
        raise ConfigError(f"{run_dir} has no {STATE_NAME}; only run directories written by `prunekit "
                          "run/train/prune/finetune/search` can be resumed")
    if state["finished"]:
        raise ConfigError(f"run {run_dir} already finished; nothing to resume (see its report.md)")
    if not (run_dir / "recipe.yaml").is_file():
        raise ConfigError(f"{run_dir} lacks recipe.yaml; the run cannot be resumed")
    return state
