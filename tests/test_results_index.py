"""docs/results.md's index is what docs/results_index.py generates from its headings."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("results_index", DOCS / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_index_lists_every_section_as_generated():
    generator = _generator()
    text = (DOCS / "results.md").read_text()
    assert generator.START in text and generator.END in text
    assert generator.with_index(text) == text, "run: python docs/results_index.py"


def test_anchors_follow_github_and_skip_code_blocks():
    generator = _generator()
    text = "## A `b` (c%)\n```\n## not a heading\n```\n### A `b` (c%)\n"
    assert generator.index_lines(text) == ["- [A b (c%)](#a-b-c)", "  - [A b (c%)](#a-b-c-1)"]
