"""The repository stands on its own: no file points at documents outside it, and docs links resolve."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|(?<![\w/])(?:METHODS|DESIGN)\.md")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / name for name in names.splitlines()]
    return [p for p in paths if p.suffix in {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ""}
            and p.is_file()]


def test_no_file_refers_to_documents_outside_the_repository():
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in tracked_text_files() if path.name != "test_repository.py"
                 for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, "\n".join(offenders)


def test_docs_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
