"""The design space: trees as text, the walker against the closed forms, hostile text."""
import random

import numpy as np
import pytest
import torch
from deap import gp
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.errors import ConfigError
from prunekit.importance.evolved.closed_forms import FILTER_FUNCTIONS, STAT_FUNCTIONS
from prunekit.importance.evolved.space import EVOLVED, PSET, SEEDS, EvalError, op_mul, op_sub
from prunekit.importance.evolved.stats import ClassStats
from prunekit.importance.evolved.text import formula, parse_expression
from prunekit.importance.evolved.tree_eval import EvolvedCriterion, channel_scores, evaluate_tree


def _class_data(n=50, k=4, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return rng.normal(size=(n, k, d)) + y[:, None, None] * 0.3, y


@pytest.mark.parametrize("name", sorted({**SEEDS, **EVOLVED}))
def test_seed_trees_equal_closed_forms(name):
    X, y = _class_data()
    filters = np.random.default_rng(2).normal(size=(4, 9))
    got = channel_scores(parse_expression({**SEEDS, **EVOLVED}[name]), X, y, filters)
    if name in FILTER_FUNCTIONS:  # the class loop multiplies a weight metric by the number of classes
        want = 3 * FILTER_FUNCTIONS[name](torch.from_numpy(filters)).numpy()
    else:
        s = ClassStats.empty(3, 4, 6)
        s.add(torch.from_numpy(X), torch.from_numpy(y))
        want = STAT_FUNCTIONS[name](s.moments()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_untyped_semantics_trim_and_broadcast():
    a, b = np.arange(6.).reshape(2, 3), np.arange(2.)
    np.testing.assert_array_equal(op_sub(a, b), a[:, :2] - b)  # trimmed to the common last dim
    np.testing.assert_array_equal(op_mul(a, b), a[:, :2] * b)  # left last dim against right first dim
    env = {"P": a, "Q": b}
    with pytest.raises(EvalError):  # add broadcasts as NumPy does: (2,3) + (2,) does not
        evaluate_tree(parse_expression("add(P, Q)"), env)
    assert evaluate_tree(parse_expression("add(P, g_mean(Q))"), env).shape == (2, 3)


def test_outer_of_large_maps_is_refused_not_allocated():
    x = np.ones((3000, 3000))
    with pytest.raises(EvalError, match="limit"):
        evaluate_tree(parse_expression("out_dot(X, X)"), {"X": x})


@pytest.mark.parametrize("op", ["add", "div", "mul"])
def test_broadcast_past_the_cap_is_refused_not_allocated(op):
    # a column (n, 1) against a row (1, n) broadcasts to n x n: 6,400^2 = 41M entries from 6,400
    column = "out_dot(X, g_mean(X))"
    with pytest.raises(EvalError, match="limit"):
        evaluate_tree(parse_expression(f"{op}({column}, tran({column}))"), {"X": np.ones((100, 64))})


def test_a_score_past_float32_is_no_finite_score():
    # 24,000^16 is finite in float64 but inf in the float32 the pruner ranks scores in: the validity
    # check passed such a function, then pruning with it failed ("NaN or inf scores") and it scored 0
    maps, labels = np.full((6, 1, 4), 1e3), np.array([0, 1] * 3)
    with pytest.raises(EvalError, match="finite score in float32"):
        channel_scores(parse_expression("pow2(pow2(pow2(pow2(sum(X)))))"), maps, labels, np.ones((1, 2)))
    assert channel_scores(parse_expression("pow2(pow2(sum(X)))"), maps, labels, np.ones((1, 2)))[0] > 0


@pytest.mark.parametrize("count", ["N", "num(P)"])
def test_powers_of_a_class_count_are_real_numbers_not_wrapped_integers(count):
    # 30^16 = 4.3e23 is past int64: as a NumPy integer it wrapped to a negative number and turned
    # the ranking of sum(P) upside down while every score stayed finite
    rng = np.random.default_rng(0)
    maps, labels = np.abs(rng.normal(size=(60, 3, 4))), np.arange(60) % 2
    got = channel_scores(parse_expression(f"mul(sum(P), pow2(pow2(pow2(pow2({count})))))"), maps, labels,
                         np.ones((3, 2)))
    want = [sum(float(maps[labels == c, k].sum()) * 30.0 ** 16 for c in (0, 1)) for k in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_time_limit_stops_evaluation():
    with pytest.raises(EvalError, match="time"):
        evaluate_tree(parse_expression("add(var(X), var(X))"), {"X": np.ones(3)}, deadline=0.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 5))
def test_text_round_trip_of_random_trees(seed, height):
    random.seed(seed)
    tree = gp.PrimitiveTree(gp.genGrow(PSET, 0, height))
    again = parse_expression(str(tree))
    assert [n.name for n in again] == [n.name for n in tree] and str(again) == str(tree)
    assert isinstance(formula(tree), str)


@pytest.mark.parametrize("text, expected", [
    ("sqrt(sum(pow2(rho5(var(mP)))))", "sqrt(sum((var(mP) + 0.05)^2))"),
    ("div(abs(sub(g_mean(P), g_mean(Q))), rho1(add(std(P), std(Q))))", "|g_mean(P) - g_mean(Q)| / (std(P) + std(Q) + 1e-4)"),
    ("add(add(div(var(P), rho5(var(Q))), div(var(Q), rho5(var(P)))), div(pow2(sub(g_mean(P), g_mean(Q))), "
     "rho5(add(var(P), var(Q)))))", "((var(P) / (var(Q) + 0.05)) + (var(Q) / (var(P) + 0.05))) + "
     "((g_mean(P) - g_mean(Q))^2 / (var(P) + var(Q) + 0.05))"),
])
def test_formula_reads_as_written(text, expected):
    assert formula(parse_expression(text)) == expected


def test_a_formulas_function_names_are_the_texts():
    """The formula wrote g_mean (mean of all entries) as mean, the text's column mean: retyped, the
    formula computed another function."""
    assert formula(parse_expression("sub(g_mean(P), mean(P))")) == "g_mean(P) - mean(P)"


def test_formula_of_a_text_nested_as_deep_as_the_parser_allows():
    deep = parse_expression("abs(" * 1500 + "var(P)" + ")" * 1500)  # deeper than Python's recursion limit
    assert formula(deep) == "|" * 1500 + "var(P)" + "|" * 1500


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch {flag}')",
    "add(P, __import__('os').system('touch {flag}'))",
    "eval('open(\"{flag}\", \"w\")')",
    "add(P, Q); import os",
    "P.__class__",
    "lambda: 0",
    "add(P, Q",
    "add(P, Q, X)",
    "sqrt(1e-4)",
])
def test_malformed_or_hostile_text_raises_and_runs_nothing(text, tmp_path):
    flag = tmp_path / "flag"
    with pytest.raises(ConfigError, match="evolved expression"):
        EvolvedCriterion(text.format(flag=flag))
    assert not flag.exists()


