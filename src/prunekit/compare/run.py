"""`run_compare`: the dense model, then every arm x seed, resumable, then the table and report.

Layout of the output folder (default <out>/<name>/):

    recipe.yaml              the resolved recipe of the last run (a recipe: it runs the comparison again)
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

import copy
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.environment import environment
from ..core.errors import CheckpointError, ConfigError, PrunekitError, load_error_text
from ..core.integrity import atomic_write, file_digest, hold_dir
from ..cost.macs import CONVENTION
from ..data import load_data
from ..data.subsets import random_batches
from ..engine.evaluate import evaluate, model_device
from ..engine.train import train
from ..models import create_model
from .arms import call_method, run_arm
from .recipe import CompareRecipe, dense_settings
from .records import arm_record, read_json_mapping, write_json
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def output_folder(recipe: CompareRecipe, out_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder a comparison writes into: `out_dir`, else <recipe out>/<recipe name> (`~` expanded)."""
    return Path(out_dir).expanduser() if out_dir is not None else Path(recipe.out).expanduser() / recipe.name


def dense_paths(recipe: CompareRecipe, out_dir: Path) -> tuple[Path, Path]:
    """(weights, info JSON) of the dense model: `dense.weights` and the .json beside it, or the
    output folder's dense.safetensors and dense.json."""
    if recipe.dense_weights:
        path = Path(recipe.dense_weights).expanduser()
        return path, path.with_suffix(".json")
    return out_dir / "dense.safetensors", out_dir / "dense.json"


def dense_settings_differ(info: dict[str, Any], recipe: CompareRecipe) -> list[str]:
    """Settings recorded in a dense model's info ("train", "data") that differ from the recipe's
    dense.train and data sections, as "section.key=recorded (recipe: value)"; empty when the info
    records none or the recipe has no dense.train (weights given as they are)."""
    if recipe.dense_train is None:
        return []
    wanted = dense_settings(recipe.data.to_dict(), recipe.dense_train.to_dict())
    return [f"{k}={v!r} (recipe: {wanted.get(k)!r})"
            for k, v in dense_settings(info.get("data"), info.get("train")).items() if v != wanted.get(k)]


def _check_dense_checkpoint(ckpt: Path, recipe: CompareRecipe) -> None:
    """The dense training checkpoint folder records the settings it trains with (written before
    the first epoch); CheckpointError when the recipe's differ: a resume under another data seed or
    validation split would continue training the first run's model on other images."""
    settings_path = ckpt / "settings.json"
    wanted = {"train": recipe.dense_train.to_dict(), "data": recipe.data.to_dict()}
    if settings_path.is_file():
        differ = dense_settings_differ(read_json_mapping(settings_path, "dense training settings"), recipe)
        if differ:
            raise CheckpointError(f"the dense model's training checkpoint in {ckpt} was made with {', '.join(differ)}; "
                                  f"remove {ckpt} to train the dense model from the start with this recipe")
    elif not any(ckpt.glob("*.pt")):  # a checkpoint made before settings were kept is left to the engine's check
        write_json(settings_path, wanted)


