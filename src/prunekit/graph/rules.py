"""The table of channel rules, keyed by op name (e.g. "conv2d", "add", "view").

A rule is a function `rule(tracer, call)`: it reads the ids of `call`'s tensor arguments
(`tracer.ids(t)`), joins ids that must be pruned together (`tracer.uf`), records parameter
slices (`tracer.add_member`) and sets the ids of the outputs (`tracer.set_ids`). Unknown ops
that touch channels raise an error naming the op and the module; `register_rule` teaches
prunekit a new one: `passthrough` for ops that keep channel positions (activations),
`opaque` for ops that mix channels in ways prunekit cannot follow (their channels are kept).

>>> from prunekit.graph.rules import register_rule, passthrough, RULES
>>> _ = register_rule("my_activation", passthrough)
>>> "my_activation" in RULES
True
"""
from __future__ import annotations

from typing import Callable

from ..core.errors import ConfigError
from ..core.registry import Registry

RULES: Registry[Callable] = Registry("graph rule")


def register_rule(name: str, rule: Callable, replace: bool = False) -> Callable:
    """Register `rule` for op `name` (the function's __name__, e.g. "conv2d" or "__add__"): a
    callable `rule(tracer, call)`. An op has one rule: `replace=True` puts `rule` in place of the
    one registered (prunekit's own included; a group meeting a replaced rule is probed, as any
    user rule)."""
    import inspect

    if not callable(rule):
        raise ConfigError(f"register_rule({name!r}, ...): the rule must be a callable rule(tracer, call), got "
                          f"{type(rule).__name__}")
    try:
        inspect.signature(rule).bind(None, None)
    except TypeError:
        raise ConfigError(f"register_rule({name!r}, ...): the rule must take two arguments (tracer, call); "
                          f"{getattr(rule, '__qualname__', rule)!r} takes {inspect.signature(rule)}") from None
    except ValueError:  # a builtin without a signature: taken as it is
        pass
    if replace:
        RULES.unregister(name)
    elif name in RULES.list() and RULES.get(name) is not rule:
        raise ConfigError(f"op {name!r} already has a rule; pass replace=True to use this one instead")
    return RULES.register(name, rule)


def rule_table() -> dict[str, Callable]:
    return {name: RULES.get(name) for name in RULES.list()}


def builtin_rule_names() -> set[str]:
    """Op names whose rule is still prunekit's own (a rule registered by a user is not vouched for)."""
    return {name for name, rule in _BUILTIN.items() if RULES.get(name) is rule}


from .rules_tensor import passthrough  # noqa: E402  (registers tensor rules)
from .rules_tensor import _fix_all as opaque  # noqa: E402  (rule: keep every channel the op touches)
from . import rules_shape  # noqa: E402,F401  (registers shape and slicing rules)
from . import rules_layers  # noqa: E402,F401  (registers layer rules)
from . import rules_mha  # noqa: E402,F401  (registers the nn.MultiheadAttention rule)
from . import rules_rnn  # noqa: E402,F401  (registers the LSTM/GRU/RNN rule)

_BUILTIN = rule_table()  # prunekit's own rules, as registered by the modules above
