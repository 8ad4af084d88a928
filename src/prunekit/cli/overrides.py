"""YAML reading and `key=value` overrides for recipes.

Values are read as YAML, so `train.epochs=3` is an int, `train=null` removes a section,
`method.ignore=[fc]` is a list and `data.root=/data/x` a string. Unlike PyYAML's default
loader, numbers written as `1e-3` are floats (YAML 1.2), not strings.

>>> raw = {"train": {"epochs": 8}}
>>> apply_overrides(raw, ["train.epochs=3", "train.lr=1e-3", "finetune.epochs=2"])
{'train': {'epochs': 3, 'lr': 0.001}, 'finetune': {'epochs': 2}}
>>> parse_override("train.epochs")
Traceback (most recent call last):
...
prunekit.core.errors.ConfigError: override 'train.epochs' is not key=value; write it like train.epochs=3
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..core.errors import ConfigError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |[0-9][0-9_]*[eE][-+]?[0-9]+
                        |\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 / 5E4 as floats and refuses a key written twice in one mapping."""

    def compose_mapping_node(self, anchor):
        # checked as written, before merges (<<: *base) are flattened: a key may override a merged one
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str":
                if key_node.value in seen:
                    raise yaml.composer.ComposerError(None, None, f"the key {key_node.value!r} is written twice",
                                                      key_node.start_mark)
                seen.add(key_node.value)
        return node


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that keeps the key order of the dict it is given and quotes the strings `_Loader`
    would read as something else (1e3 is a float there, a string to PyYAML's default resolver)."""


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


MAX_YAML_VALUES = 100_000


def _check_loaded(data: Any, where: str) -> Any:
    """ConfigError if `data` holds more than MAX_YAML_VALUES values once anchors and aliases are
    followed (a few lines of aliases can stand for billions of values, and every later check walks
    them all), or a mapping key that is not a string (`1: a`, `null: x`)."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: the YAML holds more than {MAX_YAML_VALUES:,} values once its aliases "
                              "(*name) are expanded; a recipe needs a few hundred: write the values out")
        if isinstance(value, dict):
            odd = next((k for k in value if not isinstance(k, str)), None)
            if odd is not None or None in value:
                raise ConfigError(f"{where}: the key {'null' if odd is None else repr(odd)} is not a name; recipe keys are names such as "
                                  "epochs or lr (quote it if it is meant as one)")
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line ConfigError naming `where`."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise ConfigError(f"{where}: YAML nested too deeply to read; a recipe needs a few levels") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        # a value its constructor cannot build: a date that does not exist (2023-02-30), `!!int 3.5`
        raise ConfigError(f"{where}: invalid YAML: a value cannot be read ({type(err).__name__}: {err}); "
                          "quote it to keep it as text") from None
    return _check_loaded(data, where)


def load_yaml_file(path: str | Path, weights_hint: bool = False) -> Any:
    """The YAML document in the recipe file `path`; weights_hint: a binary file is named as weights
    the run/prune commands take with --weights or init= (other commands have neither)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot read recipe {path}: it is a directory; give a recipe file (a run directory "
                          f"keeps the recipe it ran as {path / 'recipe.yaml'})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:  # a weights file or an archive in the recipe's place
        todo = (f"give weights with --weights {path} or init={path}, and a recipe file or run directory as the "
                "recipe" if weights_hint else "give a YAML recipe file")
        raise ConfigError(f"{path} is not a YAML recipe (it is not UTF-8 text); {todo}") from None
    return load_yaml_text(text, str(path))


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} is not key=value; write it like train.epochs=3")
    parts = key.strip().split(".")
    bad = [p for p in parts if not _KEY.fullmatch(p)]
    if bad:
        raise ConfigError(f"override {text!r} has an invalid key {key.strip()!r}; keys are dotted names "
                          "such as train.lr or method.macs_fraction")
    parsed = load_yaml_text(value, f"override {text!r}") if value.strip() else None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str],
                    allowed_top: Iterable[str] | None = None) -> dict[str, Any]:
    """Return a copy of `raw` with every override applied in order (later ones win)."""
    out = copy.deepcopy(raw)
    allowed = sorted(allowed_top) if allowed_top is not None else None
    for text in overrides:
        parts, value = parse_override(text)
        if allowed is not None and parts[0] not in allowed:
            raise ConfigError(f"override {text!r}: unknown recipe key {parts[0]!r}; allowed: {', '.join(allowed)}")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is {child!r}, not a section, so it has no "
                                  f"key {parts[i + 1]!r}; set {where}=... instead")
            node = child
        node[parts[-1]] = value
    return out
