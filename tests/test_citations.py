"""The book's citations against references.bib: every key the chapters cite has an entry, every entry is cited,
and every entry says who wrote what, where and when.

Citations are MyST roles in markdown cells and pages: {cite}`key`, {cite:p}`a, b`, {cite:t}`key`, and the other
``cite:`` forms of sphinxcontrib-bibtex. Code cells are not read: a role there is never rendered.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIB = ROOT / "references.bib"
BOOK = ROOT / "book"

CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
ENTRY = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def markdown_sources() -> dict[str, str]:
    """The markdown of every chapter and page of the book, by file name."""
    texts = {}
    for path in sorted(BOOK.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        texts[path.name] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    for path in sorted(BOOK.glob("*.md")):
        texts[path.name] = path.read_text(encoding="utf-8")
    return texts


def cited_keys(text: str) -> list[str]:
    keys = []
    for inside in CITE.findall(text):
        inside = re.sub(r"\{[^}]*\}", "", inside)  # pre- and post-text: {cite:p}`{see}key{p. 3}`
        keys += [key.strip() for key in inside.split(",") if key.strip()]
    return keys


def citations() -> dict[str, set[str]]:
    """Each cited key and the files that cite it."""
    where: dict[str, set[str]] = {}
    for name, text in markdown_sources().items():
        for key in cited_keys(text):
            where.setdefault(key, set()).add(name)
    return where


def bib_entries() -> list[tuple[str, str]]:
    """(entry type, key) of every entry of references.bib, in file order."""
    return [(kind.lower(), key) for kind, key in ENTRY.findall(BIB.read_text(encoding="utf-8"))]


def test_the_pattern_reads_every_form_of_the_role() -> None:
    text = "as {cite}`he2016deep` and {cite:p}`a2020x, b2021y` show; {cite:t}`c2019z` and {cite:ps}`{see}d1{p. 3}`"
    assert cited_keys(text) == ["he2016deep", "a2020x", "b2021y", "c2019z", "d1"]


def test_the_book_cites_something() -> None:
    assert len(citations()) >= 10  # a broken pattern would make the next tests pass vacuously


def test_every_cited_key_is_in_references_bib() -> None:
    known = {key for _, key in bib_entries()}
    missing = {key: sorted(files) for key, files in citations().items() if key not in known}
    assert not missing, f"cited but not in references.bib: {missing}"


def test_every_entry_of_references_bib_is_cited() -> None:
    cited = set(citations())
    uncited = [key for _, key in bib_entries() if key not in cited]
    assert not uncited, f"in references.bib but cited nowhere in book/: {', '.join(uncited)}"


def test_references_bib_has_no_duplicate_keys() -> None:
    counts = Counter(key for _, key in bib_entries())
    assert not [key for key, n in counts.items() if n > 1]


def test_every_entry_says_who_what_where_and_when() -> None:
    pybtex = pytest.importorskip("pybtex.database")
    database = pybtex.parse_file(str(BIB), bib_format="bibtex")
    assert len(database.entries) == len(bib_entries())  # the regex and the parser see the same entries
    venue = {"article": "journal", "inproceedings": "booktitle", "techreport": "institution", "misc": "howpublished"}
    for key, entry in database.entries.items():
        assert entry.persons.get("author"), f"{key}: no author"
        assert entry.fields.get("title"), f"{key}: no title"
        year = entry.fields.get("year", "")
        assert re.fullmatch(r"(19|20)\d\d", year), f"{key}: year {year!r}"
        assert entry.type in venue, f"{key}: entry type {entry.type!r}"
        assert entry.fields.get(venue[entry.type]), f"{key}: no {venue[entry.type]}"
        # the keys follow one style: first author's family name, year, first word of the title
        family = re.sub(r"[^a-z]", "", "".join(entry.persons["author"][0].prelast_names
                                               + entry.persons["author"][0].last_names).lower())
        assert key.startswith(family + year), f"{key}: expected a key starting {family + year!r}"
