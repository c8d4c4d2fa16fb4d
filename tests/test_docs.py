"""Every python block in README.md and docs/*.md runs as written, so no example rots.

The blocks of one file run in order in one namespace (a page may build on its earlier
blocks), in a temporary working directory. Blocks fenced as anything but ``python`` (shell
commands, printed output) are not run.
"""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_pages_have_python_examples():
    assert python_blocks(ROOT / "README.md")
    assert len(python_blocks(ROOT / "docs" / "own_loop.md")) >= 4


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.name} python block {i + 1}", "exec")
        exec(code, namespace)  # noqa: S102
    jax.clear_caches()  # the pages compile programs no other test reuses