def test_evolved_text_prunes_like_the_shipped_closed_form():
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.models import create_model

    torch.manual_seed(0)
    data = [(torch.randn(16, 3, 32, 32), torch.arange(16) % 4) for _ in range(2)]
    plans = []
    for crit in ("ga_func2", "evolved:" + EVOLVED["ga_func2"], "t_stat", "evolved:" + SEEDS["t_stat"]):
        torch.manual_seed(1)
        model = create_model("resnet20", num_classes=10).eval()
        for m in model.modules():  # BN statistics that differ per channel
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
        r = prune_(model, MagnitudeConfig(criterion=crit, channel_ratio=0.4, probe=False), data[0][0][:1], batches=data)
        plans.append(r.plan.groups)
    assert plans[0] == plans[1] and plans[2] == plans[3] and plans[0] != plans[2]


def test_hostile_criterion_in_a_config_raises(tmp_path):
    from prunekit.methods.magnitude import MagnitudeConfig

    flag = tmp_path / "flag"
    with pytest.raises(ConfigError, match="evolved"):
        MagnitudeConfig(criterion=f"evolved:__import__('os').system('touch {flag}')", channel_ratio=0.5)
    assert not flag.exists()


def _scores_without_reuse(tree, maps, labels, filters):
    """channel_scores written out plainly: the tree evaluated afresh for every channel and class."""
    out = []
    for k in range(maps.shape[1]):
        x, total = maps[:, k, :], 0.0
        for c in np.unique(labels):
            p, q = x[labels == c], x[labels != c]
            env = {"X": x, "mX": x.mean(0), "WI": filters[k], "W": filters, "P": p, "Q": q, "N": float(len(p)),
                   "mP": p.mean(0), "mQ": q.mean(0)}
            total = total + np.sum(evaluate_tree(tree, env))
        if not np.isfinite(total) or np.ndim(total) != 0:
            raise EvalError("no finite score")
        out.append(total)
    return np.array(out)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_reused_subtrees_give_the_plain_scores(seed, height):
    random.seed(seed)
    tree = gp.PrimitiveTree(gp.genGrow(PSET, 1, height))
    X, y = _class_data(n=24, k=3, d=5, seed=seed % 1000)
    filters = np.random.default_rng(seed % 997).normal(size=(3, 7))
    try:
        want = _scores_without_reuse(tree, X, y, filters)
    except EvalError:
        with pytest.raises(EvalError):
            channel_scores(tree, X, y, filters)
        return
    np.testing.assert_array_equal(channel_scores(tree, X, y, filters), want)


def test_filter_only_subtree_is_computed_once_per_group(monkeypatch):
    from prunekit.importance.evolved import space

    calls = []
    medoid = space.OPS["geo_median"][0]
    monkeypatch.setitem(space.OPS, "geo_median", (lambda w: calls.append(1) or medoid(w), 1))
    X, y = _class_data(k=4, classes=3)
    filters = np.random.default_rng(2).normal(size=(4, 9))
    got = channel_scores(parse_expression(SEEDS["seed_geo_median"]), X, y, filters)
    assert len(calls) == 1  # 4 channels x 3 classes evaluations, one medoid
    want = 3 * FILTER_FUNCTIONS["seed_geo_median"](torch.from_numpy(filters)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
