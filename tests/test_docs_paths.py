"""Every repository path the READMEs and docs/ mention exists (docs that name missing files are a defect)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(REPO.glob("*/README.md")), *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./-])((?:recipes|launch|ds_configs|sora_ds|bench|tests|scripts|docs|examples)/[\w./-]*\w)")
PLACEHOLDERS = ("outputs/",)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_in_docs_exist(doc):
    missing = sorted({p for p in PATH.findall(doc.read_text()) if not (REPO / p).exists()})
    assert not missing, f"{doc.relative_to(REPO)} names missing paths: {missing}"
