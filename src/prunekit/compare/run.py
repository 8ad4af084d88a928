"""`run_compare`: the dense model, then every arm x seed, resumable, then the table and report.

Layout of the output folder (default <out>/<name>/):

    recipe.yaml              the resolved recipe of the last run
    dense.safetensors        the dense model, when it was trained here (dense_ckpt/ resumes it)
    dense.json               its sha256, accuracy, device and training time
    arms/<arm>/seed<k>.json  one record per finished arm and seed (written atomically)
    compare.json             summary, every record, notes, environment
    compare.md               the report: table, plot, setting, notes
    accuracy_vs_macs.png     accuracy vs MACs with the Pareto front

A finished arm x seed (its record on disk, made from the same spec and the same dense model)
is never run again, so a killed comparison resumes where it stopped. A record made from a
different spec raises CheckpointError instead of being mixed into the table.

>>> from prunekit.compare import CompareRecipe, run_compare   # doctest: +SKIP
>>> run_compare(CompareRecipe.from_dict(raw), "runs/mine").summary["magnitude"]["acc"]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.environment import environment
from ..core.errors import CheckpointError, ConfigError, PrunekitError, load_error_text, read_json
from ..core.integrity import file_digest
from ..cost.macs import CONVENTION
from ..data import load_data
from ..data.subsets import random_batches
from ..engine.evaluate import evaluate
from ..engine.train import train
from ..models import create_model
from .arms import run_arm
from .recipe import CompareRecipe, spec_hash
from .summary import summarise, write_outputs


@dataclass
class CompareResult:
    out_dir: Path
    summary: dict[str, dict[str, Any]]
    records: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)
    ran: list[tuple[str, int]] = field(default_factory=list)  # (arm, seed) run by this call
    report: Path | None = None
    plot: Path | None = None


def sha256_file(path: str | os.PathLike[str]) -> str:
    return file_digest(path, "sha256")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a kill leaves either no record or a whole one


def _read_json_mapping(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is damaged or foreign."""
    return read_json(path, what, "remove it to rerun, or give compare another --out", mapping=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def dense_model(recipe: CompareRecipe, model: nn.Module, bundle: Any, out_dir: Path, device: torch.device,
                echo: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """Load the dense weights, or train them once (resumable) and cache them; returns (model, info)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, save_model

    path = Path(recipe.dense_weights) if recipe.dense_weights else out_dir / "dense.safetensors"
    info_path = path.with_suffix(".json") if recipe.dense_weights else out_dir / "dense.json"
    info = _read_json_mapping(info_path, "dense model info") if info_path.is_file() else {}
    if not path.is_file():
        if recipe.dense_train is None:
            raise CheckpointError(f"dense weights {path} do not exist and the recipe has no dense.train to make "
                                  "them; train them first (benchmarks/protocol_dense.py) or add dense.train")
        echo(f"dense: training {recipe.dense_train.epochs} epochs on {device} (cached as {path})")
        t0 = time.perf_counter()
        val = bundle.val if bundle.val.num_samples > 0 else None
        train(model, bundle.train, val, recipe.dense_train, ckpt_dir=out_dir / "dense_ckpt", resume=True,
              device=device, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model.cpu(), str(path))
        info = {"trained_here": True, "train_s": time.perf_counter() - t0, "device": str(device),
                "train": recipe.dense_train.to_dict()}
    else:
        try:
            load_model(model, str(path), strict=True)
        except SafetensorError as err:  # truncated, empty or not a safetensors file
            raise CheckpointError(f"cannot read dense weights {path}: {load_error_text(err)}; train them again "
                                  "or point dense.weights at an intact .safetensors file") from None
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"dense weights {path} do not fit model {recipe.model_name!r}: "
                                  f"{load_error_text(err)}") from None
    model.to(device)
    info.update(path=str(path), sha256=sha256_file(path))
    scored = {"test_acc": evaluate(model, bundle.test)["acc"],
              "val_acc": evaluate(model, bundle.val)["acc"] if bundle.val.num_samples > 0 else None}
    info.update(scored)
    if not recipe.dense_weights:
        _write_json(info_path, info)
    return model, info


def _arm_record(recipe: CompareRecipe, arm: str, seed: int, dense_sha: str, out_dir: Path) -> tuple[Path, str, Any]:
    spec = {**recipe.spec_of(arm), "dense_sha256": dense_sha}
    h = spec_hash(spec)
    path = out_dir / "arms" / arm / f"seed{seed}.json"
    if not path.is_file():
        return path, h, None
    rec = _read_json_mapping(path, "record")
    if rec.get("spec_hash") != h:
        added = _fields_added_since(rec.get("spec"), json.loads(json.dumps(recipe.spec_of(arm), default=str)))
        # only a field of the arm or of its method config can be new; a key inside a mapping the
        # user writes (latency settings, model kwargs) is a changed setting
        fields = added is not None and all(
            k.split(".")[0] == "arm" and (k.count(".") == 1 or (k.count(".") == 2 and k.startswith("arm.config.")))
            for k in added)
        if not fields or rec.get("dense_sha256") != dense_sha:
            raise CheckpointError(f"{path} was made from a different arm spec or dense model; remove it (or the "
                                  f"folder {out_dir}) to rerun it, or give compare another --out")
        rec["fields_added_since"] = added  # kept: every setting it recorded is unchanged
    return path, h, rec


def _fields_added_since(old: Any, new: Any, prefix: str = "") -> list[str] | None:
    """Keys of `new` that the recorded spec `old` lacks, when every key `old` has holds the same
    value in `new` (a config field added to prunekit after the record was made); None when a
    recorded value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        added = [prefix + k for k in new if k not in old]
        for k, v in old.items():
            if k not in new:
                return None
            sub = _fields_added_since(v, new[k], f"{prefix}{k}.")
            if sub is None:
                return None
            added += sub
        return added
    return [] if old == new else None


def run_compare(recipe: CompareRecipe, out_dir: str | os.PathLike[str] | None = None,
                only: Iterable[str] | None = None, echo: Callable[[str], None] = print) -> CompareResult:
    """Run every arm x seed not yet on disk, then write compare.json, compare.md and the plot."""
    only = list(only) if only is not None else None
    unknown = sorted(set(only or ()) - set(recipe.arms))
    if unknown:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; the recipe has {', '.join(recipe.arms)}")
    out = Path(out_dir) if out_dir is not None else Path(recipe.out) / recipe.name
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.device)
    bundle = load_data(recipe.data.replace(device="cuda" if device.type == "cuda" else "cpu"))
    if recipe.eval_max_batches:
        # a seeded random subset: the first batches of a class-sorted split hold one or two classes
        bundle.val = random_batches(bundle.val, recipe.eval_max_batches, recipe.data.seed)
        bundle.test = random_batches(bundle.test, recipe.eval_max_batches, recipe.data.seed)
    torch.manual_seed(recipe.data.seed)
    model = create_model(recipe.model_name, bundle.num_classes, **recipe.model_kwargs)
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(json.dumps(recipe.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    try:
        dense, dense_info = dense_model(recipe, model, bundle, out, device, echo)
    except PrunekitError:
        if new_folder and sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]:
            (out / "recipe.yaml").unlink()  # unreadable dense weights leave no folder behind
            out.rmdir()
        raise
    echo(f"dense: {recipe.eval_split if recipe.eval_split == 'test' else 'val'} acc "
         f"{dense_info['test_acc' if recipe.eval_split == 'test' else 'val_acc']:.4f} (sha256 {dense_info['sha256'][:12]})")
    example = next(iter(bundle.val if bundle.val.num_samples > 0 else bundle.test))[0][:2].cpu()
    result = CompareResult(out, {}, {})
    for name, arm in recipe.arms.items():
        if arm.skip_reason:
            result.notes.append(f"arm {name}: {arm.skip_reason}")
            continue
        result.records[name] = []
        runnable = only is None or name in only
        for seed in recipe.seeds:
            path, h, rec = _arm_record(recipe, name, seed, dense_info["sha256"], out)
            if rec is not None and rec.get("fields_added_since"):
                result.notes.append(f"arm {name}, seed {seed}: recorded before the config field(s) "
                                    f"{', '.join(rec['fields_added_since'])} existed (every recorded setting is "
                                    "unchanged; the new fields' defaults may not describe that run)")
            if rec is None and runnable:
                echo(f"arm {name}, seed {seed}: running")
                load = os.getloadavg()
                rec = run_arm(recipe, arm, seed, dense, bundle, example, device)
                rec.update(spec_hash=h, spec=recipe.spec_of(name), dense_sha256=dense_info["sha256"],
                           device=str(device), load_avg_start=load, load_avg_end=os.getloadavg(),
                           environment=environment())
                _write_json(path, rec)
                result.ran.append((name, seed))
                echo(f"arm {name}, seed {seed}: acc {rec['acc']:.4f}, MACs kept {rec['macs_fraction']:.3f} "
                     f"({rec['wall_s']:.0f} s)")
            if rec is not None:
                result.records[name].append(rec)
    _finish(recipe, result, dense_info, device)
    return result


def _finish(recipe: CompareRecipe, result: CompareResult, dense_info: dict[str, Any], device: torch.device) -> None:
    result.summary = summarise(result.records)
    t = recipe.target
    for name, s in result.summary.items():
        if t is None or recipe.arms[name].method is None:
            continue
        got = s[f"{t.metric}_fraction"]["mean"]
        if got is not None and abs(got - t.fraction) > t.tolerance:
            result.notes.append(f"arm {name} keeps {100 * got:.1f}% of the {t.metric}, not the target "
                                f"{100 * t.fraction:.0f}% ± {100 * t.tolerance:.0f}: compare it at its own {t.metric}")
    missing = [f"{n} (seeds {sorted(set(recipe.seeds) - set(s['seeds']))})" for n, s in result.summary.items()
               if set(s["seeds"]) != set(recipe.seeds)]
    if recipe.eval_max_batches:
        result.notes.append(f"smoke setting: accuracies scored on the first {recipe.eval_max_batches} batches of "
                            "val and test only; they say nothing about the methods")
    if missing:
        result.notes.append("not every seed has run yet: " + ", ".join(missing))
    setting = (f"Model {recipe.model_name} on {recipe.data.name} ({recipe.data.limit_train or 'all'} training "
               f"images, val fraction {recipe.data.val_fraction}); dense model sha256 {dense_info['sha256'][:16]}, "
               f"{recipe.eval_split} acc {100 * dense_info['test_acc' if recipe.eval_split == 'test' else 'val_acc']:.2f}%; "
               f"shared budget {recipe.finetune.epochs} epochs after the dense model (lr {recipe.finetune.lr}, "
               f"{recipe.finetune.schedule}); seeds {recipe.seeds}; training device {device}"
               f"{'' if recipe.threads is None else f', {recipe.threads} CPU thread(s)'}.")
    lat = recipe.bench
    context = {"title": f"prunekit compare: {recipe.name}", "setting": setting, "split": recipe.eval_split,
               "convention": CONVENTION, "latency": f"{lat.device}, {lat.dtype}, batch {lat.batch_size}, "
               f"{lat.repeats} repeats after {lat.warmup} warm-up"}
    paths = write_outputs(result.out_dir, result.summary, context, result.notes)
    result.report, result.plot = paths["report"], paths["plot"]
    _write_json(result.out_dir / "compare.json", {
        "name": recipe.name, "recipe": recipe.to_dict(), "dense": dense_info, "summary": result.summary,
        "pareto_front": paths["front"], "notes": result.notes, "records": result.records,
        "environment": environment()})
