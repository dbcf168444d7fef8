"""The README's Python code runs as written: every ```python block in README.md is an example file, shown whole after
a `<!-- example: examples/NAME.py -->` marker, and every example file runs (CPU, seconds) in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.recipe

README = (REPO / "README.md").read_text()
SHOWN = dict(re.findall(r"<!-- example: (examples/[\w/]+\.py) -->\n```python\n(.*?)```", README, flags=re.S))
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_every_python_block_of_the_readme_is_an_example():
    assert len(SHOWN) == README.count("```python"), "a ```python block in README.md without an example marker"


@pytest.mark.parametrize("path", sorted(SHOWN))
def test_readme_shows_the_example_file_exactly(path):
    assert SHOWN[path] == (REPO / path).read_text(), f"README.md's block of {path} differs from the file"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
