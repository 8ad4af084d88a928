"""The design space of evolved pruning functions: 9 terminals, 21 untyped NumPy operators.

A function f(P, Q, N, X, mX, mP, mQ, WI, W) scores one channel for one class c (P: the rows of
the channel's feature map X (N x D) with label c, Q: the other rows, N: the count of P, mX/mP/mQ:
column means, WI: the channel's incoming filter, W: the layer's filters, one row per channel);
a channel's score is the sum over classes. The semantics are the authors' (untyped DEAP):

* `sub`, `mul`, `mmul` trim both operands to their common dimension (last dim of the left
  operand against the last / first dim of the right one), `add` is plain NumPy broadcasting;
* `trace` and `inv` act on the leading square block (`inv` adds the ridge 1e-4 I first);
* `rho1`, `rho5` add the ridges 1e-4 and 5e-2; `mean` is the column mean of a matrix with more
  than one column (else the global mean), `g_mean`, `sum`, `std`, `var` are global;
* `num` is the number of rows; `geo_median` is the row of W with the least summed L2 distance
  to the others (FPGM's medoid).

Two deliberate differences: a 0-d array counts as a scalar (the authors' np.isscalar does not,
which made e.g. trace(tran(g_mean(P))) an error), and N and `num` are floats (the authors' NumPy
integer counts wrap past 2**63: pow2 applied four times to a count of 30 gave a negative score).
Every result is capped at MAX_ELEMENTS entries (np.outer of two feature maps would need
gigabytes): past it, evaluation fails like any other invalid candidate.

>>> import numpy as np
>>> OPS["sub"][0](np.ones((2, 3)), np.ones(2)).shape
(2, 2)
"""
from __future__ import annotations

import numpy as np
from deap import gp

TERMINALS = ("P", "Q", "N", "X", "mX", "mP", "mQ", "WI", "W")
MAX_ELEMENTS = 4_000_000


class EvalError(ValueError):
    """An expression has no finite value on an argument (shape mismatch, too large, too slow...)."""


def _scalar(x) -> bool:
    return np.ndim(x) == 0


def _guard(shape_size: int) -> None:
    if shape_size > MAX_ELEMENTS:
        raise EvalError(f"an intermediate result would hold {shape_size:,} entries (limit {MAX_ELEMENTS:,})")


def _capped(fn):
    """NumPy's elementwise `fn`, refused when its broadcast result would pass the cap (an (n, 1)
    and a (1, n) operand broadcast to n x n)."""
    def op(a, b):
        _guard(int(np.prod(np.broadcast_shapes(np.shape(a), np.shape(b)))))
        return fn(a, b)
    return op


_add, _multiply, _divide = map(_capped, (np.add, np.multiply, np.divide))


def op_trace(a):
    if _scalar(a):
        return a
    a = np.asarray(a)
    if a.ndim == 1:
        return a[0]
    dim = min(a.shape)
    return np.trace(a[:dim, :dim])


def op_inv(a):
    if _scalar(a):
        return 1 / a
    a = np.asarray(a)
    if a.ndim == 1:
        return 1 / a[0]
    dim = min(a.shape)
    _guard(dim * dim * 4)  # pinv's work grows with dim^3; the cap bounds dim at ~1000
    return np.linalg.pinv(a[:dim, :dim] + 1e-4 * np.eye(dim))


def _trim_last(a, b):
    dim = min(a.shape[-1], b.shape[-1])
    return a[..., :dim], b[..., :dim]


def op_sub(a, b):
    if _scalar(a) or _scalar(b):
        return np.subtract(a, b)
    return np.subtract(*_trim_last(np.asarray(a), np.asarray(b)))


def op_mmul(a, b):
    if _scalar(a) or _scalar(b):
        return np.multiply(a, b)
    a, b = np.asarray(a), np.asarray(b)
    dim = min(a.shape[-1], b.shape[0])
    _guard(int(np.prod(a.shape[:-1])) * int(np.prod(b.shape[1:])))
    return np.matmul(a[..., :dim], b[:dim])


