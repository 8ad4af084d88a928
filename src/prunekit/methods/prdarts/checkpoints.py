"""Where a PR-DARTS search keeps its checkpoints, and the checks before it resumes from them.

`<ckpt_dir>/settings.json` records the settings the search was started with (its PRDartsConfig
and the number of validation batches; for `train_at_density`, the density and its schedule);
each phase checkpoints every epoch through the engine in `<ckpt_dir>/<phase>/last.pt` (model with the alphas, weight optimizer, schedule, the
`ArchitectHook`'s state: the architect's Adam and the position in the validation split, and every
random generator). A resumed search reads a finished phase back (`train(..., resume=True)` of a
finished run trains nothing) and continues the phase in progress after its last saved epoch.

Before anything runs, `resume_checkpoints` checks that the settings are those of the run, that
every phase checkpoint loads, and that they follow each other (no phase has epochs past one that
has not finished); `trim_alpha_log` then drops from alphas.jsonl the epochs that will run again.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ...core.errors import CheckpointError, read_json
from ...core.integrity import atomic_write_text
from ...engine.checkpoint import checkpoint_path, load_checkpoint
from .ops import PRIMITIVES

SETTINGS = "settings.json"
ADDED_LATER = frozenset({"network"})  # settings older files do not record
FORMAT, VERSION = "prunekit.prdarts_search", 1


def phase_dir(ckpt_dir: str | Path | None, phase: str) -> Path | None:
    return None if ckpt_dir is None else Path(ckpt_dir) / phase


def sized(loader: Iterable) -> int | None:
    """len(loader), None for a loader without one."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def start_checkpoints(ckpt_dir: str | Path, settings: dict[str, Any], phases: Sequence[str],
                      val_batches: int | None = None) -> None:
    """A new run in `ckpt_dir`: record its settings and remove phase checkpoints of an earlier one."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    for phase in phases:
        checkpoint_path(root / phase).unlink(missing_ok=True)
    record = {"format": FORMAT, "version": VERSION, "config": settings, "val_batches": val_batches}
    atomic_write_text(root / SETTINGS, json.dumps(record, indent=1))


def resume_checkpoints(ckpt_dir: str | Path, settings: dict[str, Any], phases: Sequence[str], epochs: Sequence[int],
                       val_batches: int | None = None) -> dict[str, int] | None:
    """{phase: epochs it has finished} of the run saved in `ckpt_dir`, None when none was
    started there; CheckpointError when its settings differ or a checkpoint is damaged."""
    root = Path(ckpt_dir)
    found = [p for p in phases if checkpoint_path(root / p).exists()]
    if not (root / SETTINGS).exists():
        if found:
            raise CheckpointError(f"{root} holds checkpoints of the phases {', '.join(found)} but not the {SETTINGS} "
                                  "they were made with; the folder is damaged: delete it to restart the search")
        return None
    _check_settings(root / SETTINGS, settings, val_batches)
    done = saved_epochs(root, phases, epochs)
    _check_order(root, phases, epochs, done)
    return done


def saved_epochs(ckpt_dir: str | Path, phases: Sequence[str], epochs: Sequence[int]) -> dict[str, int]:
    """{phase: epochs its checkpoint holds} (0 without one); CheckpointError for a damaged one."""
    return {p: _epochs_done(Path(ckpt_dir) / p, n) for p, n in zip(phases, epochs)}


def _check_settings(path: Path, now: dict[str, Any], val_batches: int | None) -> None:
    todo = "delete the folder to restart the search"
    saved = read_json(path, "search settings", todo, mapping=True)
    if saved.get("format") != FORMAT or saved.get("version") != VERSION or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{path} is not the settings file of a prunekit PR-DARTS run; {todo}")
    now = json.loads(json.dumps(now))  # as the file holds them (tuples as lists)
    # a setting recorded only since a later version (the evaluation network's genotype and sizes)
    # is not compared with a file that predates it
    now = {k: v for k, v in now.items() if k in saved["config"] or k not in ADDED_LATER}
    diff = sorted(k for k in set(now) | set(saved["config"]) if now.get(k) != saved["config"].get(k))
    if diff:
        pairs = ", ".join(f"{k}: saved {saved['config'].get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path.parent} holds a run with other settings ({pairs}); resume with the same "
                              "settings, or start again in a new folder")
    if None not in (val_batches, saved.get("val_batches")) and val_batches != saved["val_batches"]:
        raise CheckpointError(f"the validation (alpha) loader has {val_batches} batches but the search in "
                              f"{path.parent} had {saved['val_batches']}; resume with the same data and batch size")


def _epochs_done(folder: Path, epochs: int) -> int:
    path = checkpoint_path(folder)
    if not path.exists():
        return 0
    ckpt = load_checkpoint(path, "delete the checkpoint folder to start the search again")  # one CheckpointError
    if ckpt["epoch"] >= epochs:
        raise CheckpointError(f"{path} records epoch {ckpt['epoch'] + 1} but the phase has {epochs} epochs; the file "
                              "is damaged or from another search: delete the folder to restart the search")
    return ckpt["epoch"] + 1


def _check_order(root: Path, phases: Sequence[str], epochs: Sequence[int], done: dict[str, int]) -> None:
    """A phase with saved epochs follows phases that all finished."""
    unfinished = None
    for phase, n in zip(phases, epochs):
        if done[phase] and unfinished is not None:
            raise CheckpointError(f"{root} holds epochs of the phase {phase} but the phase {unfinished} before it did "
                                  "not finish; the folder is damaged: delete it to restart the search")
        if done[phase] < n and unfinished is None:
            unfinished = phase


def trim_alpha_log(out_dir: str | Path, done: dict[str, int]) -> None:
    """Keep in alphas.jsonl only the epochs the checkpoints hold: the others run again."""
    path = Path(out_dir) / "alphas.jsonl"
    if not path.is_file():
        return
    kept = [line for line in read_lines(path) if _saved(line, done)]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_lines(path: Path) -> list[str]:
    """The lines of a log written line by line; bytes that are not UTF-8 (a damaged line) become
    U+FFFD, so that line fails its own check and is skipped instead of failing the whole read."""
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


def _saved(line: str, done: dict[str, int]) -> bool:
    try:
        row: Any = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not alpha_row_ok(row):
        return False
    return row["phase_epoch"] < done.get(row["phase"], 0)


def alpha_row_ok(row: Any) -> bool:
    """Whether a record of alphas.jsonl has its phase, epoch and both cells' alphas (a list of
    per-edge lists of finite numbers, one per candidate op)."""
    if not isinstance(row, dict) or not isinstance(row.get("phase"), str):
        return False
    epoch = row.get("phase_epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return False
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for cell in ("alpha_normal", "alpha_reduce"):
        rows = row.get(cell)
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, list) and len(r) == len(PRIMITIVES) and all(map(number, r)) for r in rows):
            return False
    return True
