"""Commit provenance of recorded results (issue #22)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import sparsejax.harness.provenance as prov
from sparsejax.harness.provenance import provenance

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_git_cache():
    prov._git_state.cache_clear()
    yield
    prov._git_state.cache_clear()


def _head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_commit_of_this_checkout():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("the tests run from a source tree that is not a git checkout")
    p = provenance()
    assert len(p["commit"]) == 40 and int(p["commit"], 16) >= 0
    assert p["commit"] == _head()
    assert isinstance(p["dirty"], bool)
    assert p["versions"]["jax"] and p["versions"]["python"]
    assert p["platform"]["backend"] == "cpu"
    json.dumps(p)  # recordable as is


def test_no_git_on_path_gives_none(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    p = provenance()
    assert p["commit"] is None and p["dirty"] is None
    assert p["versions"]["jax"]


def test_package_outside_a_checkout_gives_none(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    copy = tmp_path / "site-packages" / "sparsejax"
    shutil.copytree(Path(prov.__file__).parents[1], copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(prov, "__file__", str(copy / "harness" / "provenance.py"))
    if subprocess.run(["git", "-C", str(copy), "rev-parse"], capture_output=True).returncode == 0:
        pytest.skip("the temporary folder is inside a git checkout")
    p = provenance()
    assert p["commit"] is None and p["dirty"] is None

# That train records it in result.json: tests/test_training_loop.py (one run less here).
