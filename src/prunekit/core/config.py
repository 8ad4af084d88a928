"""Typed, validated, versioned configs. YAML recipes only fill these dataclasses.

A config subclass declares its fields and checks them in `validate()`; `__post_init__` calls it,
so an invalid config never exists. Before `validate()` runs, every float held by a field (also
inside lists, tuples and dicts) must be finite: NaN compares false with everything, so it would
slip through every range check, and no prunekit setting means anything at infinity. `to_dict`/`from_dict` round-trip, with the class's `version`
recorded so that a saved config from an older layout is recognised. A field annotated with a
config class takes that config or a mapping of its fields; a tuple given to a list field is kept
as the list it is written as.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo(Config):
...     ratio: float = 0.5
...     def validate(self):
...         check_range("ratio", self.ratio, 0.0, 1.0, lo_open=False, hi_open=True)
>>> Demo.from_dict({"ratio": 0.25}).to_dict()
{'ratio': 0.25, 'version': 1}
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import reprlib
import types
import typing
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError, ConfigSchemaError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name, (sub, optional) in _config_fields(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, sub.from_dict(value))
            elif not isinstance(value, sub) and not (optional and value is None):
                raise ConfigError(f"{name}={short_repr(value)} must be a mapping of {sub.__name__} fields")
        for name in _list_fields(type(self)):
            if isinstance(getattr(self, name), tuple):  # written as a list, so read back as one
                setattr(self, name, list(getattr(self, name)))
        names, flags = _string_list_fields(type(self)), _bool_fields(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in flags and not isinstance(value, bool) and not (value is None and flags[f.name]):
                # a quoted "false" would read as true
                raise ConfigError(f"{f.name}={short_repr(value)} must be true or false"
                                  + (" (or null)" if flags[f.name] else ""))
            check_finite(f.name, getattr(self, f.name))
            check_limit(f.name, getattr(self, f.name))
            if f.name in names:
                check_names(f.name, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    def check_model(self, model: Any, example_inputs: Any = None) -> None:
        """ConfigError if this config cannot apply to `model` (a layer name it gives is missing,
        say; with `example_inputs`, a target it cannot reach). Callers run it before any training,
        so that a typo costs seconds, not a dense training; overridden by configs that name parts
        of the model."""

    def check_model_with(self, model: Any, example_inputs: Any) -> None:
        """`check_model` with the example inputs when the override takes them (configs written for
        the one-argument form still work)."""
        try:
            takes = len(inspect.signature(self.check_model).parameters) >= 2
        except (TypeError, ValueError):
            takes = False
        if takes:
            self.check_model(model, example_inputs)
        else:
            self.check_model(model)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else _plain(v)
        out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} needs a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise ConfigSchemaError(
                f"{cls.__name__} version {version} is not supported (this prunekit reads version {cls.version})"
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - set(names)))  # str: a key from YAML may be a number or null
        if unknown:
            shown = [k + "".join(f" (did you mean {g}?)" for g in difflib.get_close_matches(k, list(names), n=1))
                     for k in unknown]
            raise ConfigSchemaError(f"{cls.__name__}: unknown key(s) {', '.join(shown)}; allowed: {', '.join(sorted(names))}")
        missing = [n for n, f in names.items() if f.init and n not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required key(s) {', '.join(missing)}")
        try:  # a nested config given as a mapping is built by __post_init__
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{cls.__name__}: {err}") from None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 (an unresolvable annotation: no field is checked, as before)
        return {}


def _alternatives(hint: Any) -> tuple[Any, ...]:
    """The types a field may hold: those of a Union (`X | None`), else the hint itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


_NESTED: dict[type, dict[str, tuple[type[Config], bool]]] = {}


def _config_fields(cls: type) -> dict[str, tuple[type[Config], bool]]:
    """Fields annotated with a Config subclass: name -> (that class, whether None is allowed)."""
    if cls not in _NESTED:
        _NESTED[cls] = {}
        for name, hint in _hints(cls).items():
            options = _alternatives(hint)
            sub = next((c for c in options if isinstance(c, type) and issubclass(c, Config)), None)
            if sub is not None:
                _NESTED[cls][name] = (sub, type(None) in options)
    return _NESTED[cls]


_LISTS: dict[type, frozenset[str]] = {}


def _list_fields(cls: type) -> frozenset[str]:
    """Names of the fields annotated `list` (or `list[...]`, or either or None)."""
    if cls not in _LISTS:
        _LISTS[cls] = frozenset(name for name, hint in _hints(cls).items()
                                if any(h is list or typing.get_origin(h) is list for h in _alternatives(hint)))
    return _LISTS[cls]


_STRING_LISTS: dict[type, frozenset[str]] = {}


def _string_list_fields(cls: type) -> frozenset[str]:
    """Names of the fields annotated `list[str]` or `tuple[str, ...]` (module names to ignore, ...)."""
    if cls not in _STRING_LISTS:
        _STRING_LISTS[cls] = frozenset(
            name for name, hint in _hints(cls).items()
            if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint)[:1] == (str,))
    return _STRING_LISTS[cls]


