"""README and docs/ point only at files that exist: every relative Markdown link resolves, and every results
file named (``docs/results/....json`` linked or in backticks, or a bare ``...-cpu.json`` name in a table
whose column says docs/results/) is in the tree and parses as JSON. README's results summary and the record in
docs/eng-wiki.md cite those files for each figure."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULTS_PATH = re.compile(r"docs/results/([\w.\-/]+\.json)")
BARE_RESULTS_NAME = re.compile(r"`([\w.\-]+-(?:cpu|gpu)\.json)`")


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://|#|mailto:", t)]


def broken_links(page: Path, text: str) -> list[str]:
    return [t for t in relative_links(text) if not (page.parent / t.split("#")[0]).exists()]


def results_named(text: str) -> list[str]:
    return sorted(set(RESULTS_PATH.findall(text)) | set(BARE_RESULTS_NAME.findall(text)))


def test_the_patterns_find_links_and_results_files():
    text = (
        "see [a](docs/x.md), [b](https://e.org/y), ![c](results/p.png#frag), [d](#anchor); "
        "`docs/results/a-cpu.json`, `b-2026-12-03-cpu.json` and docs/results/grids/t.json"
    )
    assert relative_links(text) == ["docs/x.md", "results/p.png#frag"]
    assert results_named(text) == ["a-cpu.json", "b-2026-12-03-cpu.json", "grids/t.json"]
    assert broken_links(ROOT / "README.md", "[x](docs/no-such-page.md) [y](docs/eng-wiki.md)") == [
        "docs/no-such-page.md"
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    missing = broken_links(page, page.read_text(encoding="utf-8"))
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_results_files_named_exist_and_parse(page):
    for name in results_named(page.read_text(encoding="utf-8")):
        path = RESULTS / name
        assert path.is_file(), f"{page.relative_to(ROOT)} names docs/results/{name}, which is not in the tree"
        json.loads(path.read_text(encoding="utf-8"))


def test_wiki_record_is_linked_from_readme():
    assert "](docs/eng-wiki.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