def op_mul(a, b):
    if _scalar(a) or _scalar(b):
        return np.multiply(a, b)
    a, b = np.asarray(a), np.asarray(b)
    dim = min(a.shape[-1], b.shape[0])
    return _multiply(a[..., :dim], b[:dim])


def op_outer(a, b):
    _guard(np.size(a) * np.size(b))
    return np.outer(a, b)


def op_mean(a):
    a = np.asarray(a)
    if a.ndim < 2:
        raise EvalError("mean needs a matrix")
    return a.mean(0) if a.shape[1] > 1 else a.mean()


def op_num(a):
    if _scalar(a):
        raise EvalError("num of a scalar")
    return float(len(a))


def op_geo_median(w):
    w = np.asarray(w)
    if w.ndim < 1 or w.shape[0] < 1:
        raise EvalError("geo_median needs rows")
    flat = w.reshape(w.shape[0], -1)
    _guard(flat.shape[0] ** 2)
    dist = np.sqrt(np.maximum((flat ** 2).sum(1)[:, None] + (flat ** 2).sum(1)[None] - 2 * flat @ flat.T, 0))
    return w[int(np.argmin(dist.sum(1)))]


# name -> (function, arity); the order is the authors' order of addPrimitive
OPS = {
    "trace": (op_trace, 1), "mmul": (op_mmul, 2), "inv": (op_inv, 1), "add": (_add, 2),
    "sub": (op_sub, 2), "mul": (op_mul, 2), "out_dot": (op_outer, 2), "tran": (np.transpose, 1),
    "g_mean": (np.mean, 1), "mean": (op_mean, 1), "sum": (np.sum, 1), "std": (np.std, 1),
    "var": (np.var, 1), "div": (_divide, 2), "abs": (np.absolute, 1), "pow2": (np.square, 1),
    "num": (op_num, 1), "sqrt": (np.sqrt, 1), "rho1": (lambda a: np.add(a, 1e-4), 1),
    "rho5": (lambda a: np.add(a, 5e-2), 1), "geo_median": (op_geo_median, 1),
}

# The seven hand-made metrics as trees (the initial population), in the text form `text.py` parses.
SEEDS = {
    "abs_snr": "div(abs(sub(g_mean(P), g_mean(Q))), rho1(add(std(P), std(Q))))",
    "fdr": "div(pow2(sub(g_mean(P), g_mean(Q))), rho1(add(var(P), var(Q))))",
    "sym_div": "add(add(div(var(P), rho5(var(Q))), div(var(Q), rho5(var(P)))), "
               "div(pow2(sub(g_mean(P), g_mean(Q))), rho5(add(var(P), var(Q)))))",
    "t_stat": "div(abs(sub(g_mean(P), g_mean(Q))), sqrt(rho1(add(div(var(P), num(P)), div(var(Q), num(Q))))))",
    "seed_l1": "sum(abs(WI))",
    "seed_l2": "sqrt(sum(pow2(WI)))",
    "seed_geo_median": "sqrt(sum(pow2(sub(WI, geo_median(W)))))",
}
# The authors' evolved functions written in the same space (their closed forms are in closed_forms.py).
EVOLVED = {
    "ga_func2": "sum(add(add(div(var(P), rho5(var(Q))), div(var(Q), rho5(var(P)))), "
                "div(pow2(sub(add(mul(mul(std(mX), var(Q)), mX), var(P)), g_mean(Q))), rho5(add(var(Q), var(P))))))",
}


def create_pset() -> gp.PrimitiveSet:
    """DEAP's untyped PrimitiveSet of the design space (arguments renamed to the terminals)."""
    pset = gp.PrimitiveSet("pruning_function", len(TERMINALS))
    pset.renameArguments(**{f"ARG{i}": name for i, name in enumerate(TERMINALS)})
    for name, (fn, arity) in OPS.items():
        pset.addPrimitive(fn, arity, name=name)
    return pset


PSET = create_pset()
