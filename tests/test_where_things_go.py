"""The worked examples of docs/design.md's "Where things go" run as written: a new
training method registered by name and driven through the optax form, and a new pattern
kind taken by static sparse training and by RigL (their own asserts check exact masks)."""

import runpy
from pathlib import Path

import pytest

from sparsejax.methods.registry import METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.parametrize("example", ["new_method.py", "new_pattern.py"])
def test_worked_example_runs(example, capsys):
    before = set(METHODS)
    try:
        runpy.run_path(str(EXAMPLES / example), run_name="__main__")
    finally:
        for name in set(METHODS) - before:  # the example's registration, not the library's
            del METHODS[name]
    assert capsys.readouterr().out.strip()


def test_design_md_points_at_every_example():
    design = (EXAMPLES.parent / "design.md").read_text()
    for example in sorted(EXAMPLES.glob("*.py")):
        assert f"docs/examples/{example.name}" in design, example.name
