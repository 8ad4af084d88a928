"""Evolved functions and seed metrics against a NumPy port of the authors' per-class loop on raw
feature maps (one channel at a time, P/Q as row subsets, np.var/np.std/np.sum of scalar + vector)."""
import numpy as np
import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.importance.criteria import CRITERIA, ScoreContext
from prunekit.importance.evolved.closed_forms import FILTER_FUNCTIONS, STAT_FUNCTIONS
from prunekit.importance.evolved.stats import ClassStats, collect_class_stats, scoring_point


def np_scores(X, y, fn):
    """X (N, D) one channel; fn(P, Q, nP, nQ, mX, mQ) per class -> scalar; summed over classes."""
    mX = X.mean(0)
    total = 0.0
    for c in np.unique(y):
        P, Q = X[y == c], X[y != c]
        total += fn(P, Q, len(P), len(Q), mX, Q.mean(0))
    return total


NUMPY = {
    "ga_func1": lambda P, Q, nP, nQ, mX, mQ: np.sum(np.var(P) + (np.var(Q) - mX) ** 2 / (np.var(Q) + np.var(P) + .05)),
    "ga_func2": lambda P, Q, nP, nQ, mX, mQ: np.sum(
        np.var(P) / (np.var(Q) + .05) + np.var(Q) / (np.var(P) + .05)
        + (np.std(mX) * np.var(Q) * mX + np.var(P) - np.mean(Q)) ** 2 / (np.var(Q) + np.var(P) + .05)),
    "ga_func3": lambda P, Q, nP, nQ, mX, mQ: np.sum((mX - np.var(Q)) ** 2 / np.sqrt(np.var(P) / nP + np.var(Q) / nQ + 1e-4)),
    "ga_func4": lambda P, Q, nP, nQ, mX, mQ: np.sum(np.var(P) / (np.var(Q) / nQ + .05) + abs(P.mean() - Q.mean()) + .05 + mQ),
    "abs_snr": lambda P, Q, *_: abs(P.mean() - Q.mean()) / (P.std() + Q.std() + 1e-4),
    "fdr": lambda P, Q, *_: (P.mean() - Q.mean()) ** 2 / (P.var() + Q.var() + 1e-4),
    "sym_div": lambda P, Q, *_: P.var() / (Q.var() + .05) + Q.var() / (P.var() + .05) + (P.mean() - Q.mean()) ** 2 / (P.var() + Q.var() + .05),
    "t_stat": lambda P, Q, nP, nQ, *_: abs(P.mean() - Q.mean()) / np.sqrt(P.var() / nP + Q.var() / nQ + 1e-4),
}


def _class_data(n=60, k=5, d=7, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, k, d)) + y[:, None, None] * rng.normal(size=(1, k, 1))  # class-dependent shift
    return X, y


