"""Arm records on disk: one JSON file per finished arm x seed, checked before it is reused.

A record is reused only when it was made from the same arm spec and the same dense model (its
sha256); a record made before a config field existed is kept when every setting it recorded is
unchanged. A damaged or foreign record raises CheckpointError naming the file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..core.config import short_repr
from ..core.errors import CheckpointError, read_json
from ..core.integrity import atomic_write_text
from .recipe import CompareRecipe, spec_hash


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, replaced atomically through a temporary file of this writer's own
    (processes filling one folder write compare.json at once): a kill leaves the old file or the new."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json_mapping(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is damaged or foreign."""
    return read_json(path, what, "remove it to rerun, or give compare another --out", mapping=True)


def arm_record(recipe: CompareRecipe, arm: str, seed: int, dense_sha: str, out_dir: Path) -> tuple[Path, str, Any]:
    """(path, spec hash, record or None) of one arm and seed in `out_dir`; CheckpointError when the
    record on disk is damaged or was made from another spec or dense model."""
    spec = {**recipe.spec_of(arm), "dense_sha256": dense_sha}
    h = spec_hash(spec)
    path = out_dir / "arms" / arm / f"seed{seed}.json"
    if not path.is_file():
        return path, h, None
    rec = read_json_mapping(path, "record")
    _check_record(rec, path, arm, seed)
    if rec.get("spec_hash") != h:
        added = _fields_added_since(rec.get("spec"), json.loads(json.dumps(recipe.spec_of(arm), default=str)))
        # only a field of the arm or of its method config can be new; a key inside a mapping the
        # user writes (latency settings, model kwargs) is a changed setting
        fields = added is not None and all(
            k.split(".")[0] == "arm" and (k.count(".") == 1 or (k.count(".") == 2 and k.startswith("arm.config.")))
            for k in added)
        if not fields or rec.get("dense_sha256") != dense_sha:
            raise CheckpointError(f"{path} was made from a different arm spec or dense model ({_what_differs(rec, recipe, arm, dense_sha)}); "
                                  f"remove it (or the folder {out_dir}) to rerun it, or give compare another --out")
        rec["fields_added_since"] = added  # kept: every setting it recorded is unchanged
    return path, h, rec


def _what_differs(rec: dict[str, Any], recipe: CompareRecipe, arm: str, dense_sha: str) -> str:
    """Which part of a record's spec (or its dense model) differs from what the recipe now gives."""
    if rec.get("dense_sha256") != dense_sha:
        return "another dense model"
    old, new = rec.get("spec"), json.loads(json.dumps(recipe.spec_of(arm), default=str))
    if not isinstance(old, dict):
        return "the record holds no spec"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(keys) if keys else "its spec hash differs"


_NUMBERS = ("acc", "pruned_acc", "macs", "params", "macs_fraction", "params_fraction", "nonzero_fraction")
_OPTIONAL_NUMBERS = ("val_acc", "pruned_val_acc")  # None where the recipe has no validation split
_LATENCY_NUMBERS = ("p10_ms", "p90_ms", "dense_median_ms", "speedup")


def _check_record(rec: dict[str, Any], path: Path, arm: str, seed: int) -> None:
    """CheckpointError naming the file when a record lacks what the table reads or holds the
    wrong arm or seed (a hand-edited or copied file)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"record {path} is damaged ({what}); remove it to run arm {arm}, seed {seed} again")

    if rec.get("arm") != arm or rec.get("seed") != seed or isinstance(rec.get("seed"), bool):
        raise bad(f"it says arm {rec.get('arm')!r}, seed {rec.get('seed')!r}")
    finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for key in _NUMBERS + _OPTIONAL_NUMBERS:
        v = rec.get(key)
        if not finite(v) and not (v is None and key in _OPTIONAL_NUMBERS):
            raise bad(f"{key!r} is {short_repr(v)}, not a finite number")
    for key in ("method_epochs", "finetune_epochs"):
        if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool):
            raise bad(f"{key!r} is {short_repr(rec.get(key))}, not a whole number")
    lat = rec.get("latency")
    if lat is not None and not (isinstance(lat, dict) and finite(lat.get("median_ms"))):
        raise bad("'latency' has no median_ms")
    for key in _LATENCY_NUMBERS:
        if lat is not None and lat.get(key) is not None and not finite(lat[key]):
            raise bad(f"latency {key!r} is {short_repr(lat[key])}, not a finite number")
    if lat is not None and lat.get("n") is not None and (not isinstance(lat["n"], int) or isinstance(lat["n"], bool)):
        raise bad(f"latency 'n' is {short_repr(lat['n'])}, not a whole number")
    for key in ("device", "dtype", "memory_format"):
        if lat is not None and lat.get(key) is not None and not isinstance(lat[key], str):
            raise bad(f"latency {key!r} is {short_repr(lat[key])}, not text")
    if rec.get("environment") is not None and not isinstance(rec["environment"], dict):
        raise bad(f"'environment' is {short_repr(rec['environment'])}, not a mapping")
    added = rec.get("fields_added_since")
    if added is not None and not (isinstance(added, list) and all(isinstance(k, str) for k in added)):
        raise bad(f"'fields_added_since' is {short_repr(added)}, not a list of field names")


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
