"""An evolved function as plain text: parse, print, and render as a readable formula.

The grammar is `expr := TERMINAL | OP "(" expr ("," expr)* ")"` over the names in `space.py`,
nothing else (no numbers, strings, attributes or calls of other names). Text is parsed here
into DEAP nodes taken from the primitive set; it never reaches `eval` (DEAP's `compile` and
`PrimitiveTree.from_string` evaluate text, so neither is used on text from outside).

>>> tree = parse_expression("div(abs(sub(g_mean(P), g_mean(Q))), rho1(add(std(P), std(Q))))")
>>> len(tree), expression_text(tree) == str(tree)
(13, True)
>>> formula(tree)
'|g_mean(P) - g_mean(Q)| / (std(P) + std(Q) + 1e-4)'
"""
from __future__ import annotations

import re

from deap import gp

from ...core.errors import ConfigError
from .space import OPS, PSET, TERMINALS

MAX_TEXT = 20_000  # characters
MAX_NODES = 2_000
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([(),]))")


def _tokens(text: str) -> list[tuple[str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise ConfigError(f"invalid evolved expression: unexpected {text[pos:pos + 12]!r} at character {pos}; "
                              "write operators applied to terminals, e.g. div(var(P), rho5(var(Q)))")
        out.append((m.group(1) or m.group(2), m.start(m.lastindex)))
        pos = m.end()
    return out


def parse_expression(text: str) -> gp.PrimitiveTree:
    """Text -> DEAP PrimitiveTree, checked against the design space; ConfigError if malformed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("an evolved expression must be non-empty text, e.g. 'div(var(P), rho5(var(Q)))'")
    if len(text) > MAX_TEXT:
        raise ConfigError(f"evolved expression is {len(text):,} characters long (limit {MAX_TEXT:,})")
    tokens = _tokens(text)
    nodes: list = []
    i = _parse(tokens, 0, nodes, text)
    if i != len(tokens):
        raise ConfigError(f"invalid evolved expression: unexpected {tokens[i][0]!r} at character {tokens[i][1]} "
                          "after a complete expression")
    return gp.PrimitiveTree(nodes)


def _fail(text: str, what: str, pos: int):
    raise ConfigError(f"invalid evolved expression: {what} at character {pos} of {text[:60]!r}; operators: "
                      f"{', '.join(OPS)}; terminals: {', '.join(TERMINALS)}")


def _expect(tokens, i, want, text):
    if i >= len(tokens) or tokens[i][0] != want:
        _fail(text, f"expected {want!r}", tokens[i][1] if i < len(tokens) else len(text))
    return i + 1


def _parse(tokens: list, i: int, nodes: list, text: str) -> int:
    """Parse one expression from tokens[i]; append its nodes in prefix order; return the next index."""
    pending: list[list[int]] = []  # per open call: [arguments still to read]; a loop, not recursion,
    # so that deep trees cannot hit Python's recursion limit
    while True:
        if i >= len(tokens):
            _fail(text, "the expression ends early", len(text))
        name, pos = tokens[i]
        if len(nodes) >= MAX_NODES:
            _fail(text, f"more than {MAX_NODES} nodes", pos)
        if name in TERMINALS:
            nodes.append(PSET.mapping[name])
            i += 1
        elif name in OPS:
            nodes.append(PSET.mapping[name])
            i = _expect(tokens, i + 1, "(", text)
            pending.append([OPS[name][1]])
            continue
        else:
            _fail(text, f"unknown name {name!r}" if name not in "()," else f"unexpected {name!r}", pos)
        while pending:  # one argument finished: close calls whose arguments are all read
            pending[-1][0] -= 1
            if pending[-1][0] > 0:
                i = _expect(tokens, i, ",", text)
                break
            pending.pop()
            i = _expect(tokens, i, ")", text)
        if not pending:
            return i


def expression_text(tree: gp.PrimitiveTree) -> str:
    """The canonical text of a tree (DEAP's own printing: `op(arg, arg)`)."""
    return str(tree)


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mmul": "@"}
# functions keep their text names (g_mean is the mean of all entries, mean the column mean: a
# formula written back as text must not swap them); only names that are no operator are spelt out
_NAMES = {"num": "n", "tran": "transpose", "out_dot": "outer"}


def formula(tree: gp.PrimitiveTree) -> str:
    """A readable infix formula: |x| for abs, x^2 for pow2, (x + 1e-4) for rho1, a @ b for mmul.

    Built on a stack from the last node to the first (no recursion: a text may nest 2,000 deep)."""
    wrap = lambda a: a[0] if a[1] else f"({a[0]})"
    stack: list[tuple[str, bool]] = []  # (text, is atomic); the top is the next argument in order
    for node in reversed(tree):
        if node.arity == 0:
            name = node.format()  # the renamed argument (node.name stays ARGi)
            stack.append(("n_P" if name == "N" else name, True))
            continue
        args = [stack.pop() for _ in range(node.arity)]
        if node.name in _INFIX:
            stack.append((f"{wrap(args[0])} {_INFIX[node.name]} {wrap(args[1])}", False))
        elif node.name == "abs":
            stack.append((f"|{args[0][0]}|", True))
        elif node.name == "pow2":
            stack.append((f"{wrap(args[0])}^2", True))
        elif node.name in ("rho1", "rho5"):
            stack.append((f"({args[0][0]} + {'1e-4' if node.name == 'rho1' else '0.05'})", True))
        else:
            stack.append((f"{_NAMES.get(node.name, node.name)}({', '.join(a[0] for a in args)})", True))
    return stack[0][0]
