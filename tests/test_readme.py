"""The README stays a front page: short, every link it gives resolves, and neither it nor
the docs/ pages keep a history of earlier runs (figures are what commands print now)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.*)", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


def _local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_fits_on_a_screen_or_so():
    size = len(README.read_text(encoding="utf-8"))
    assert size < 12_000, f"README.md is {size:,} characters; move details into docs/"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_local_link_resolves(page: Path):
    broken = []
    for target in _local_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_links_the_docs_pages():
    linked = {Path(t.partition("#")[0]).name for t in _local_links(README)}
    assert linked >= {"development.md", "guard.md", "money-truth.md"}
    assert any(t.startswith("docs/") for t in _local_links(README))


HISTORY = re.compile(r"\bissue \d+|\bearlier (?:session|run)s?\b|\bprevious (?:session|run)\b"
                     r"|\baim\b.{0,120}?\bnot met\b", re.I | re.S)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_no_history_of_earlier_runs(page: Path):
    found = [m.group(0) for m in HISTORY.finditer(page.read_text(encoding="utf-8"))]
    assert not found, f"{page.name} tells history ({found}); say what commands print now"


def test_the_readme_shows_how_to_reach_a_guarded_graphs_guard():
    """``guarded_graph()`` builds the guard from ``limits=``: the README's graph example
    shows where the user finds it (``app.guard``) to read a session's spend."""
    example = README.read_text(encoding="utf-8").split("**3. A guarded graph**")[1]
    example = example.split("```python")[1].split("```")[0]
    assert "app.guard.usage(" in example