@pytest.mark.parametrize("name", sorted(NUMPY))
def test_stat_function_equals_numpy_port(name):
    X, y = _class_data()
    stats = ClassStats.empty(5, X.shape[1], X.shape[2])  # class 4 never occurs: it must be skipped
    stats.add(torch.from_numpy(X), torch.from_numpy(y))
    got = STAT_FUNCTIONS[name](stats.moments()).numpy()
    want = [np_scores(X[:, k], y, NUMPY[name]) for k in range(X.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_eq3_keeps_the_factor_d():
    # with D copies of a column the first term grows D-fold: the closed form keeps the authors' factor
    X, y = _class_data(d=1)
    one, many = ClassStats.empty(4, 5, 1), ClassStats.empty(4, 5, 6)
    one.add(torch.from_numpy(X), torch.from_numpy(y))
    many.add(torch.from_numpy(np.repeat(X, 6, 2)), torch.from_numpy(y))
    m1, m6 = one.moments(), many.moments()
    term1 = lambda m: (m["varP"] / (m["varQ"] + .05) + m["varQ"] / (m["varP"] + .05)).sum(0)
    # std(mX) = 0 for copied columns, so score = D*term1 + D*(var_P - mu_Q)^2/(...): 6x the D=1 score
    np.testing.assert_allclose(STAT_FUNCTIONS["ga_func2"](m6).numpy(), 6 * STAT_FUNCTIONS["ga_func2"](m1).numpy())
    assert float(term1(m1).min()) > 0


def test_streamed_statistics_equal_full_batch():
    X, y = _class_data(n=90)
    full, streamed = ClassStats.empty(4, 5, 7), ClassStats.empty(4, 5, 7)
    full.add(torch.from_numpy(X), torch.from_numpy(y))
    for lo in range(0, 90, 13):  # uneven batches
        streamed.add(torch.from_numpy(X[lo:lo + 13]), torch.from_numpy(y[lo:lo + 13]))
    for key, v in full.moments().items():
        torch.testing.assert_close(streamed.moments()[key], v)


def test_streamed_statistics_grow_to_classes_that_arrive_late():
    """Batches sorted by label: each later batch brings classes the accumulator has not seen, as
    happens when `collect_class_stats` sizes it from a first batch that lacks the top classes."""
    X, y = _class_data(n=90)
    order = np.argsort(y, kind="stable")
    X, y = X[order], y[order]
    full, grown = ClassStats.empty(4, 5, 7), ClassStats.empty(1, 5, 7)
    full.add(torch.from_numpy(X), torch.from_numpy(y))
    for lo in range(0, 90, 13):
        grown.add(torch.from_numpy(X[lo:lo + 13]), torch.from_numpy(y[lo:lo + 13]))
    assert grown.counts.tolist() == np.bincount(y, minlength=4).tolist()
    for key, v in full.moments().items():
        torch.testing.assert_close(grown.moments()[key], v)


def test_collected_stats_grow_when_the_first_batch_lacks_classes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x, y = torch.randn(24, 2, 4, 4), torch.arange(24) // 6  # label-sorted: the first batch holds class 0 only
    g = build_graph(m, x[:1]).group("0")
    s = collect_class_stats(m, [g], [(x[:5], y[:5]), (x[5:14], y[5:14]), (x[14:], y[14:])])["0"]
    ref = ClassStats.empty(4, 3, 16)
    ref.add(m[1](m[0](x)).detach().double().reshape(24, 3, 16), y)
    assert s.counts.tolist() == [6.0, 6.0, 6.0, 6.0]
    for key, v in ref.moments().items():
        torch.testing.assert_close(s.moments()[key], v)


def test_collected_stats_are_sized_by_the_classes_seen_not_by_the_label_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x, y = torch.randn(12, 2, 4, 4), torch.arange(12) % 3
    g = build_graph(m, x[:1]).group("0")
    sparse = collect_class_stats(m, [g], [(x, y * 10 ** 12)])["0"]  # rows 0..2e12 would need 800 TB
    dense = collect_class_stats(m, [g], [(x, y)])["0"]
    assert sparse.counts.tolist() == [4.0, 4.0, 4.0]
    for key, v in dense.moments().items():
        torch.testing.assert_close(sparse.moments()[key], v)


def test_collected_stats_read_the_consumer_input_after_bn_and_relu():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    m[1].running_mean.uniform_(-1, 1)
    x, y = torch.randn(20, 2, 4, 4), torch.arange(20) % 3
    g = build_graph(m, x[:1]).group("0")
    assert scoring_point(m, g).module == "3" and scoring_point(m, g).where == "input"
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    s = collect_class_stats(m, [g], batches)["0"]
    a = m[2](m[1](m[0](x))).detach().double().reshape(20, 3, 16)
    ref = ClassStats.empty(3, 3, 16)
    ref.add(a, y)
    torch.testing.assert_close(s.colsum, ref.colsum)
    torch.testing.assert_close(s.sumsq, ref.sumsq)


def test_flatten_linear_group_scores_each_channels_columns():
    m = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
    p = scoring_point(m, g)
    assert p.module == "3" and [t.tolist() for t in p.positions] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_group_without_consumer_reads_producer_output():
    m = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
    assert scoring_point(m, g).where == "output"


@pytest.mark.parametrize("name", sorted(FILTER_FUNCTIONS))
def test_filter_seeds_equal_numpy(name):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(6, 2, 3, 3))  # (out, in, kh, kw)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 1, 1))
    m[0].weight.data = torch.from_numpy(W).float()
    g = build_graph(m, torch.randn(1, 2, 5, 5)).group("0")
    got = CRITERIA.get(name)(g, ScoreContext(m)).numpy()
    W = m[0].weight.detach().double().numpy()
    gm = W[np.argmin([sum(np.linalg.norm((W[i] - W[j]).ravel()) for j in range(6)) for i in range(6)])]
    want = {"seed_l1": [np.sum(np.abs(w)) for w in W], "seed_l2": [np.sqrt(np.sum(w ** 2)) for w in W],
            "seed_geo_median": [np.sqrt(np.sum((w - gm) ** 2)) for w in W]}[name]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(__import__("prunekit.testing.toy_models", fromlist=["TOY_MODELS"]).TOY_MODELS))
def test_every_group_kind_of_the_toy_models_is_scored(name):
    from prunekit.importance.criteria import resolve_criterion
    from prunekit.testing.toy_models import TOY_MODELS

    build, make_input = TOY_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    graph = build_graph(model, make_input())
    xs = torch.cat([make_input() for _ in range(4)])
    batches = [(xs, torch.arange(len(xs)) % 3)]
    for crit in ("ga_func2", "t_stat", "evolved:div(var(P), rho5(var(Q)))", "seed_l2"):
        ctx = ScoreContext(model, batches=batches, graph=graph)
        for g in graph.prunable_groups():
            s = resolve_criterion(crit)(g, ctx)
            assert s.shape == (g.size,) and bool(torch.isfinite(s).all()), (crit, g.name)


