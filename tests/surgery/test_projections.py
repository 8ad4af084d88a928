"""Projections onto sparsity sets: exact counts, shapes of the zeroed units, optimality."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.errors import ConfigError, PruningError
from prunekit.surgery.projections import (
    PATTERN_ZEROS,
    PROJECTIONS,
    global_irregular_masks,
    pattern_library,
    project,
    project_global,
    projection_mask,
)


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _round(x):
    return int(np.floor(x + 0.5))


def test_registry_lists_every_kind():
    assert PROJECTIONS.list() == ["channel", "column", "filter", "irregular", "nm", "pattern"]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.9])
def test_irregular_exact_count_and_threshold(sparsity):
    w = _w(8, 6, 3, 3)
    out = project(w, "irregular", sparsity)
    zeros = out == 0
    assert int(zeros.sum()) == _round(sparsity * w.numel())
    assert w.abs()[~zeros].min() >= w.abs()[zeros].max()
    assert torch.equal(out[~zeros], w[~zeros])


@given(
    numel=st.integers(2, 300),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_irregular_count_property(numel, sparsity, seed):
    w = _w(numel, seed=seed).round(decimals=1)  # rounding creates many ties
    k = _round(sparsity * numel)
    if k >= numel:
        with pytest.raises(PruningError):
            projection_mask(w, "irregular", sparsity)
        return
    mask = projection_mask(w, "irregular", sparsity)
    assert int((~mask).sum()) == k


@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3)])
def test_nm_every_block_valid(shape):
    w = _w(*shape, seed=1)
    mask = projection_mask(w, "nm", n=2, m=4)
    runs = mask.movedim(1, -1).reshape(-1, 4)
    assert torch.all(runs.sum(dim=1) == 2)
    assert int((~mask).sum()) == w.numel() // 2
    assert torch.equal(projection_mask(w, "nm", 0.5), mask)  # the implied sparsity is accepted
    with pytest.raises(ConfigError, match="leave sparsity unset"):
        projection_mask(w, "nm", 0.7)


@pytest.mark.parametrize("shape", [(10, 4, 3, 3), (10, 7)])
def test_filter_zeroes_whole_smallest_filters(shape):
    w = _w(*shape, seed=2)
    mask = projection_mask(w, "filter", 0.5)
    rows = mask.reshape(shape[0], -1)
    dead = ~rows.all(dim=1)
    assert torch.all(rows.all(dim=1) | (~rows).all(dim=1))  # each filter fully kept or fully zero
    assert int(dead.sum()) == 5
    norms = w.reshape(shape[0], -1).norm(dim=1)
    assert norms[~dead].min() >= norms[dead].max()


def test_channel_zeroes_whole_input_channels():
    w = _w(6, 10, 3, 3, seed=3)
    mask = projection_mask(w, "channel", 0.3)
    per_channel = mask.transpose(0, 1).reshape(10, -1)
    dead = (~per_channel).all(dim=1)
    assert torch.all(per_channel.all(dim=1) | dead)
    assert int(dead.sum()) == 3
    norms = w.transpose(0, 1).reshape(10, -1).norm(dim=1)
    assert norms[~dead].min() >= norms[dead].max()


def test_column_zeroes_whole_columns_of_the_matrix_view():
    w = _w(5, 4, 3, 3, seed=4)
    mask = projection_mask(w, "column", 0.75)
    cols = mask.reshape(5, 36)
    dead = (~cols).all(dim=0)
    assert torch.all(cols.all(dim=0) | dead)
    assert int(dead.sum()) == 27
    norms = w.reshape(5, 36).norm(dim=0)
    assert norms[~dead].min() >= norms[dead].max()


def test_pattern_library_is_13_distinct_four_zero_patterns():
    lib = pattern_library()
    assert lib.shape == (13, 9)
    assert torch.all((~lib).sum(dim=1) == 4)
    assert len({tuple(row.tolist()) for row in lib}) == 13
    assert PATTERN_ZEROS[0] == (0, 2, 6, 8)  # corners zeroed: the centre cross survives


def test_pattern_kernels_use_the_best_library_pattern():
    w = _w(3, 4, 3, 3, seed=5)
    mask = projection_mask(w, "pattern")
    zero_sets = {frozenset(z) for z in PATTERN_ZEROS}
    for o, i in itertools.product(range(3), range(4)):
        kernel, kmask = w[o, i].flatten(), mask[o, i].flatten()
        zeros = frozenset(torch.nonzero(~kmask).flatten().tolist())
        assert zeros in zero_sets
        # Oracle: brute force over the 13 patterns, first maximum wins.
        kept = [float(sum(kernel[j] ** 2 for j in range(9) if j not in z)) for z in PATTERN_ZEROS]
        assert zeros == frozenset(PATTERN_ZEROS[int(np.argmax(kept))])
    assert int((~mask).sum()) == 4 * 3 * 4
    with pytest.raises(PruningError, match="3x3"):
        projection_mask(_w(2, 2, 5, 5), "pattern")
    with pytest.raises(ConfigError, match="4/9"):
        projection_mask(w, "pattern", 0.5)


def test_project_returns_new_tensor_and_leaves_input():
    w = _w(4, 4, seed=6)
    before = w.clone()
    out = project(w, "irregular", 0.5)
    assert torch.equal(w, before) and out.data_ptr() != w.data_ptr()


def test_unreachable_or_invalid_requests_raise():
    with pytest.raises(PruningError, match="keeps none"):
        projection_mask(_w(2, 3), "filter", 0.9)  # round(1.8) = 2 of 2 filters
    with pytest.raises(PruningError, match="keeps none"):
        projection_mask(_w(10), "irregular", 0.96)
    with pytest.raises(ConfigError, match="unknown projection"):
        projection_mask(_w(4, 4), "blocks", 0.5)
    with pytest.raises(ConfigError, match="needs a sparsity"):
        projection_mask(_w(4, 4), "filter")
    with pytest.raises(PruningError, match="2 dimensions"):
        projection_mask(_w(8), "channel", 0.5)
    with pytest.raises(ConfigError, match="bad options"):
        projection_mask(_w(4, 4), "filter", 0.5, n=2)


def test_global_irregular_one_threshold_exact_total():
    tensors = [_w(30, seed=7), _w(5, 8, seed=8) * 3, _w(2, 2, 3, 3, seed=9) * 0.1]
    masks = global_irregular_masks(tensors, 0.6)
    total = sum(t.numel() for t in tensors)
    assert sum(int((~m).sum()) for m in masks) == _round(0.6 * total)
    kept = torch.cat([t.abs()[m] for t, m in zip(tensors, masks)])
    pruned = torch.cat([t.abs()[~m] for t, m in zip(tensors, masks)])
    assert kept.min() >= pruned.max()
    outs = project_global(tensors, 0.6)
    assert all(torch.equal(o, t * m) for o, t, m in zip(outs, tensors, masks))


def test_low_precision_weights_project_like_float32():
    w = _w(6, 8, seed=10).to(torch.bfloat16)
    assert torch.equal(projection_mask(w, "filter", 0.5), projection_mask(w.float(), "filter", 0.5))
    assert project(w, "irregular", 0.5).dtype == torch.bfloat16