def dense_model(recipe: CompareRecipe, model: nn.Module, bundle: Any, out_dir: Path, device: torch.device,
                echo: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """Load the dense weights, or train them once (resumable) and cache them; returns (model, info).

    Weights trained here get an info JSON beside them with the training and data settings; weights
    whose info records settings other than the recipe's are refused, so that a smoke run's model
    is never taken for the real one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, save_model

    path, info_path = dense_paths(recipe, out_dir)
    info = read_json_mapping(info_path, "dense model info") if info_path.is_file() else {}
    if not path.is_file():
        if recipe.dense_train is None:
            raise CheckpointError(f"dense weights {path} do not exist and the recipe has no dense.train to make "
                                  "them; train them first (benchmarks/protocol_dense.py) or add dense.train")
        echo(f"dense: training {recipe.dense_train.epochs} epochs on {device} (cached as {path})")
        t0 = time.perf_counter()
        val = bundle.val if bundle.val.num_samples > 0 else None
        ckpt = out_dir / "dense_ckpt"
        _check_dense_checkpoint(ckpt, recipe)
        try:
            train(model, bundle.train, val, recipe.dense_train, ckpt_dir=ckpt, resume=True, device=device,
                  progress=False)
        except CheckpointError as err:  # the engine's advice names its own ckpt_dir, which compare sets
            raise CheckpointError(f"the dense model's training checkpoint in {ckpt} cannot continue this recipe's "
                                  f"dense training ({err}); remove {ckpt} to train the dense model from the start "
                                  "with this recipe's dense.train") from None
        info = {"trained_here": True, "train_s": time.perf_counter() - t0, "device": str(device),
                "model": {"name": recipe.model_name, "kwargs": recipe.model_kwargs},
                "train": recipe.dense_train.to_dict(), "data": recipe.data.to_dict()}
        # the settings first: weights on disk always have them beside, whenever a kill comes
        write_json(info_path, info)
        atomic_write(path, lambda tmp: save_model(model.cpu(), tmp))
    else:
        _refuse_other_settings(recipe, path, info_path, info)
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
    if info.get("trained_here") or not recipe.dense_weights:  # never rewrites the info of weights made elsewhere
        write_json(info_path, info)
    return model, info


def run_compare(recipe: CompareRecipe, out_dir: str | os.PathLike[str] | None = None,
                only: Iterable[str] | None = None, echo: Callable[[str], None] = print,
                report_only: bool = False) -> CompareResult:
    """Run every arm x seed not yet on disk, then write compare.json, compare.md and the plot.

    Before anything trains, every record on disk is checked against its arm's spec and every
    one-shot arm that is to run is tried once on a copy of the dense model, so a foreign record
    or an impossible target stops the comparison at once, naming the arm. With `report_only`
    nothing is loaded or run: the report is written from the records on disk."""
    only = list(only) if only is not None else None
    unknown = sorted(set(only or ()) - set(recipe.arms))
    if unknown:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; the recipe has {', '.join(recipe.arms)}")
    out = output_folder(recipe, out_dir)
    if report_only:
        return report_from_disk(recipe, out)
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.device)
    early_sha = _checked_dense_sha(recipe, out)
    # a foreign or damaged record fails before the data is loaded
    early = _records_on_disk(recipe, out, early_sha) if early_sha else None
    bundle = load_data(recipe.data.replace(device="cuda" if device.type == "cuda" else "cpu"))
    if recipe.eval_split == "val" and bundle.val.num_samples == 0:
        raise ConfigError(f"eval.split=val, but data.val_fraction={recipe.data.val_fraction} holds no validation "
                          "images out of this training split; raise data.val_fraction or report eval.split=test")
    if recipe.eval_max_batches:
        # a seeded random subset: the first batches of a class-sorted split hold one or two classes
        bundle.val = random_batches(bundle.val, recipe.eval_max_batches, recipe.data.seed)
        bundle.test = random_batches(bundle.test, recipe.eval_max_batches, recipe.data.seed)
    torch.manual_seed(recipe.data.seed)
    model = create_model(recipe.model_name, bundle.num_classes, **recipe.model_kwargs)
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with hold_dir(out, "comparison"):  # a second compare in this folder would run the same arms beside it
        try:
            dense, dense_info = dense_model(recipe, model, bundle, out, device, echo)
        except PrunekitError:
            if new_folder and not any(out.iterdir()):
                out.rmdir()  # unreadable dense weights leave no folder behind
            raise
        echo(f"dense: {recipe.eval_split if recipe.eval_split == 'test' else 'val'} acc "
             f"{dense_info['test_acc' if recipe.eval_split == 'test' else 'val_acc']:.4f} (sha256 {dense_info['sha256'][:12]})")
        example = next(iter(bundle.val if bundle.val.num_samples > 0 else bundle.test))[0][:2].cpu()
        found = early if early_sha == dense_info["sha256"] else _records_on_disk(recipe, out, dense_info["sha256"])
        todo = [key for key, (_, _, rec) in found.items()
                if rec is None and not recipe.arms[key[0]].skip_reason and (only is None or key[0] in only)]
        _try_arms(recipe, todo, dense, bundle, example, device)
        (out / "recipe.yaml").write_text(json.dumps(recipe.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        result = CompareResult(out, {}, {})
        for (name, seed), (path, h, rec) in found.items():
            if not recipe.arms[name].skip_reason:
                result.records.setdefault(name, [])
            if (name, seed) in todo:
                echo(f"arm {name}, seed {seed}: running")
                load = os.getloadavg()
                with _naming(name, seed):
                    rec = run_arm(recipe, recipe.arms[name], seed, dense, bundle, example, device)
                rec.update(spec_hash=h, spec=recipe.spec_of(name), dense_sha256=dense_info["sha256"],
                           device=str(device), load_avg_start=load, load_avg_end=os.getloadavg(),
                           environment=environment())
                write_json(path, rec)
                result.ran.append((name, seed))
                echo(f"arm {name}, seed {seed}: acc {rec['acc']:.4f}, MACs kept {rec['macs_fraction']:.3f} "
                     f"({rec['wall_s']:.0f} s)")
            if rec is not None:
                result.records.setdefault(name, []).append(rec)
        _finish(recipe, result, dense_info)
        return result


def report_from_disk(recipe: CompareRecipe, out: Path) -> CompareResult:
    """The report of the records in `out`, loading no data and running nothing. The dense model's
    sha256 comes from its weights when they are at hand, else from the folder's last compare.json;
    its accuracy from that compare.json, else from the weights' info file."""
    if not out.is_dir():
        raise CheckpointError(f"{out} does not exist: there are no records to report; run the comparison first")
    last = read_json_mapping(out / "compare.json", "comparison").get("dense", {}) if (out / "compare.json").is_file() else {}
    weights, info_path = dense_paths(recipe, out)
    if weights.is_file():
        sha = _checked_dense_sha(recipe, out)
    elif isinstance(last.get("sha256"), str):
        sha = last["sha256"]
    else:
        raise CheckpointError(f"no dense model at {weights} and no compare.json in {out}: the records cannot be "
                              "matched to their dense model; point dense.weights at it, or run the comparison")
    info = read_json_mapping(info_path, "dense model info") if info_path.is_file() else {}
    same = last if last.get("sha256") == sha else {}  # what the last run said of this dense model is kept
    # the comparison's own evaluation first (a run scores the dense model on this machine's data copy)
    source = same or (info if info.get("sha256", sha) == sha else {})
    dense_info = {**same, "path": str(weights), "sha256": sha, "test_acc": source.get("test_acc"),
                  "val_acc": source.get("val_acc")}
    result = CompareResult(out, {}, {})
    for (name, _), (_, _, rec) in _records_on_disk(recipe, out, sha).items():
        if not recipe.arms[name].skip_reason:
            result.records.setdefault(name, [])
        if rec is not None:
            result.records.setdefault(name, []).append(rec)
    _finish(recipe, result, dense_info)
    return result


def check_on_disk(recipe: CompareRecipe, out: Path) -> int:
    """What a run would refuse on disk, refused here too (`--dry-run`): damaged or replaced dense
    weights, records that cannot be reused, dense weights trained with other settings. Returns how
    many finished records a run would reuse."""
    sha = _checked_dense_sha(recipe, out)
    if sha is None:
        return 0
    found = _records_on_disk(recipe, out, sha)
    path, info_path = dense_paths(recipe, out)
    _refuse_other_settings(recipe, path, info_path,
                           read_json_mapping(info_path, "dense model info") if info_path.is_file() else {})
    return sum(rec is not None for _, _, rec in found.values())


def _refuse_other_settings(recipe: CompareRecipe, path: Path, info_path: Path, info: dict[str, Any]) -> None:
    differ = dense_settings_differ(info, recipe)
    if differ:
        raise CheckpointError(f"dense weights {path} were trained with {', '.join(differ)} (from {info_path}); "
                              f"remove {path} and {info_path} to train them again with this recipe, or point "
                              "dense.weights at weights trained with its settings")


def _checked_dense_sha(recipe: CompareRecipe, out: Path) -> str | None:
    """sha256 of the dense weights on disk (None when there are none), refused when the dense
    model's info file recorded another: the weights were damaged or replaced, and the records,
    made from the recorded model, must not be blamed for it."""
    weights, info_path = dense_paths(recipe, out)
    if not weights.is_file():
        return None
    sha = sha256_file(weights)
    info = read_json_mapping(info_path, "dense model info") if info_path.is_file() else {}
    recorded = info.get("sha256")
    if isinstance(recorded, str) and recorded != sha:
        raise CheckpointError(f"dense weights {weights} are not the model recorded in {info_path} (sha256 "
                              f"{sha[:12]}, recorded {recorded[:12]}): the file was damaged or replaced. The records in "
                              f"{out} were made from the recorded model and are kept; restore that file, or compare "
                              "from these weights in a new output folder (--out)")
    return sha


def _records_on_disk(recipe: CompareRecipe, out: Path, dense_sha: str) -> dict[tuple[str, int], tuple[Path, str, Any]]:
    """(arm, seed) -> (record path, spec hash, record or None) for every arm and seed, skipped arms
    (whose finished records are still reported) included; every record that cannot be reused is
    named in one CheckpointError."""
    found, errors = {}, []
    for name, arm in recipe.arms.items():
        for seed in recipe.seeds:
            try:
                found[(name, seed)] = arm_record(recipe, name, seed, dense_sha, out)
            except CheckpointError as err:
                errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise CheckpointError(f"{len(errors)} records cannot be reused: " + "; ".join(map(str, errors[:5]))
                              + ("; ..." if len(errors) > 5 else ""))
    return found


@contextmanager
def _naming(arm: str, seed: int):
    """Prefix a prunekit error raised inside with the arm and seed it came from."""
    try:
        yield
    except PrunekitError as err:
        err.args = (f"arm {arm}, seed {seed}: {err}",) + err.args[1:]
        raise


def _try_arms(recipe: CompareRecipe, todo: list[tuple[str, int]], dense: nn.Module, bundle: Any,
              example: torch.Tensor, device: torch.device) -> None:
    """Each arm that is to run, once before any of them trains: one-shot pruners prune a copy of
    the dense model (an impossible target fails here, not hours in); methods that train check the
    model against their config."""
    for name in dict.fromkeys(n for n, _ in todo):
        arm, seed = recipe.arms[name], next(s for n, s in todo if n == name)
        if arm.method is None:
            continue
        trial = copy.deepcopy(dense)
        with _naming(name, seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real run repeats them
            if arm.trains:
                arm.config.check_model_with(trial, example.to(model_device(trial)))  # the dense model's device
            else:
                call_method(arm, recipe, trial, example, bundle, seed, device)
        del trial


def _finish(recipe: CompareRecipe, result: CompareResult, dense_info: dict[str, Any]) -> None:
    result.notes[:0] = [f"arm {name}: {arm.skip_reason}" + ("; its finished records are reported"
                                                            if result.records.get(name) else "")
                        for name, arm in recipe.arms.items() if arm.skip_reason]
    for name, recs in result.records.items():  # in the report written after a run and in --report-only's
        for rec in recs:
            if rec.get("fields_added_since"):
                result.notes.append(f"arm {name}, seed {rec.get('seed')}: recorded before the config field(s) "
                                    f"{', '.join(rec['fields_added_since'])} existed (every recorded setting is "
                                    "unchanged; the new fields' defaults may not describe that run)")
    result.summary = summarise(result.records)
    t = recipe.target
    for name, s in result.summary.items():
        if t is None or recipe.arms[name].method is None:
            continue
        got = s[f"{t.metric}_fraction"]["mean"]
        if got is not None and abs(got - t.fraction) > t.tolerance:
            result.notes.append(f"arm {name} keeps {100 * got:.1f}% of the {t.metric}, not the target "
                                f"{100 * t.fraction:g}% ± {100 * t.tolerance:g}: compare it at its own {t.metric}")
    missing = [f"{n} (seeds {sorted(set(recipe.seeds) - set(s['seeds']))})" for n, s in result.summary.items()
               if set(s["seeds"]) != set(recipe.seeds)]
    never = [n for n, recs in result.records.items() if not recs]
    if recipe.eval_max_batches:
        result.notes.append(f"smoke setting: accuracies scored on {recipe.eval_max_batches} batches of val and "
                            "test only (drawn with the data seed); they say nothing about the methods")
    if missing:
        result.notes.append("not every seed has run yet: " + ", ".join(missing))
    for name, recs in result.records.items():  # eval.latency is not part of a record's spec
        timed = sorted(r["seed"] for r in recs if r.get("latency"))
        if timed and len(timed) < len(recs):
            result.notes.append(f"arm {name}: latency and speed-up are over seeds {timed} only; its other records "
                                "were made without a latency measurement (eval.latency false)")
    if never:
        result.notes.append(f"no records yet for arm(s) {', '.join(never)} (run them with --arms {','.join(never)})")
    on_disk = {int(p.stem[4:]) for p in (result.out_dir / "arms").glob("*/seed*.json") if p.stem[4:].isdigit()}
    if on_disk - set(recipe.seeds):
        result.notes.append(f"records of seed(s) {sorted(on_disk - set(recipe.seeds))} are on disk but not in this "
                            f"report (the recipe's seeds are {recipe.seeds}); set seeds to include them")
    foreign = sorted(p.name for p in (result.out_dir / "arms").glob("*")
                     if p.is_dir() and p.name not in recipe.arms and any(p.glob("seed*.json")))
    if foreign:
        result.notes.append(f"records of arm(s) {', '.join(foreign)} are on disk but not in this report (the recipe "
                            "does not list them); add them to the recipe's arms to include them")
    recs = [r for rs in result.records.values() for r in rs]
    devices = sorted({str(r.get("device")) for r in recs})
    if len(devices) > 1:
        result.notes.append("records from more than one training device: " + "; ".join(
            f"{d}: {', '.join(sorted({r['arm'] for r in recs if str(r.get('device')) == d}))}" for d in devices))
    threads = "/".join(map(str, sorted({(r.get("environment") or {}).get("torch_threads") for r in recs} - {None})))
    acc_key = "test_acc" if recipe.eval_split == "test" else "val_acc"
    dense_acc = dense_info.get(acc_key)
    setting = (f"Model {recipe.model_name} on {recipe.data.name} ({recipe.data.limit_train or 'all'} training "
               f"images, val fraction {recipe.data.val_fraction}); dense model sha256 {dense_info['sha256'][:16]}, "
               f"{recipe.eval_split} acc {'not recorded' if dense_acc is None else f'{100 * dense_acc:.2f}%'}; "
               f"shared budget {recipe.finetune.epochs} epochs after the dense model (lr {recipe.finetune.lr}, "
               f"{recipe.finetune.schedule}); seeds {recipe.seeds}; training device {', '.join(devices) or '-'}"
               f"{f', {threads} CPU thread(s)' if threads else ''}.")
    context = {"title": f"prunekit compare: {recipe.name}", "setting": setting, "split": recipe.eval_split,
               "convention": CONVENTION, "latency": _latency_setting(recs)}
    paths = write_outputs(result.out_dir, result.summary, context, result.notes)
    result.report, result.plot = paths["report"], paths["plot"]
    write_json(result.out_dir / "compare.json", {
        "name": recipe.name, "recipe": recipe.to_dict(), "dense": dense_info, "summary": result.summary,
        "pareto_front": paths["front"], "notes": result.notes, "records": result.records,
        "environment": environment()})


def _latency_setting(records: list[dict[str, Any]]) -> str:
    """How the records' latencies were measured (from the records: the recipe's bench section may
    have changed since), e.g. "cpu, float32, batch 1, 50 timed forwards"."""
    kinds = sorted({(_measured_on(r, lat), str(lat.get("dtype")), lat.get("batch_size"), lat.get("n"),
                     lat.get("memory_format") == "channels_last")
                    for r in records if isinstance(lat := r.get("latency"), dict)}, key=str)
    return "; ".join(f"{d}, {t}, batch {b}, {n} timed forwards" + (", channels-last" if cl else "")
                     for d, t, b, n, cl in kinds) or "not measured"


def _measured_on(record: dict[str, Any], latency: dict[str, Any]) -> str:
    """The latency's device; "auto" (records written before the device was resolved) is read from
    the record's environment: CUDA when that machine had it, else the CPU."""
    device = str(latency.get("device"))
    env = record.get("environment")
    if device != "auto" or not isinstance(env, dict) or "cuda" not in env:
        return device
    return "cuda" if env["cuda"] else "cpu"

