"""The README stays a one-page entry built from the code: its method table is the registry's, its links and
those of docs/ point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

from tokenreduce.cli import main
from tokenreduce.commands.methods import methods_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _readme_table() -> str:
    text = README.read_text()
    start = text.index("\n", text.index("<!-- methods-table")) + 1
    return text[start:text.index("<!-- /methods-table -->")].strip()


def test_the_readme_method_table_is_the_registry(capsys):
    """Regenerate with ``tokenreduce methods --markdown`` after adding or renaming a method."""
    assert main(["methods", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == methods_table()
    assert _readme_table() == printed, "README's method table is stale: paste `tokenreduce methods --markdown`"


def test_the_readme_is_one_page():
    assert len(README.read_text().splitlines()) <= 300


def test_relative_links_point_at_files():
    pages = [README, ROOT / "CONTRIBUTING.md", ROOT / "csrc" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken
