"""docs/methods.md is generated from the code (sparsejax.harness.methods_page) and equals it."""

import difflib
from pathlib import Path

import optax
import pytest

from sparsejax.harness.methods_page import REGENERATE, citations, render_methods
from sparsejax.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "methods.md"


def test_the_methods_page_is_what_the_code_generates():
    committed, generated = PAGE.read_text(encoding="utf-8"), render_methods()
    if committed != generated:
        diff = difflib.unified_diff(committed.splitlines(), generated.splitlines(),
                                    "docs/methods.md", "generated", lineterm="", n=1)
        pytest.fail(f"docs/methods.md differs from the code; regenerate it from the "
                    f"repository root with `{REGENERATE}`:\n" + "\n".join(list(diff)[:60]))


def test_every_shipped_method_has_an_entry_and_only_those():
    page = render_methods()
    for name in METHODS:
        assert f"\n### {name}\n" in page
        assert f"[{name}](#{name})" in page

    def outside(optimizer: optax.GradientTransformation, *, knob: int = 3) -> None:
        """A builder of a user's own (Smith et al. 2031)."""

    assert "### outside" not in render_methods({**METHODS, "outside": outside})


def test_papers_come_from_the_builder_or_its_module_item():
    assert citations(METHODS["rigl"]) == ["Evci et al. 2020"]  # the builder's docstring
    assert citations(METHODS["edge_popup"]) == ["Ramanujan et al. 2020"]  # the module's item
    assert citations(METHODS["dense"]) == []