@pytest.mark.parametrize("crit", ["ga_func2", "evolved:div(var(P), rho5(var(Q)))"])
def test_missing_or_unlabelled_batches_get_one_clear_message_and_leave_the_model(crit):
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.models import create_model

    model = create_model("small_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    cfg = MagnitudeConfig(criterion=crit, channel_ratio=0.5, probe=False)
    name = crit.split(":")[0]
    with pytest.raises(ConfigError, match=f"criterion '{name}' needs data"):
        prune_(model, cfg, x[:1])
    with pytest.raises(ConfigError, match=r"calibration batch 0 is a Tensor, not a pair .*need labelled data"):
        prune_(model, cfg, x[:1], batches=[x, x])
    with pytest.raises(ConfigError, match=r"hold class \[42\] only; give batches with two classes or more"):
        prune_(model, cfg, x[:1], batches=[(x, torch.full((4,), 42))])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("criterion", ["fdr", "evolved:div(pow2(sub(g_mean(P), g_mean(Q))), rho1(add(var(P), var(Q))))"])
def test_negative_labels_are_named_before_the_forward_for_shipped_and_text_criteria(criterion):
    """A negative label read as a failure of the model's forward (shipped criteria) or was taken
    (the same function written as text)."""
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 8, 8), torch.arange(8) - 4)]
    with pytest.raises(ConfigError, match="calibration batch 0 holds the label -4; class-conditional criteria take"):
        prune_(model, MagnitudeConfig(criterion=criterion, channel_ratio=0.3), torch.randn(1, 1, 8, 8), batches=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_criterion_that_scores_every_channel_alike_is_noted_and_a_name_with_a_colon_is_refused():
    """Equal scores removed the first channels of a group without a word; a criterion registered
    as "evolved:foo" could never be selected (the prefix is read first)."""
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.models import create_model

    batches = [(torch.randn(8, 1, 8, 8), torch.arange(8) % 4)]
    result = prune_(create_model("small_cnn", num_classes=4), MagnitudeConfig(criterion="evolved:N", channel_ratio=0.3),
                    torch.randn(1, 1, 8, 8), batches=batches)
    assert result.metrics["tied_groups"] and any("same score in" in n and "index order" in n for n in result.metrics["notes"])
    plain = prune_(create_model("small_cnn", num_classes=4), MagnitudeConfig(channel_ratio=0.3), torch.randn(1, 1, 8, 8))
    assert "tied_groups" not in plain.metrics
    with pytest.raises(ConfigError, match="criterion name 'evolved:foo' cannot be registered.*without ':'"):
        CRITERIA.register("evolved:foo", lambda group, ctx: None)
    assert "evolved:foo" not in CRITERIA.list()


def test_evolved_text_reads_as_many_images_as_samples_says():
    """`evolved:<text>` reads the first 256 calibration images; a search with calib_samples=512
    scored on 512, and its best text gave another plan. `evolved:samples=512:<text>` is that
    search's criterion."""
    from prunekit.evolve.config import digits_task
    from prunekit.evolve.report import best_criteria
    from prunekit.importance.criteria import resolve_criterion
    from prunekit.importance.evolved.tree_eval import EvolvedCriterion
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.models import create_model

    text = "div(pow2(sub(g_mean(P), g_mean(Q))), g_mean(Q))"
    assert resolve_criterion(f"evolved:{text}").max_samples == 256
    spec = resolve_criterion(f"evolved:samples=512:{text}")
    assert spec.max_samples == 512 and spec.text == text
    torch.manual_seed(0)
    batches = [(torch.randn(128, 1, 8, 8), torch.arange(128) % 4) for _ in range(4)]
    pruned = []
    for crit in (EvolvedCriterion(text, 512), f"evolved:samples=512:{text}"):  # the search's, and the text's
        torch.manual_seed(1)
        model = create_model("small_cnn", num_classes=4)
        prune_(model, MagnitudeConfig(criterion=crit, channel_ratio=0.5, round_to=None), torch.randn(1, 1, 8, 8),
               batches=batches)
        pruned.append(model.state_dict())
    assert all(torch.equal(pruned[0][k], pruned[1][k]) for k in pruned[0])
    for bad in ("samples=0", "samples=many", "samples=-3"):
        with pytest.raises(ConfigError, match="whole number >= 1, as in 'evolved:samples=512:<text>'"):
            resolve_criterion(f"evolved:{bad}:{text}")

    class Cfg:  # the search's tasks, as best_criteria reads them
        tasks = [digits_task(calib_samples=512)]
    assert best_criteria(Cfg, text) == f"`evolved:samples=512:{text}`"
    Cfg.tasks = [digits_task(), digits_task(calib_samples=128, name="other")]
    assert best_criteria(Cfg, text) == f"for digits, `evolved:{text}`; for other, `evolved:samples=128:{text}`"
