"""The docs a newcomer navigates: every relative link in README.md and docs/*.md reaches a file (and its
#anchor, a heading of that file), and every `make TARGET` they name is a target of the Makefile."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", _code(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _code(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` there is not a heading, a link there not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_the_readme_links_every_page_in_docs():
    linked = {m for m in LINK.findall((ROOT / "README.md").read_text())}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(page):
    for target in LINK.findall(_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link {target}: {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name}: link {target}: no heading #{anchor} in {file.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_named_exists(page):
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    # as a command: in a code span (`make test`) or at the start of a line of a code block
    for target in re.findall(r"(?:`|^)make ([a-z][\w-]*)", page.read_text(), re.M):
        assert target in targets, f"{page.name}: `make {target}` is not a Makefile target"