_BOOLS: dict[type, dict[str, bool]] = {}


def _bool_fields(cls: type) -> dict[str, bool]:
    """{name: whether None is allowed} of the fields annotated `bool` (or `bool | None`)."""
    if cls not in _BOOLS:
        _BOOLS[cls] = {name: type(None) in _alternatives(hint) for name, hint in _hints(cls).items()
                       if set(_alternatives(hint)) - {type(None)} == {bool}}
    return _BOOLS[cls]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, 60, 60


def short_repr(value: Any) -> str:
    """repr(value) cut to a few elements per level, for error messages that quote what was given."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_names(name: str, value: Any) -> None:
    """Raise ConfigError unless `value` is a list (or tuple) of strings.

    A plain string is refused too: iterated, 'conv1' would be the names 'c', 'o', 'n', ...

    >>> check_names("ignore", ["conv1", "fc"])
    >>> check_names("ignore", "fc")
    Traceback (most recent call last):
    prunekit.core.errors.ConfigError: ignore='fc' must be a list of names (strings), e.g. ['fc'] or []
    """
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        example = [value] if isinstance(value, str) else []
        raise ConfigError(f"{name}={short_repr(value)} must be a list of names (strings), "
                          f"e.g. {example or ['fc']} or []")


def check_folder_name(name: str, value: Any) -> None:
    """Raise ConfigError unless `value` can name one folder: text, not empty, '.' or '..', without
    path separators, NUL or other control characters, and without leading or trailing spaces.

    >>> check_folder_name("name", "resnet20-pruned")
    >>> check_folder_name("name", "a/b")
    Traceback (most recent call last):
    prunekit.core.errors.ConfigError: name='a/b' names a folder: use text without path separators, control characters (NUL among them) or leading and trailing spaces, not '.' or '..'
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={short_repr(value)} must be a non-empty string (it names a folder; quote it in "
                          f"YAML: {name}: '{value}')")
    if (value in (".", "..") or any(c in value for c in "/\\") or not value.isprintable()
            or value != value.strip()):
        raise ConfigError(f"{name}={value!r} names a folder: use text without path separators, control characters "
                          "(NUL among them) or leading and trailing spaces, not '.' or '..'")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > 200:  # file systems stop at 255 bytes a name
        raise ConfigError(f"{name}={short_repr(value)} names a folder and is {size} bytes long: use at most 200")


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_finite(name: str, value: Any) -> None:
    """Raise ConfigError if `value` is, or holds (lists, tuples, dict values), a NaN or infinite float.

    Nested configs are skipped: they checked their own fields when they were built.

    >>> check_finite("lr", [0.1, 0.2])
    >>> check_finite("lr", float("nan"))
    Traceback (most recent call last):
    prunekit.core.errors.ConfigError: lr=nan is not a finite number; give a finite value
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not a finite number; give a finite value")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(f"{name}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(f"{name}.{k}", v)


MAX_SEED = 2**64 - 1  # torch.manual_seed takes 64 bits
MAX_THREADS = 1024  # torch.set_num_threads far beyond the cores crashes in thread creation


def check_limit(name: str, value: Any) -> None:
    """ConfigError for a seed (a field `seed`, `*_seed` or a `seeds` list) above MAX_SEED or a
    thread count (`threads`, `*_threads`, `threads_per_job`) above MAX_THREADS: values every
    other check accepts but torch cannot use. Config.__post_init__ applies it to every field."""
    limit = (MAX_SEED if name == "seed" or name.endswith("_seed") or name == "seeds" else
             MAX_THREADS if name == "threads" or name.endswith("_threads") or name == "threads_per_job" else None)
    if limit is None:
        return
    for v in value if name == "seeds" and isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, int) and not isinstance(v, bool) and v > limit:
            what = "a seed" if limit == MAX_SEED else "a thread count"
            raise ConfigError(f"{name}={short_repr(value)} is too large for {what}; use at most {limit:,}")


def check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError unless lo <= value <= hi (open ends excluded); NaN and infinities never pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {short_repr(value)}")
    check_finite(name, value)
    # written as "not inside" so that any comparison that fails (as NaN's all do) means out of range
    bad = not (lo <= value <= hi) or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        if hi == math.inf:  # an interval open to infinity reads as a bound
            raise ConfigError(f"{name}={value!r} is out of range; use a value {'>' if lo_open else '>='} {lo:g}")
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{name}={value!r} is out of range; use a value in {left}{lo}, {hi}{right}")


def check_int(name: str, value: Any, lowest: int) -> None:
    """Raise ConfigError unless `value` is an int (not a bool) >= `lowest`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {lowest}")


def check_unused(config: Config, names: typing.Iterable[str], context: str) -> None:
    """ConfigError naming every field of `names` set away from its default: `context` (e.g.
    "with optimization='admm'") does not read them, and silently ignoring a setting misleads."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changed = []
    for name in names:
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if getattr(config, name) != default:
            changed.append(f"{name}={short_repr(getattr(config, name))}")
    if changed:
        raise ConfigError(f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect {context}; "
                          f"leave {'it' if len(changed) == 1 else 'them'} out")


def check_choice(name: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
