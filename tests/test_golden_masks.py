"""Masks recorded from the per-leaf top-k engine (tests/golden/masks.json) are what the
batched engine gives, bit for bit: top-k calls (sizes that share one search, sizes alone,
global scope, ties, -inf entries, spikes, subnormals, tracked cuts) and every
weight-training method's masks over a few updates (unstructured, N:M, block, channel),
and Edge-Popup's."""

import json

import pytest
from golden_cases import GOLDEN, all_cases, digest

RECORDED = json.loads(GOLDEN.read_text())
CASES = all_cases()


def test_every_recorded_case_is_still_built():
    assert sorted(CASES) == sorted(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_masks_are_the_recorded_ones(name):
    assert digest(CASES[name]()) == RECORDED[name]
