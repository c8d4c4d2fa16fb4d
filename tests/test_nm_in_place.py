"""The N:M top-k on the kernel's own layout (``nm_topk_in_place``, what ``NM.topk`` runs
for one count per group) keeps exactly what the row form keeps: the same keys, the same
ties (the first entries of a group), on every axis and kernel rank."""

import jax
import numpy as np
import pytest

from sparsejax.core.patterns import NM
from sparsejax.core.patterns.rows import group_rows, topk_rows, ungroup_rows


def _rows_form(x, n, m, axis):
    return ungroup_rows(topk_rows(group_rows(x, m, axis), n), axis, x.shape)


CASES = [((16, 6), -2, n, m) for n, m in [(2, 4), (1, 4), (4, 8), (3, 16)]] + [
    ((16, 8), -1, 2, 4), ((16, 8), -1, 4, 8), ((3, 3, 8, 4), -2, 2, 4),
    ((3, 3, 8, 4), -2, 4, 8), ((3, 3, 8, 4), -1, 1, 4), ((8, 3, 3), 0, 2, 4)]


@pytest.mark.parametrize("shape,axis,n,m", CASES)
def test_in_place_equals_rows(shape, axis, n, m):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    # ties inside groups, zeros of both signs, and a run of equal values
    x[(0,) * (len(shape) - 1)] = 1.0
    x.reshape(-1)[:8] = 0.5
    x.reshape(-1)[8:12] = [0.0, -0.0, 0.0, -0.0]
    pattern = NM(n, m, axis=axis)
    # both forms compiled, as in a step (eager, each would compile op by op)
    got = jax.jit(lambda x: pattern.topk(x, n))(x)
    np.testing.assert_array_equal(got, jax.jit(lambda x: _rows_form(x, n, m, axis))(x))
    counts = np.asarray(jax.jit(pattern.counts)(got))
    assert np.all(counts == n)
