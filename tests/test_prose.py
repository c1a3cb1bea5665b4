"""Every number the book states is computed by the run (glued) or cited: no percentage or count is typed into
the prose by hand, except the few listed below with their reason."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "book").glob("*.ipynb")) + [ROOT / "book" / "intro.md"]

# What the check does not read: code, math, links, glued values, quotations (the article's own words).
IGNORED = [r"```.*?```", r"\$\$.*?\$\$", r"\$[^$\n]*\$", r"`[^`\n]*`", r"\]\([^)]*\)", r"\{glue:?\w*\}`[^`]*`",
           r"\"[^\"\n]*\"", r"“[^”]*”"]
# A percentage, or a count of at least 100 (the smaller ones are mostly ordinals, depths and sizes).
NUMBER = re.compile(r"(?<![\w.\-/])(\d[\d,.]*\s?%|\d{1,3}(?:,\d{3})+|\d{3,})(?![\w\-/]|\.\d)")
YEAR = re.compile(r"(19|20)\d\d")
# Numbers that are settings or shapes, not results: each is visible in the code the page shows.
SETTINGS = {
    "128": "batch sizes of the article's code and of the exercises",
    "256": "a batch size of the recipe",
    "512": "ResNet-18's pooled features, or a batch size",
    "255": "the uint8 range of a pixel",
    "1000": "ImageNet's classes in torchvision's ResNet-18 head (the article's bug)",
    "1,000": "ImageNet's classes in torchvision's ResNet-18 head (the article's bug)",
    "110": "the depth in the name ResNet-110",
    "100%": "a limit, not a measurement",
}

# Numbers allowed on one page only, with the reason.
PAGE_EXCEPTIONS = {
    "04_building_resnet.ipynb": {"576", "2176", "2752"},  # a hand count in an exercise's solution, done in the open
}


def _paragraphs(path: Path) -> list[str]:
    if path.suffix == ".md":
        texts = [path.read_text()]
    else:
        cells = json.loads(path.read_text())["cells"]
        texts = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    return [paragraph for text in texts for paragraph in re.split(r"\n\s*\n", text)]


def unsourced_numbers(paragraph: str) -> list[str]:
    """The percentages and counts of ``paragraph`` that are neither glued, cited, quoted nor a listed setting."""
    if "{cite" in paragraph:
        return []
    text = paragraph
    for pattern in IGNORED:
        text = re.sub(pattern, " ", text, flags=re.S)
    found = [m.group(1).replace(" ", "") for m in NUMBER.finditer(text)]
    return [n for n in found if n not in SETTINGS and not YEAR.fullmatch(n)]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_page_types_a_result_that_is_neither_glued_nor_cited(path):
    allowed = PAGE_EXCEPTIONS.get(path.name, set())
    problems = [f"{numbers} in: {' '.join(p.split())[:200]}" for p in _paragraphs(path)
                if (numbers := [n for n in unsourced_numbers(p) if n not in allowed])]
    assert not problems, f"{path.name}: glue these from the run or cite their source:\n" + "\n".join(problems)


def test_the_check_finds_a_typed_number_and_accepts_glued_cited_and_quoted_ones():
    assert unsourced_numbers("The model reaches 93.5% on 10,000 images.") == ["93.5%", "10,000"]
    assert unsourced_numbers("The model reaches {glue:text}`accuracy:.1%` on {glue:text}`n`.") == []
    assert unsourced_numbers("He et al. report 6.43% {cite}`he2016deep`.") == []
    assert unsourced_numbers('The article claims "about 90%".') == []
    assert unsourced_numbers("Batches of 128, from 1999 on.") == []
