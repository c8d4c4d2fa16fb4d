"""The worked examples of docs/design.md's "Where things go" run as written: a new
training method registered by name and driven through the optax form, a new pattern kind
taken by static sparse training and by RigL, and a new post-training algorithm reached by
prune_layer and the sequential driver (their own asserts check exact masks and counts)."""

import runpy
from pathlib import Path

import pytest

from sparsejax.methods.registry import METHODS
from sparsejax.posttrain.registry import POSTTRAIN_METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.parametrize("example", ["new_method.py", "new_pattern.py", "new_posttrain.py"])
def test_worked_example_runs(example, capsys):
    before = set(METHODS), set(POSTTRAIN_METHODS)
    try:
        runpy.run_path(str(EXAMPLES / example), run_name="__main__")
    finally:  # the example's registrations, not the library's
        for registry, known in zip((METHODS, POSTTRAIN_METHODS), before, strict=True):
            for name in set(registry) - known:
                del registry[name]
    assert capsys.readouterr().out.strip()


def test_design_md_points_at_every_example():
    design = (EXAMPLES.parent / "design.md").read_text()
    for example in sorted(EXAMPLES.glob("*.py")):
        assert f"docs/examples/{example.name}" in design, example.name
