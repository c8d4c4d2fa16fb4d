"""The N:M top-k on the kernel's own layout (``nm_topk_in_place``, what ``NM.topk`` runs
for one count per group) keeps exactly what the row form keeps: the same keys, the same
ties (the first entries of a group), on every axis and kernel rank."""

import jax
import jax.numpy as jnp
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
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    # ties inside groups, zeros of both signs, and a run of equal values
    x = x.at[(0,) * (len(shape) - 1)].set(1.0).reshape(-1).at[:8].set(0.5).reshape(shape)
    x = x.reshape(-1).at[8:12].set(jnp.array([0.0, -0.0, 0.0, -0.0])).reshape(shape)
    got = NM(n, m, axis=axis).topk(x, n)
    np.testing.assert_array_equal(got, _rows_form(x, n, m, axis))
    counts = np.asarray(NM(n, m, axis=axis).counts(got))
    assert np.all(counts == n)
